"""'lerf' relevancy takes the canonical negatives' largest similarity per voxel from a per-block
cache (mapping.snapshot.BlockMaxCache): answers equal those computed from scratch, before and
after the map changes, and a query that is itself a canonical negative is compared with the
others only."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, config_from_flat
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.query.engine import QueryEngine
from ros2_sab3r.sim.standin import HashTextEncoderStandIn
from ros2_sab3r.types import LocateQuery

pytestmark = pytest.mark.unit

LABELS = ('chair', 'table', 'lamp', 'floor')


def _integrate(m, text, rng, stamp, box):
    """Four objects side by side along x, each voxel's feature its label's embedding + noise."""
    n = 20_000
    X = rng.uniform(*box, (n, 3)).astype(np.float32)
    label = np.clip((X[:, 0] - box[0]) / (box[1] - box[0]) * len(LABELS), 0, 3).astype(int)
    S = text.encode(LABELS)
    S = (S[:, None, :] + 0.02 * rng.normal(size=(len(LABELS), 8, S.shape[1]))).reshape(
        -1, S.shape[1]).astype(np.float32)  # 8 noisy cells per label
    cells = label * 8 + rng.integers(0, 8, n)
    m.integrate(X, np.full(n, 3.0, np.float32), rng.integers(0, 255, (n, 3)).astype(np.uint8),
                stamp, cells, S)


def _engine(text):
    return QueryEngine(config_from_flat({'query.relevancy_mode': 'lerf'}).query, text)


def _expected_relevancy(engine, snap, query):
    negatives = [n for n in engine.cfg.canonical_negatives if n != query]
    sims = snap.cosine(engine.embed([query, *negatives]))
    r = 1.0 / (1.0 + np.exp(np.clip(-(sims[0] - sims[1:].max(0)) / engine.cfg.temperature,
                                     -50, 50)))
    return np.where(snap.clip_weights > 0, r, 0.0)


@pytest.mark.parametrize('codec', ['bf16', 'pca_int8'])
def test_cached_negatives_answer_as_computed_from_scratch(codec):
    text = HashTextEncoderStandIn(32)
    rng = np.random.default_rng(0)
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.05, max_voxels=200_000,
                                       feature_codec=codec, clip_projection_dim=16), clip_dim=32)
    _integrate(m, text, rng, 1, (0.0, 2.0))
    warm = _engine(text)
    for stamp in (2, 3):
        snap = m.snapshot()
        got = warm.locate(snap, LocateQuery(queries=('chair', 'lamp')))
        cold = _engine(text).locate(snap, LocateQuery(queries=('chair', 'lamp')))
        assert [(o.query, o.status, o.score, o.point_count) for o in got.objects] == [
            (o.query, o.status, o.score, o.point_count) for o in cold.objects]
        assert {o.query for o in got.objects if o.status.value == 'FOUND'} == {'chair', 'lamp'}
        np.testing.assert_array_equal(got.relevancy, cold.relevancy)
        want = np.maximum(_expected_relevancy(warm, snap, 'chair'),
                          _expected_relevancy(warm, snap, 'lamp'))
        np.testing.assert_allclose(got.relevancy, want, atol=2e-5)
        _integrate(m, text, rng, stamp, (0.0, 0.5))  # the chair's end of the map changes

    # a canonical negative asked for: compared with the three other negatives only
    snap = m.snapshot()
    obj = warm.locate(snap, LocateQuery(queries=('object',)))
    np.testing.assert_allclose(obj.relevancy, _expected_relevancy(warm, snap, 'object'),
                               atol=2e-5)
