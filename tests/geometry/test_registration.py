"""Similarity registration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.registration import RegistrationError, umeyama

pytestmark = pytest.mark.unit


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(200, 3))
    R = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    dst = 1.7 * src @ R.T + [1.0, 2.0, 3.0]
    sim = umeyama(src, dst)
    assert abs(sim.s - 1.7) < 1e-9 and np.allclose(sim.R, R) and sim.rmse < 1e-9
    with pytest.raises(RegistrationError):
        umeyama(np.zeros((10, 3)), dst[:10])
    with pytest.raises(RegistrationError):
        umeyama(src[:2], dst[:2])
