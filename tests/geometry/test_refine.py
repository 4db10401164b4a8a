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


def test_window_pairs_become_constraints_and_refine_the_pose():
    from ros2_sab3r.config import GeometryConfig
    from ros2_sab3r.geometry.refine import pair_constraints, refine_against_window
    from ros2_sab3r.geometry.transforms import apply, invert
    from ros2_sab3r.types import PosedKeyframe, ViewPrediction

    rng = np.random.default_rng(3)
    H, W = 24, 32
    T_i = make_T(Rotation.from_rotvec([0.05, 0.1, 0.0]).as_matrix(), [0.3, 0.0, 0.1])
    pairs = []
    for s, shift in ((0.5, 0.0), (2.0, 0.4)):
        T_j = make_T(np.eye(3), [shift, 0.1, 0.0])
        X_j = (rng.uniform(-1, 1, (H, W, 3)) + [0, 0, 3]).astype(np.float32)
        C = np.full((H, W), 2.0, np.float32)
        kf = PosedKeyframe(keyframe_id=0, stamp_ns=0, frame_id='cam', T_WC=T_j, K=np.eye(3),
                           X=X_j, C=C, rgb=np.zeros((H, W, 3), np.uint8))
        Q = apply(invert(T_i) @ T_j, X_j.astype(np.float64)) / s  # j's points seen from i
        view2 = ViewPrediction(X=Q.astype(np.float32), C=C, D=np.zeros((H, W, 24), np.float32),
                               D_conf=C)
        pairs.append((kf, view2, s * 1.05))
    cfg = GeometryConfig(max_points_per_pair=400, refine_iterations=30)
    constraints = pair_constraints(pairs, cfg)
    assert [len(c.Q) for c in constraints] == [100, 100]  # an even share of the point budget
    res = refine_against_window(T_i @ make_T(np.eye(3), [0.02, 0, 0]), pairs, cfg, depth=3.0)
    dt, dr = pose_distance(res.T_WC, T_i)
    assert dt < 1e-3 and dr < 0.05
    assert np.allclose(res.scales, [0.5, 2.0], rtol=1e-3)
