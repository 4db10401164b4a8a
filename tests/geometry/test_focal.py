"""Focal length from a pointmap."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.geometry.focal import estimate_focal
from ros2_sab3r.sim.synthetic import make_scene

pytestmark = pytest.mark.unit


def test_focal_from_pointmap():
    f = make_scene(1).sequence(1, 128, 96)[0]
    from ros2_sab3r.sim.synthetic import backproject
    est = estimate_focal(backproject(f.depth, f.K))
    assert abs(est - f.K[0, 0]) / f.K[0, 0] < 1e-3
    with pytest.raises(ValueError, match='CameraInfo'):
        estimate_focal(np.full((8, 8, 3), np.nan, np.float32))
