"""Descriptor overlap."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.geometry.matching import overlap_ratio

pytestmark = pytest.mark.unit


def test_overlap_ratio_self_vs_random():
    rng = np.random.default_rng(0)
    D = rng.normal(size=(48, 64, 24)).astype(np.float32)
    D /= np.linalg.norm(D, axis=-1, keepdims=True)
    assert overlap_ratio(D, D, 8) == 1.0
    E = rng.normal(size=(48, 64, 24)).astype(np.float32)
    E /= np.linalg.norm(E, axis=-1, keepdims=True)
    half = np.concatenate([D[:, 32:], E[:, 32:]], axis=1)  # right half of D, then new content
    conf = np.concatenate([np.full((48, 32), 5.0), np.ones((48, 32))], axis=1)
    r = overlap_ratio(D, half, 8, np.full((48, 64), 5.0), conf, 1.5)
    assert 0.3 <= r <= 0.6
    assert overlap_ratio(D, E, 8, None, np.ones((48, 64)), 1.5) == 0.0
    assert overlap_ratio(np.full_like(D, np.nan), D, 8) == 0.0
