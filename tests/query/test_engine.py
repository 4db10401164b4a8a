"""The Locate query engine."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, QueryConfig
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.query.engine import LocateError, QueryEngine, validate_query
from ros2_sab3r.types import LocateQuery
from tests.doubles import HashTextEncoderDouble

pytestmark = pytest.mark.unit


def test_query_engine_validation_and_cache():
    te = HashTextEncoderDouble(16)
    engine = QueryEngine(QueryConfig(), te)
    empty = SemanticVoxelMap(MappingConfig(), clip_dim=16).snapshot()
    with pytest.raises(LocateError, match='empty'):
        engine.locate(empty, LocateQuery(queries=('chair',)))
    with pytest.raises(LocateError, match='labels'):
        engine.validate(LocateQuery(queries=('a', 'b'), labels=('x',)))
    with pytest.raises(LocateError):
        engine.validate(LocateQuery(queries='chair'))
    engine.embed(['chair', 'bed'])
    calls = te.calls
    E = engine.embed(['bed', 'chair'])
    assert te.calls == calls and E.shape == (2, 16)
    assert np.allclose(np.linalg.norm(E, axis=1), 1.0)


def test_query_finds_a_labelled_blob_and_not_the_rest():
    te = HashTextEncoderDouble(64)
    cfg = MappingConfig(voxel_size_m=0.1, max_voxels=10_000)
    m = SemanticVoxelMap(cfg, clip_dim=64, gravity=np.array([0, 0, -1.0]))
    g = np.stack(np.meshgrid(*[np.arange(0, 1, 0.1)] * 3, indexing='ij'), -1).reshape(-1, 3)
    X = np.concatenate([g + [0.05, 0.05, 0.05], g + [3.05, 0.05, 0.05]]).astype(np.float32)
    S = te.encode(['mug', 'wall'])
    cells = np.repeat([0, 1], len(g))
    m.integrate(X, np.full(len(X), 5.0), np.zeros((len(X), 3), np.uint8), 1, cells, S)
    engine = QueryEngine(QueryConfig(), te)
    res = engine.locate(m.snapshot(), LocateQuery(queries=('mug', 'sofa')))
    mug, sofa = res.objects
    assert mug.status == 'FOUND' and mug.point_count == len(g)
    assert np.allclose(mug.centroid, [0.5, 0.5, 0.5], atol=1e-5)
    assert np.allclose(np.sort(mug.box.size), [0.9, 0.9, 0.9], atol=1e-5)
    assert sofa.status == 'NOT_FOUND'


def test_validate_query_is_shared_with_the_engine():
    cfg = QueryConfig(max_queries=2)
    q = validate_query(LocateQuery(queries=('  red   chair ',)), cfg)
    assert q.queries == ('red chair',)
    with pytest.raises(LocateError, match='query.max_queries=2'):
        validate_query(LocateQuery(queries=('a', 'b', 'c')), cfg)
    with pytest.raises(LocateError, match='empty'):
        QueryEngine(cfg, HashTextEncoderDouble(8)).validate(LocateQuery(queries=(' ',)))
