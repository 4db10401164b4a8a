"""Reciprocal nearest-neighbour matching of local descriptors on a pixel grid (overlap measure).

Used to measure the overlap of a frame with the latest keyframe. Seeds and candidates both lie on
a grid of spacing `stride`, which keeps the brute-force dot products small (a (h*w, h*w) matrix:
768 x 768 at stride 16 for 512x384, 3k x 3k at stride 8) while measuring the same thing as the
full-resolution walk: the share of image 1 that has a mutual best match in image 2. The share is
an estimate from samples, so a coarser grid mostly adds sampling noise (~2% at 768 seeds); the
cost falls with the 4th power of the stride (keyframes.match_stride).

Why not the official fast reciprocal matcher (spec §7): that matcher walks from
grid seeds over *all* pixels of the other image, to find dense correspondences; here candidates
are grid points too, and then the walk is unnecessary. A walk from seed i ends at a reciprocal
pair (i', j') whose i' is itself a grid point, and seed i' finds that pair directly; so the
unique pairs the walk returns are exactly the pairs (i, nn12(i)) that are mutual nearest
neighbours, found with one matrix product, a row argmax and a column max (no full column
argmax, the slow reduction). It also keeps torch out of the per-frame geometry.
"""

from __future__ import annotations

import numpy as np


def grid_descriptors(D: np.ndarray, stride: int, border: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, F) -> ((N, F) descriptors, (N, 2) pixel (x, y)) on a grid starting at stride // 2."""
    H, W = D.shape[:2]
    ys = np.arange(stride // 2, H, stride)
    xs = np.arange(stride // 2, W, stride)
    ys = ys[(ys >= border) & (ys < H - border)]
    xs = xs[(xs >= border) & (xs < W - border)]
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    d = D[yy, xx].reshape(-1, D.shape[-1]).astype(np.float32)
    return d, np.stack([xx.reshape(-1), yy.reshape(-1)], -1)


def reciprocal_matches(D1: np.ndarray, D2: np.ndarray, stride: int = 8
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest-neighbour (dot product) matches between two (H, W, F) unit descriptor maps,
    on the seed grid of each (module docstring). Returns ((M, 2), (M, 2)) pixel (x, y) arrays,
    each grid point of image 1 at most once. Non-finite descriptors never match.
    """
    d1, xy1 = grid_descriptors(D1, stride)
    d2, xy2 = grid_descriptors(D2, stride)
    ok1 = np.isfinite(d1).all(-1)
    ok2 = np.isfinite(d2).all(-1)
    if not ok1.any() or not ok2.any():
        return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64)
    d1 = np.where(ok1[:, None], d1, 0.0)
    d2 = np.where(ok2[:, None], d2, 0.0)
    # (N1, N2); small enough on a grid to hold at once. numpy's own einsum loop, not BLAS: for
    # a 768 x 768 x 24 product OpenBLAS's thread pool waits for a second core, which costs
    # ~15 ms instead of ~1 ms whenever another process keeps that core busy.
    sim = np.einsum('ik,kj->ij', d1, np.ascontiguousarray(d2.T))
    sim[:, ~ok2] = -np.inf
    nn12 = np.argmax(sim, axis=1)  # (N1,)
    best12 = sim[np.arange(len(d1)), nn12]
    col_max = sim.max(axis=0)  # (N2,) best similarity of each point of image 2
    # i is matched when it is (one of) the best of its own nearest neighbour's column
    mutual = ok1 & (best12 >= col_max[nn12])
    return xy1[mutual], xy2[nn12[mutual]]


def overlap_ratio(D1: np.ndarray, D2: np.ndarray, stride: int = 8,
                  conf1: np.ndarray | None = None, conf2: np.ndarray | None = None,
                  min_conf: float = 0.0) -> float:
    """Share of the seed grid of image 1 with a reciprocal match in image 2, in [0, 1].

    Reciprocal walks always end somewhere, even between unrelated images; matches whose pixels
    have a descriptor confidence below `min_conf` in either image (conf1, conf2: (H, W)) do not
    count, which is what separates real overlap from chance pairs.
    """
    n_seeds = len(grid_descriptors(D1[..., :1], stride)[0])
    if n_seeds == 0:
        return 0.0
    m1, m2 = reciprocal_matches(D1, D2, stride)
    keep = np.ones(len(m1), bool)
    if conf1 is not None:
        keep &= conf1[m1[:, 1], m1[:, 0]] >= min_conf
    if conf2 is not None:
        keep &= conf2[m2[:, 1], m2[:, 0]] >= min_conf
    return float(keep.sum()) / n_seeds
