"""Comparison of two maps built from the same frames by backends that differ numerically."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def assert_nearly_the_same_map(map_a, map_b, covered_fraction: float = 0.95,
                               median_distance_m: float = 0.0015,
                               min_clip_cosine: float = 0.98) -> None:
    """Each map covers the other: at least ``covered_fraction`` of either map's voxels have a
    voxel of the other within one voxel size (a point that moves by a millimetre may cross into
    the neighbouring voxel, so exact keys would measure where the voxel borders fall rather than
    the difference); the median distance to that neighbour is under ``median_distance_m``; and
    for voxels with the same key the CLIP cosine is above ``min_clip_cosine``."""
    assert map_a.voxel_size == map_b.voxel_size
    for src, dst in ((map_a, map_b), (map_b, map_a)):
        dist, _ = cKDTree(dst.positions).query(src.positions)
        assert np.mean(dist < src.voxel_size) >= covered_fraction, np.mean(dist < src.voxel_size)
        assert np.median(dist) < median_distance_m, np.median(dist)
    shared, i_a, i_b = np.intersect1d(map_a.keys, map_b.keys, return_indices=True)
    assert len(shared) >= 0.5 * max(map_a.n_voxels, map_b.n_voxels), len(shared)
    a, b = map_a.features('clip')[i_a], map_b.features('clip')[i_b]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > min_clip_cosine, cos.min()
