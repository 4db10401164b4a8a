"""The synthetic scene renderer."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.sim.synthetic import make_scene

pytestmark = pytest.mark.unit


def test_synthetic_scene_is_deterministic_and_consistent():
    a = make_scene(3).sequence(2, 64, 48)
    b = make_scene(3).sequence(2, 64, 48)
    assert np.array_equal(a[1].rgb, b[1].rgb) and np.array_equal(a[1].depth, b[1].depth)
    f = a[0]
    assert f.rgb.std() > 10  # textured, not flat
    assert f.semantic.shape == f.depth.shape == f.instance.shape == (48, 64)
    assert np.isfinite(f.depth).all() and (f.depth > 0).all()
