"""Typed values produced by the network stages (torch tensors, batch first)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ros2_sab3r.types import PairPrediction, ViewPrediction


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


def _np(t: torch.Tensor | None, index: int) -> np.ndarray | None:
    if t is None:
        return None
    return np.ascontiguousarray(t[index].detach().to('cpu', torch.float32).numpy())


def to_view_prediction(view: ViewOutput, index: int = 0) -> ViewPrediction:
    return ViewPrediction(
        X=_np(view.pts3d, index), C=_np(view.conf, index), D=_np(view.desc, index),
        D_conf=_np(view.desc_conf, index), S_clip=_np(view.clip, index),
        S_dino=_np(view.dino, index))


def to_pair_prediction(output: PairOutput, index: int = 0,
                       extras: dict | None = None) -> PairPrediction:
    """Convert batch item ``index`` of a pair output into the pipeline's numpy PairPrediction."""
    h, w = output.view1.pts3d.shape[1:3]
    return PairPrediction(view1=to_view_prediction(output.view1, index),
                          view2=to_view_prediction(output.view2, index),
                          image_size=(int(h), int(w)), extras=dict(extras or {}))
