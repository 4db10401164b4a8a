"""Simulation: synthetic scenes with ground truth, and stand-in backends and text encoders.

Everything here is named as a stand-in: it exercises the pipeline and the node without network
weights and never says anything about SAB3R's quality.
"""
