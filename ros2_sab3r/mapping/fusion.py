"""Fusing a posed keyframe into the map: which feature cell each fused pixel takes.

Semantic features come on a coarser grid than the pointmap (h, w = H, W / stride). Every fused
pixel (every ``mapping.integration_stride``-th each way) takes the feature of the cell that covers
it, except where the cell straddles a depth edge (see :func:`edge_filtered_cells`). When the CLIP
and DINO heads have different strides, the DINO grid is resampled onto the CLIP one so that one
cell index serves both.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.geometry.transforms import apply
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.types import PosedKeyframe


def resample_cells(S: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h0, w0, F) feature grid -> (h, w, F): the cell whose centre covers each new cell's centre
    (both grids span the same network input)."""
    h0, w0 = S.shape[:2]
    h, w = hw
    ys = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    return S[ys[:, None], xs[None, :]]


@lru_cache(maxsize=16)
def feature_cells(hw: tuple[int, int], fhw: tuple[int, int], stride: int) -> np.ndarray:
    """(n,) index of the feature cell (grid fhw) that covers each fused pixel (every `stride`-th
    pixel each way of grid hw, row-major). Cached per resolution, hence read-only."""
    H, W = hw
    h, w = fhw
    ys = np.arange(0, H, stride) * h // H
    xs = np.arange(0, W, stride) * w // W
    cells = (ys[:, None] * w + xs[None, :]).reshape(-1)
    cells.flags.writeable = False
    return cells


def edge_filtered_cells(Z: np.ndarray, cells: np.ndarray, fhw: tuple[int, int], tol: float,
                        stride: int) -> np.ndarray:
    """Drop the feature (-1) of pixels whose depth differs from their cell centre's by > tol.

    A feature cell covers several pixels; where it straddles a depth edge (an object in front
    of a wall) its feature belongs to the surface at its centre, and spreading it over the
    pixels behind would paint a halo of the object's class onto the wall. Z: (H, W) depth;
    cells: (n,) of the pixels fused (every `stride`-th each way).
    """
    H, W = Z.shape
    h, w = fhw
    cy = ((np.arange(h) + 0.5) * H / h).astype(np.int64)
    cx = ((np.arange(w) + 0.5) * W / w).astype(np.int64)
    z_cell = Z[cy[:, None], cx[None, :]].reshape(-1)  # (h*w,)
    z = Z[::stride, ::stride].reshape(-1)
    zc = z_cell[cells]
    far = np.abs(z - zc) > tol * np.maximum(np.abs(zc), 1e-6)
    return np.where(far, -1, cells)


def fuse_keyframe(semantic_map: SemanticVoxelMap, kf: PosedKeyframe, cfg: MappingConfig
                  ) -> int:
    """Integrate a keyframe's points, colours and features into the map; returns points fused."""
    s = cfg.integration_stride
    S = kf.S_clip if kf.S_clip is not None else kf.S_dino
    cells = None
    if S is not None:
        cells = feature_cells(kf.X.shape[:2], S.shape[:2], s)
        if cfg.feature_edge_tolerance > 0 and S.shape[:2] != kf.X.shape[:2]:
            cells = edge_filtered_cells(kf.X[..., 2], cells, S.shape[:2],
                                        cfg.feature_edge_tolerance, s)
    S_dino = kf.S_dino
    if S_dino is not None and kf.S_clip is not None and S_dino.shape[:2] != S.shape[:2]:
        # the map indexes both features by one cell grid: the CLIP one (heads may differ in
        # stride, e.g. DINO at 1/4 and CLIP at full resolution)
        S_dino = resample_cells(S_dino, S.shape[:2])
    X_W = apply(kf.T_WC, kf.X[::s, ::s].reshape(-1, 3))
    return semantic_map.integrate(
        X_W, kf.C[::s, ::s].reshape(-1), kf.rgb[::s, ::s].reshape(-1, 3), kf.stamp_ns, cells,
        None if kf.S_clip is None else kf.S_clip.reshape(-1, kf.S_clip.shape[-1]),
        None if S_dino is None else S_dino.reshape(-1, S_dino.shape[-1]))
