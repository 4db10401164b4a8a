"""SAB3R network: MASt3R-compatible encoder/decoder/heads with CLIP/DINO feature heads.

Modules: ``arch`` (architecture configs as data), ``network`` (the torch network and its stages),
``outputs`` (typed stage values), ``checkpoint`` (loading/saving weights), ``preprocess``
(official image preprocessing), ``matching`` (reciprocal descriptor matching), ``text`` (CLIP text
encoder), ``cli`` (``sab3r-infer``).
"""
