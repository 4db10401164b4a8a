"""Joint keyframe refinement."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.refine import PairConstraint, refine_keyframe
from ros2_sab3r.geometry.transforms import make_T, pose_distance

pytestmark = pytest.mark.unit


def test_refinement_recovers_pose_and_pair_scales():
    rng = np.random.default_rng(2)
    T_true = make_T(Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix(), [0.5, -0.2, 1.0])
    pairs, scales = [], [0.7, 1.3, 2.0]
    for s in scales:  # Q: points in the new camera at pair scale; Y: the same in the world
        Y = rng.uniform(-2, 2, (300, 3)) + [0, 0, 4]
        Q = (Y - T_true[:3, 3]) @ T_true[:3, :3] / s
        pairs.append(PairConstraint(Q, Y, rng.uniform(1, 5, 300), s * 1.1))
    Y_out = pairs[0].Y_W.copy()
    Y_out[:20] += 1.0  # outliers: the Huber loss must keep them from pulling the pose
    pairs[0] = PairConstraint(pairs[0].Q, Y_out, pairs[0].w, pairs[0].scale)
    T0 = make_T(Rotation.from_rotvec([0.12, -0.17, 0.0]).as_matrix(), [0.6, -0.1, 0.9])
    res = refine_keyframe(T0, pairs, 30, robust_scale=0.02)
    dt, dr = pose_distance(res.T_WC, T_true)
    assert dt < 1e-3 and dr < 0.05
    assert np.allclose(res.scales, scales, rtol=1e-3)
    assert res.iterations <= 30
