"""Comparison of two maps built from the same frames by backends that differ numerically."""

from __future__ import annotations

import numpy as np


def assert_nearly_the_same_map(map_a, map_b, shared_fraction: float = 0.8,
                               median_distance_m: float = 0.0015,
                               min_clip_cosine: float = 0.98) -> None:
    """At least ``shared_fraction`` of the voxels shared; for those, median position
    difference under ``median_distance_m`` (a shared voxel's means are always within one voxel:
    the typical distance is what says something) and CLIP cosine above ``min_clip_cosine``."""
    shared, i_a, i_b = np.intersect1d(map_a.keys, map_b.keys, return_indices=True)
    assert len(shared) >= shared_fraction * max(map_a.n_voxels, map_b.n_voxels)
    dist = np.linalg.norm(map_a.positions[i_a] - map_b.positions[i_b], axis=-1)
    assert np.median(dist) < median_distance_m, np.median(dist)
    a, b = map_a.features('clip')[i_a], map_b.features('clip')[i_b]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > min_clip_cosine, cos.min()
