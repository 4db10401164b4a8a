"""Gravity from an unposed map's floor plane, with the cameras' down direction as the prior."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.gravity import estimate_gravity

pytestmark = pytest.mark.unit


def _room(rng, n=6000):
    floor = np.c_[rng.uniform(-2, 2, (n, 2)), np.zeros(n)]
    wall = np.c_[rng.uniform(-2, 2, n // 2), np.full(n // 2, 2.0), rng.uniform(0, 2.5, n // 2)]
    clutter = rng.uniform([-1, -1, 0], [1, 1, 1], (n // 4, 3))
    return np.concatenate([floor, wall, clutter])  # z up, gravity (0, 0, -1)


@pytest.mark.parametrize('tilt_deg', [0.0, 10.0, 25.0])
def test_floor_gives_gravity_under_a_tilted_prior(tilt_deg):
    rng = np.random.default_rng(1)
    R = Rotation.from_euler('xyz', [30, -20, 70], degrees=True).as_matrix()
    P = _room(rng) @ R.T
    P += 0.005 * rng.standard_normal(P.shape)
    truth = R @ [0, 0, -1.0]
    prior = Rotation.from_euler('x', tilt_deg, degrees=True).apply(truth)
    g = estimate_gravity(P, prior, inlier_m=0.03)
    assert np.degrees(np.arccos(np.clip(g @ truth, -1, 1))) < 1.0
    assert abs(np.linalg.norm(g) - 1) < 1e-9


def test_no_horizontal_plane_returns_the_prior():
    rng = np.random.default_rng(2)
    blob = rng.standard_normal((2000, 3))
    np.testing.assert_allclose(estimate_gravity(blob, [0, 2.0, 0]), [0, 1, 0])
    np.testing.assert_allclose(estimate_gravity(np.zeros((2, 3)), [0, 1, 0]), [0, 1, 0])
    with pytest.raises(ValueError, match='prior_down'):
        estimate_gravity(blob, [0, 0, 0])
