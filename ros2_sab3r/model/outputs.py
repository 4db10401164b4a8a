"""Typed values produced by the network stages (torch tensors, batch first), and their names.

One module owns every name the two exported graphs (encoder; decoder + heads) are known by:

- binding names: the encoder takes :data:`ENCODER_INPUT` and returns :data:`ENCODER_OUTPUT`;
  the decoder takes :data:`DECODER_INPUTS` (view 1's tokens, view 2's tokens);
- the split export's token layers between the geometry graph and the feature-head graphs,
  :func:`feature_input_name`;
- the decoder outputs under the official MASt3R names (``pts3d_1``, ``conf_1``, ``desc_1``,
  ``desc_conf_1``, ``clip_1``, ``dino_1``, ``pts3d_in_other_view_2``, ``conf_2``, ...),
  :func:`output_name` / :func:`output_names` / :data:`OUTPUT_FIELDS`.

torch is imported only where a tensor is converted, so the ONNX Runtime and TensorRT backends use
the names without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ros2_sab3r.types import PairPrediction, ViewPrediction

if TYPE_CHECKING:
    import torch

ENCODER_INPUT = 'image'  # (1, 3, H, W) float32 in [-1, 1]
ENCODER_OUTPUT = 'tokens'  # (1, N, enc_dim)
DECODER_INPUTS = ('tokens1', 'tokens2')  # encoder tokens of view 1 and view 2
VIEWS = (1, 2)
# ViewOutput fields in graph order: the geometry every network has, then its feature heads.
GEOMETRY_FIELDS = ('pts3d', 'conf', 'desc', 'desc_conf')
FEATURE_FIELDS = ('clip', 'dino')
# ViewOutput field -> the pipeline's ViewPrediction field.
PREDICTION_FIELDS = {'pts3d': 'X', 'conf': 'C', 'desc': 'D', 'desc_conf': 'D_conf',
                     'clip': 'S_clip', 'dino': 'S_dino'}


def output_name(field: str, view: int) -> str:
    """Official name of a ViewOutput field of view 1 or 2: view 2's points are expressed in
    view 1's frame, hence ``pts3d_in_other_view_2``; everything else is ``<field>_<view>``."""
    return 'pts3d_in_other_view_2' if (field, view) == ('pts3d', 2) else f'{field}_{view}'


def output_names(feature_heads: Sequence[str] = (),
                 feature_views: Sequence[int] = VIEWS) -> tuple[str, ...]:
    """Decoder outputs in graph order: per view the geometry, then the feature heads (of the
    views in ``feature_views`` only)."""
    return tuple(output_name(f, v) for v in VIEWS
                 for f in (*GEOMETRY_FIELDS, *(feature_heads if v in feature_views else ())))


def feature_input_name(layer: int, view: int) -> str:
    """Split export: decoder token layer ``layer`` of view 1 or 2, an output of the geometry
    graph and an input of that view's feature-head graph."""
    return f'layer{layer}_{view}'


# Outputs every decoder graph has (those of a network without feature heads).
REQUIRED_OUTPUTS = output_names()
# Official output name -> (view, ViewOutput field), feature heads included.
OUTPUT_FIELDS: dict[str, tuple[int, str]] = {
    output_name(f, v): (v, f) for v in VIEWS for f in (*GEOMETRY_FIELDS, *FEATURE_FIELDS)}


@dataclass(frozen=True)
class EncodedImage:
    """Encoder output of one image: computed once per frame, reused by every pair."""

    tokens: torch.Tensor  # (B, N, enc_dim) after enc_norm, N = h * w, row-major
    grid: tuple[int, int]  # (h, w) patch grid
    image_size: tuple[int, int]  # (H, W) input pixels


@dataclass(frozen=True)
class ViewTokens:
    """Token list of one view after decoding, the input of that view's heads."""

    layers: tuple[torch.Tensor, ...]  # dec_depth + 1 tensors: (B,N,enc_dim), then (B,N,dec_dim)
    grid: tuple[int, int]  # (h, w)
    image_size: tuple[int, int]  # (H, W)


@dataclass(frozen=True)
class ViewOutput:
    """Post-processed head outputs of one view (float32).

    For view 2 of a pair, ``pts3d`` is expressed in view 1's camera frame (the official
    ``pts3d_in_other_view``).
    """

    pts3d: torch.Tensor  # (B, H, W, 3)
    conf: torch.Tensor  # (B, H, W) >= vmin of conf_mode (1 for 'exp')
    desc: torch.Tensor  # (B, H, W, desc_dim) unit norm
    desc_conf: torch.Tensor  # (B, H, W)
    clip: torch.Tensor | None = None  # (B, H/s, W/s, Fc) CLIP-space features, if the head exists
    dino: torch.Tensor | None = None  # (B, H/s, W/s, Fd) DINO-space features, if the head exists


@dataclass(frozen=True)
class PairOutput:
    """Outputs of the ordered pair (view 1, view 2)."""

    view1: ViewOutput
    view2: ViewOutput


def named_outputs(output: PairOutput) -> dict[str, torch.Tensor]:
    """The pair's tensors by official name, in graph order (absent feature heads left out)."""
    named = {}
    for v, view in zip(VIEWS, (output.view1, output.view2)):
        for f in (*GEOMETRY_FIELDS, *FEATURE_FIELDS):
            t = getattr(view, f)
            if t is not None:
                named[output_name(f, v)] = t
    return named


def _np(t: torch.Tensor | None, index: int) -> np.ndarray | None:
    if t is None:
        return None
    import torch

    return np.ascontiguousarray(t[index].detach().to('cpu', torch.float32).numpy())


def to_view_prediction(view: ViewOutput, index: int = 0) -> ViewPrediction:
    return ViewPrediction(**{PREDICTION_FIELDS[f]: _np(getattr(view, f), index)
                             for f in (*GEOMETRY_FIELDS, *FEATURE_FIELDS)})


def to_pair_prediction(output: PairOutput, index: int = 0,
                       extras: dict | None = None) -> PairPrediction:
    """Convert batch item ``index`` of a pair output into the pipeline's numpy PairPrediction."""
    h, w = output.view1.pts3d.shape[1:3]
    return PairPrediction(view1=to_view_prediction(output.view1, index),
                          view2=to_view_prediction(output.view2, index),
                          image_size=(int(h), int(w)), extras=dict(extras or {}))
