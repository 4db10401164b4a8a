"""The metric definitions on cases with known answers."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.eval import metrics
from ros2_sab3r.geometry.boxes import fit_box

pytestmark = pytest.mark.unit


def _pose(rotvec, t):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = t
    return T


@pytest.fixture
def trajectory():
    rng = np.random.default_rng(0)
    return [_pose(rng.normal(0, 0.3, 3), rng.normal(0, 1.0, 3)) for _ in range(8)]


def test_pose_errors_ignore_the_frame_and_scale_of_the_prediction(trajectory):
    G = _pose([0.1, 0.2, 0.3], [1, 2, 3])
    S = 2.5  # unposed maps have their own frame and scale: both must not matter
    pred = []
    for T in trajectory:
        P = G @ T
        P[:3, 3] = S * P[:3, 3]
        pred.append(P)
    e_rot, e_tr = metrics.relative_pose_errors(pred, trajectory)
    assert len(e_rot) == 28 and np.max(e_rot) < 1e-4
    res = metrics.pose_accuracy(e_rot, e_tr)
    assert res['RRA@15'] == res['RTA@15'] == res['mAA(30)'] == 100.0


def test_pose_accuracy_follows_the_paper_formulas():
    e_rot = np.array([5.0, 10.0, 20.0, 40.0])
    e_tr = np.array([1.0, 12.0, 16.0, np.nan])  # NaN: no baseline, left out of RTA
    res = metrics.pose_accuracy(e_rot, e_tr)
    assert res['RRA@15'] == 50.0
    assert res['RTA@15'] == pytest.approx(200 / 3)
    ts = np.arange(1, 31)
    rra = [100 * np.mean(e_rot < t) for t in ts]
    rta = [100 * np.mean(e_tr[:3] < t) for t in ts]
    assert res['mAA(30)'] == pytest.approx(np.mean(np.minimum(rra, rta)))


def test_rotation_error_is_the_angle_of_the_relative_rotation(trajectory):
    noisy = [trajectory[0], trajectory[1] @ _pose([0, 0, np.radians(20)], [0, 0, 0])]
    e_rot, _ = metrics.relative_pose_errors(noisy, trajectory[:2])
    assert e_rot[0] == pytest.approx(20.0, abs=1e-6)


def test_depth_errors_median_scaling():
    gt = np.linspace(1, 5, 100).reshape(10, 10).astype(np.float32)
    gt[0, 0] = np.nan  # no measurement: ignored
    e = metrics.depth_errors(0.5 * gt, gt, 'median')
    assert e['AbsRel'] == pytest.approx(0.0, abs=1e-6) and e['delta<1.25'] == 100.0
    e = metrics.depth_errors(0.5 * gt, gt, 'none')
    assert e['AbsRel'] == pytest.approx(0.5) and e['delta<1.25'] == 0.0
    assert metrics.depth_errors(gt, np.full_like(gt, np.nan)) is None


def test_map_and_locate_perfect_and_swapped_labels():
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 2, (2000, 3))
    L = np.where(X[:, 0] < 1, 3, 5)
    names = {3: 'cabinet', 5: 'chair'}
    res = metrics.map_and_locate(X, L, X, L, names)
    assert res['mIoU'] == 100.0 and res['Acc'] == 100.0 and res['Comp'] == 0.0
    res = metrics.map_and_locate(X, np.where(L == 3, 5, 3), X, L, names)
    assert res['mIoU'] == 0.0 and res['Acc'] == 0.0 and res['Comp'] > 0.2
    half = metrics.map_and_locate(X, np.where(X[:, 1] < 1, L, -1), X, L, names)
    assert 40 < half['Acc'] < 60 and half['Comp'] == 0.0


def test_one_view_alignment_recovers_a_similarity():
    T_gt = _pose([0.2, -0.1, 0.5], [3.0, 2.0, 1.4])
    T_pred = _pose([0.0, 0.3, 0.0], [0.5, 0.0, -0.2])
    s_true = 1.7  # world metres per map unit
    depth_pred = np.random.default_rng(2).uniform(1, 4, (20, 30))
    align = metrics.one_view_alignment(T_gt, T_pred, s_true * depth_pred, depth_pred)
    assert align.s == pytest.approx(s_true)
    x_cam = np.array([[0.3, -0.2, 2.0]])  # a point in the view's camera, map units
    x_map = x_cam @ T_pred[:3, :3].T + T_pred[:3, 3]
    x_world = (s_true * x_cam) @ T_gt[:3, :3].T + T_gt[:3, 3]
    np.testing.assert_allclose(align.points(x_map), x_world, atol=1e-9)
    np.testing.assert_allclose(align.pose(T_pred)[:3, :3], T_gt[:3, :3], atol=1e-9)


def test_locate_outcome():
    P = np.random.default_rng(3).uniform(0, 1, (200, 3))
    gt = metrics.InstanceTruth(7, 'chair', P, P.mean(0), fit_box(P, np.array([0, 0, -1.0])))
    hit = metrics.locate_outcome('chair', P.mean(0) + 0.1, gt.box, [gt], radius_m=0.3)
    assert hit['success'] and hit['box_iou'] > 0.95
    miss = metrics.locate_outcome('chair', P.mean(0) + 1.0, None, [gt], radius_m=0.3)
    assert not miss['success'] and miss['box_iou'] == 0.0
    assert metrics.locate_outcome('bed', None, None, [gt], 0.3)['correct']
    assert not metrics.locate_outcome('bed', P.mean(0), None, [gt], 0.3)['correct']
