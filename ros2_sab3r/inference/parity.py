"""Parity of exported graphs with torch: every output compared against a written-down tolerance.

:func:`parity_check` runs an encoder/decoder graph pair in ONNX Runtime (CPU) with the session
options the backend uses (:func:`ros2_sab3r.inference.ort_backend.ort_session`) on two example
images and compares the tokens and every decoder output with the torch network. Two measures:

- ``'max'`` (fp32 graphs): the worst element against the output's largest ``|torch|`` value,
  against :data:`PARITY_TOLERANCES`;
- ``'rms'`` (int8 graphs, whose rounding error is spread over every element): relative
  root-mean-square error, against the tolerances of :mod:`ros2_sab3r.inference.int8`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ros2_sab3r.inference.ort_backend import ort_session, ort_session_options
from ros2_sab3r.model.network import DecoderGraph, Sab3rNet
from ros2_sab3r.model.outputs import (
    DECODER_INPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    FEATURE_FIELDS,
    GEOMETRY_FIELDS,
    OUTPUT_FIELDS,
)

# Largest |ORT - torch| allowed per output, relative to the largest |torch| value of that output
# (fp32 on CPU; the encoder error reaches the decoder, whose inputs are ORT's own tokens).
# Measured on random-weight tiny and full-size networks: ~1e-6 (tiny) to ~1e-5 (ViT-L).
# Keys: the encoder output, then the ViewOutput fields (both views share a tolerance).
PARITY_TOLERANCES: dict[str, float] = {
    ENCODER_OUTPUT: 1e-4, **dict.fromkeys((*GEOMETRY_FIELDS, *FEATURE_FIELDS), 1e-3)}


def tolerance_for(output: str, tolerances: dict[str, float] = PARITY_TOLERANCES) -> float:
    """'pts3d_in_other_view_2' -> the 'pts3d' tolerance, 'desc_conf_1' -> 'desc_conf', ..."""
    base = OUTPUT_FIELDS[output][1] if output in OUTPUT_FIELDS else output
    if base not in tolerances:
        raise KeyError(f'no parity tolerance written down for output {output!r}')
    return tolerances[base]


@dataclass(frozen=True)
class ParityFigure:
    output: str
    max_abs: float  # max |ORT - torch|
    rel: float  # 'max': max_abs / max |torch|; 'rms': rms(ORT - torch) / rms(torch)
    tol: float  # allowed rel
    measure: str = 'max'

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel)) and self.rel <= self.tol

    def line(self) -> str:
        name = 'rel' if self.measure == 'max' else 'rms rel'
        return (f'{self.output:<24s} max|diff| {self.max_abs:.3e}  {name} {self.rel:.3e}  '
                f'tol {self.tol:.0e}  {"ok" if self.ok else "FAIL"}')


def compare(output: str, got: np.ndarray, want: np.ndarray,
            tolerances: dict[str, float] = PARITY_TOLERANCES,
            measure: str = 'max') -> ParityFigure:
    """Parity of one output. 'max' (fp32 graphs): the worst element against the output's
    range. 'rms' (int8 graphs, whose rounding error is spread over every element): relative
    root-mean-square error, the usual measure of quantisation error."""
    tol = tolerance_for(output, tolerances)
    if got.shape != want.shape:
        return ParityFigure(output, float('inf'), float('inf'), tol, measure)
    got, want = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(got - want)
    max_abs = float(diff.max()) if diff.size else 0.0
    if measure == 'rms':
        rms = float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0
        scale = float(np.sqrt(np.mean(want ** 2))) if want.size else 0.0
        return ParityFigure(output, max_abs, rms / max(scale, 1e-12), tol, measure)
    scale = float(np.abs(want).max()) if want.size else 0.0
    return ParityFigure(output, max_abs, max_abs / max(scale, 1e-12), tol, measure)


def example_image(size: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A smooth random image in [-1, 1] (pure noise would be an unusual input for a real model).
    low = torch.rand(1, 3, max(size[0] // 16, 1), max(size[1] // 16, 1), generator=gen)
    img = torch.nn.functional.interpolate(low, size=size, mode='bilinear', align_corners=False)
    return img * 2 - 1  # (1, 3, H, W)


def parity_check(encoder: Path, decoder: Path, net: Sab3rNet, size: tuple[int, int],
                 output_names: Sequence[str], level: str = 'all', threads: int = 0,
                 seed: int = 0, tolerances: dict[str, float] = PARITY_TOLERANCES,
                 measure: str = 'max') -> list[ParityFigure]:
    """Run both graphs in ONNX Runtime (CPU) on two images; compare every output with torch."""
    img1, img2 = example_image(size, seed), example_image(size, seed + 1)
    with torch.inference_mode():
        ref1, ref2 = net.encode(img1).tokens, net.encode(img2).tokens
        ref_out = DecoderGraph(net, size)(ref1, ref2)
    providers = ['CPUExecutionProvider']
    enc = ort_session(encoder, ort_session_options(level, threads), providers)
    t1 = enc.run(None, {ENCODER_INPUT: img1.numpy()})[0]
    t2 = enc.run(None, {ENCODER_INPUT: img2.numpy()})[0]
    del enc
    figures = [compare(ENCODER_OUTPUT, t1, ref1.float().numpy(), tolerances, measure),
               compare(ENCODER_OUTPUT, t2, ref2.float().numpy(), tolerances, measure)]
    figures = [max(figures, key=lambda f: f.rel)]
    dec = ort_session(decoder, ort_session_options(level, threads), providers)
    outs = dec.run(list(output_names), dict(zip(DECODER_INPUTS, (t1, t2))))
    for name, got, want in zip(output_names, outs, ref_out):
        figures.append(compare(name, got, want.float().numpy(), tolerances, measure))
    return figures


def split_parity_check(encoder: Path, geometry: Path, features: dict[int, Path], net: Sab3rNet,
                       size: tuple[int, int], level: str = 'all', threads: int = 0,
                       seed: int = 0, tolerances: dict[str, float] = PARITY_TOLERANCES,
                       measure: str = 'max') -> list[ParityFigure]:
    """The split decoder (format 2) in ONNX Runtime against the torch full decode: the geometry
    graph on the encoder graph's tokens, each view's feature graph on the geometry graph's
    token layers (so the feature figures include the geometry graph's error), every output
    compared as :func:`parity_check` does ('rms' for int8 graphs)."""
    from ros2_sab3r.model.network import FeatureGraph, GeometryGraph

    img1, img2 = example_image(size, seed), example_image(size, seed + 1)
    full = DecoderGraph(net, size)
    with torch.inference_mode():
        ref = dict(zip(full.output_names, full(net.encode(img1).tokens,
                                              net.encode(img2).tokens)))
    providers = ['CPUExecutionProvider']
    enc = ort_session(encoder, ort_session_options(level, threads), providers)
    t1 = enc.run(None, {ENCODER_INPUT: img1.numpy()})[0]
    t2 = enc.run(None, {ENCODER_INPUT: img2.numpy()})[0]
    del enc
    names = GeometryGraph(net, size).output_names
    geo = ort_session(geometry, ort_session_options(level, threads), providers)
    got = dict(zip(names, geo.run(list(names), dict(zip(DECODER_INPUTS, (t1, t2))))))
    del geo
    for view, path in sorted(features.items()):
        graph = FeatureGraph(net, size, view)
        sess = ort_session(path, ort_session_options(level, threads), providers)
        outs = sess.run(list(graph.output_names), {n: got[n] for n in graph.input_names})
        got.update(zip(graph.output_names, outs))
    return [compare(name, got[name], want.float().numpy(), tolerances, measure)
            for name, want in ref.items()]

