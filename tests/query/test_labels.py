"""Labelling voxels for the published map."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

pytestmark = pytest.mark.unit


def test_label_voxels_picks_the_closest_label_and_skips_featureless_voxels():
    from ros2_sab3r.query.labels import NO_LABEL, label_voxels

    rng = np.random.default_rng(0)
    E = np.linalg.qr(rng.standard_normal((16, 3)))[0].T.astype(np.float32)  # 3 unit labels
    X = np.stack([np.arange(30) * 0.2, np.zeros(30), np.zeros(30)], 1)
    truth = np.arange(30) % 3
    S = E[truth] + 0.05 * rng.standard_normal((30, 16)).astype(np.float32)
    cells = np.where(np.arange(30) < 27, np.arange(30), -1)  # the last 3 points: no feature
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.1), clip_dim=16)
    m.integrate(X, np.full(30, 5.0, np.float32), np.zeros((30, 3), np.uint8), 1, cells, S, None)
    snap = m.snapshot()
    labels, scores = label_voxels(snap, E, temperature=0.05)
    order = np.argsort(snap.positions[:, 0])
    assert list(labels[order][:27]) == list(truth[:27])
    assert (labels[order][27:] == NO_LABEL).all() and (scores[order][27:] == 0).all()
    assert (scores[order][:27] > 0.9).all() and (scores <= 1.0).all()
    empty = SemanticVoxelMap(MappingConfig(), clip_dim=16).snapshot()
    assert [len(a) for a in label_voxels(empty, E, 0.05)] == [0, 0]
