"""Oriented boxes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.boxes import box_iou, fit_box
from ros2_sab3r.types import OrientedBox

pytestmark = pytest.mark.unit


def test_box_fit_upright_and_iou():
    rng = np.random.default_rng(0)
    yaw = 0.4
    q = Rotation.from_euler('z', yaw).as_quat()
    gt = OrientedBox(np.array([1.0, 2.0, 0.5]), q, np.array([2.0, 1.0, 0.4]))
    local = rng.uniform(-0.5, 0.5, (2000, 3)) * gt.size
    pts = local @ gt.rotation().T + gt.center
    box = fit_box(pts, gravity=np.array([0, 0, -1.0]))
    assert box_iou(box, gt) > 0.9
    assert box_iou(fit_box(pts), gt) > 0.8  # PCA without gravity
    assert box_iou(gt, gt) > 0.99
    far = OrientedBox(gt.center + 10, q, gt.size)
    assert box_iou(gt, far) == 0.0
    assert np.all(fit_box(pts[:1], min_size=0.05).size >= 0.05)
