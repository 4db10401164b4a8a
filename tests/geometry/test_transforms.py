"""Transforms of located objects into another frame."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.transforms import transform_located
from ros2_sab3r.types import LocatedObject, OrientedBox

pytestmark = pytest.mark.unit


def test_transform_located_moves_every_geometric_field():
    box = OrientedBox(center=np.array([1.0, 2.0, 0.5]),
                      quat_xyzw=Rotation.from_euler('z', 30, degrees=True).as_quat(),
                      size=np.array([0.8, 0.4, 1.0]))
    obj = LocatedObject(query='dresser', label='dresser', status='FOUND', score=0.83,
                        centroid=np.array([1.0, 2.0, 0.5]), box=box,
                        points=np.array([[1.0, 2.0, 0.5], [1.1, 2.0, 0.4]], np.float32))
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('z', 90, degrees=True).as_matrix()
    T[:3, 3] = [0.0, 0.0, 1.0]
    moved = transform_located(obj, T)
    np.testing.assert_allclose(moved.centroid, [-2.0, 1.0, 1.5], atol=1e-9)
    np.testing.assert_allclose(moved.box.center, [-2.0, 1.0, 1.5], atol=1e-9)
    np.testing.assert_allclose(moved.points, [[-2.0, 1.0, 1.5], [-2.0, 1.1, 1.4]], atol=1e-6)
    assert moved.points.dtype == np.float32
    yaw = Rotation.from_quat(moved.box.quat_xyzw).as_euler('xyz', degrees=True)[2]
    assert yaw == pytest.approx(120.0)
    np.testing.assert_array_equal(moved.box.size, [0.8, 0.4, 1.0])
    assert transform_located(LocatedObject(query='q', label='q', status='NOT_FOUND', score=0.0),
                             T).centroid is None
