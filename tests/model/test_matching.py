"""Fast reciprocal nearest neighbours against a direct transcription of the algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ros2_sab3r.model.matching import (
    Matches,
    drop_border_matches,
    fast_reciprocal_nns,
    reciprocal_seeds,
)

pytestmark = pytest.mark.unit


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _reference(d1, d2, subsample=8, max_iter=10):
    """Loop-by-loop version of the spec (section 7), one seed at a time."""
    h1, w1, _ = d1.shape
    h2, w2, _ = d2.shape
    f1, f2 = d1.reshape(-1, d1.shape[2]), d2.reshape(-1, d2.shape[2])
    seeds = sorted({x + w1 * y for y in range(subsample // 2, h1, subsample)
                    for x in range(subsample // 2, w1, subsample)})
    pairs = set()
    for s in seeds:
        xy1, xy2 = s, -1
        for _ in range(max_iter):
            new2 = int(np.argmax(f2 @ f1[xy1]))
            if new2 == xy2:
                pairs.add((xy1, xy2))
                break
            xy2 = new2
            new1 = int(np.argmax(f1 @ f2[xy2]))
            if new1 == xy1:
                pairs.add((xy1, xy2))
                break
            xy1 = new1
    pairs = sorted(pairs)
    xy1 = np.array([[p % w1, p // w1] for p, _ in pairs]).reshape(-1, 2)
    xy2 = np.array([[q % w2, q // w2] for _, q in pairs]).reshape(-1, 2)
    return xy1, xy2


def test_seed_grid():
    np.testing.assert_array_equal(reciprocal_seeds((16, 24), 8), [4 * 24 + 4, 4 * 24 + 12,
                                                                 4 * 24 + 20, 12 * 24 + 4,
                                                                 12 * 24 + 12, 12 * 24 + 20])


def test_recovers_a_known_shift():
    rng = np.random.default_rng(0)
    d1 = _unit(rng.normal(size=(40, 56, 24)))
    d2 = np.roll(d1, shift=(3, -5), axis=(0, 1))  # pixel (x, y) in 1 -> (x - 5, y + 3) in 2
    m = fast_reciprocal_nns(d1, d2)
    assert len(m) == 5 * 7
    np.testing.assert_array_equal(m.xy2[:, 0], (m.xy1[:, 0] - 5) % 56)
    np.testing.assert_array_equal(m.xy2[:, 1], (m.xy1[:, 1] + 3) % 40)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_matches_reference_on_smooth_descriptors(seed):
    rng = np.random.default_rng(seed)
    # Smooth low-dimensional fields make walks longer than one round trip.
    base = rng.normal(size=(6, 8, 4))
    d1 = _unit(np.kron(base, np.ones((5, 5, 1)))[:, :, :] + 0.3 * rng.normal(size=(30, 40, 4)))
    d2 = _unit(np.kron(base, np.ones((5, 5, 1))) + 0.3 * rng.normal(size=(30, 40, 4)))
    m = fast_reciprocal_nns(d1, d2, subsample=4, block_size=97)
    ref1, ref2 = _reference(d1, d2, subsample=4)
    np.testing.assert_array_equal(m.xy1, ref1)
    np.testing.assert_array_equal(m.xy2, ref2)
    assert m.xy1.dtype == np.int64


def test_accepts_tensors_and_different_sizes():
    gen = torch.Generator().manual_seed(0)
    d1 = torch.nn.functional.normalize(torch.randn(24, 32, 8, generator=gen), dim=-1)
    d2 = torch.nn.functional.normalize(torch.randn(16, 40, 8, generator=gen), dim=-1)
    m = fast_reciprocal_nns(d1, d2)
    ref1, ref2 = _reference(d1.numpy(), d2.numpy())
    np.testing.assert_array_equal(m.xy1, ref1)
    np.testing.assert_array_equal(m.xy2, ref2)
    assert (m.xy2[:, 0] < 40).all() and (m.xy2[:, 1] < 16).all()


def test_drop_border_matches():
    m = Matches(xy1=np.array([[3, 3], [2, 5], [10, 10], [5, 5]]),
                xy2=np.array([[4, 4], [5, 5], [12, 7], [5, 17]]))
    kept = drop_border_matches(m, (20, 20), (20, 15))
    np.testing.assert_array_equal(kept.xy1, [[3, 3]])
