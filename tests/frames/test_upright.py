"""The upright published frame of unposed maps (frames/upright.py), without ROS."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.frames.upright import apply, down_from_odom, upright_transform
from ros2_sab3r.sim.synthetic import look_at

pytestmark = pytest.mark.unit


@pytest.mark.parametrize('down', [(0.0, 1.0, 0.0), (0.1, 0.9, -0.3), (0.0, 0.0, -1.0),
                                  (0.0, 0.0, 1.0), (1e-3, 0.0, 1.0)])
def test_gravity_goes_to_minus_z_by_the_smallest_rotation(down):
    T = upright_transform(np.array(down))
    R = T[:3, :3]
    g = np.asarray(down) / np.linalg.norm(down)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(R @ g, [0, 0, -1], atol=1e-9)
    np.testing.assert_allclose(T[:3, 3], 0.0)  # origin kept
    axis = np.cross(g, [0.0, 0.0, -1.0])
    if np.linalg.norm(axis) > 1e-6:  # the rotation axis is the only fixed direction: the
        # smallest rotation turns by the angle between gravity and -z, no heading change
        angle = np.degrees(np.arccos(np.clip(g @ [0, 0, -1], -1, 1)))
        assert np.degrees(Rotation.from_matrix(R).magnitude()) == pytest.approx(angle)


@pytest.mark.parametrize('down', [None, (0.0, 0.0, 0.0), (np.nan, 1.0, 0.0)])
def test_no_gravity_no_rotation(down):
    assert upright_transform(None if down is None else np.array(down)) is None


def test_a_synthetic_camera_frame_becomes_z_up():
    """An unposed map's frame is its first camera (OpenCV, y down): with gravity from the
    world, the camera's world-up maps to +z and a floor point keeps its height order."""
    T_world_C = look_at(np.array([1.0, 2.0, 1.5]), np.array([3.0, 2.5, 0.2]))
    down_C = T_world_C[:3, :3].T @ np.array([0.0, 0.0, -1.0])
    T_UC = upright_transform(down_C)
    floor = (np.linalg.inv(T_world_C) @ np.array([3.0, 2.5, 0.0, 1.0]))[:3]
    head = (np.linalg.inv(T_world_C) @ np.array([3.0, 2.5, 1.0, 1.0]))[:3]
    z = apply(T_UC, np.stack([floor, head]))[:, 2]
    assert z[1] - z[0] == pytest.approx(1.0, abs=1e-5)


def test_gravity_from_a_z_up_odom():
    R_OC = Rotation.from_euler('xyz', [-90, 0, -90], degrees=True).as_matrix()  # level camera
    T_OC, T_WC = np.eye(4), np.eye(4)
    T_OC[:3, :3] = R_OC
    T_WC[:3, :3] = Rotation.from_euler('x', 20, degrees=True).as_matrix()
    down = down_from_odom(T_WC, T_OC)
    np.testing.assert_allclose(down, T_WC[:3, :3] @ [0.0, 1.0, 0.0], atol=1e-12)  # camera y
