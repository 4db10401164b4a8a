"""Locate's relevancy modes: 'official' against a float64 reference of the SAB3R demo's formula,
per-request choice of the mode, validation."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, QueryConfig, config_from_flat
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.query.engine import LocateError, QueryEngine, validate_query
from ros2_sab3r.types import LocateQuery

pytestmark = pytest.mark.unit

VOXEL = 0.1
DIM = 16


class FixedTextEncoder:
    """Known text vectors (not unit norm: the engine must normalise them); other texts (the
    canonical negatives) get a fixed random vector each."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    @property
    def dim(self) -> int:
        return DIM

    def encode(self, texts):
        return np.stack([self.vectors[t] if t in self.vectors else
                         np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM)
                         for t in texts]).astype(np.float32)


@pytest.fixture(scope='module')
def scene():
    """A 12x6x3 slab of voxels: CLIP features F_i = 3u + a_i m + noise, a_i rising along x.

    'mug' (direction m) is most similar at large x; 'room' (direction u) is similar everywhere,
    so the demo's raw-cosine percentile exceeds 0.75 for it. Every 7th voxel has no feature.
    """
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
    m, u = basis[:, 0], basis[:, 1]
    ijk = np.stack(np.meshgrid(np.arange(12), np.arange(6), np.arange(3), indexing='ij'),
                   -1).reshape(-1, 3)
    X = (ijk + 0.5) * VOXEL
    a = 1.5 * ijk[:, 0] / 11.0 + 0.1 * rng.standard_normal(len(ijk))
    F = 3.0 * u + a[:, None] * m + 0.15 * rng.standard_normal((len(ijk), DIM))
    cells = np.where(np.arange(len(ijk)) % 7 == 3, -1, np.arange(len(ijk)))
    vmap = SemanticVoxelMap(MappingConfig(voxel_size_m=VOXEL), clip_dim=DIM)
    vmap.integrate(X.astype(np.float32), np.full(len(X), 5.0, np.float32),
                   np.zeros((len(X), 3), np.uint8), 1, cells, F.astype(np.float32))
    snap = vmap.snapshot()
    # Row of the snapshot -> index of the voxel above.
    rows = np.floor(snap.positions / VOXEL).astype(int) @ np.array([18, 3, 1])
    encoder = FixedTextEncoder({'mug': 2.0 * m, 'room': 0.5 * u + 0.01 * m,
                                'nothing': basis[:, 2]})
    return snap, rows, F, cells >= 0, encoder


def reference(F, has, t, threshold):
    """float64 demo formula: (relevancy per voxel, selection, cut, tolerance).

    The map keeps features in bfloat16 and rounds the cosines to it (~4e-3 at a cosine of 0.9,
    on a voxel and on the min and the max); min-max normalisation divides that by the cosines'
    range (the tolerance).
    """
    cos = (F @ t) / (np.linalg.norm(F, axis=1) * np.linalg.norm(t))
    vals = cos[has]
    rel = np.where(has, (cos - vals.min()) / (vals.max() - vals.min()), 0.0)
    cut = max(np.percentile(vals, 0.9), threshold)
    return rel, has & (rel >= cut), cut, 1e-2 / (vals.max() - vals.min())


def member_rows(res, rows_of_snapshot):
    """Voxel indices (of the scene) in the answer's objects."""
    out = set()
    for obj in res.objects:
        if obj.points is not None:
            out |= set((np.floor(obj.points / VOXEL).astype(int) @ np.array([18, 3, 1])).tolist())
    return out


@pytest.mark.parametrize('text', ['mug', 'room'])
def test_official_mode_matches_the_float64_formula(scene, text):
    snap, rows, F, has, encoder = scene
    cfg = QueryConfig(relevancy_mode='official', min_instance_voxels=1, default_top_k=100)
    res = QueryEngine(cfg, encoder).locate(snap, LocateQuery(queries=(text,)))
    rel, selected, cut, tol = reference(F, has, encoder.vectors[text], cfg.official_threshold)
    if text == 'room':
        assert cut > 0.8  # the demo's percentile, not the threshold, decides here
    else:
        assert cut == 0.75
    assert tol < 0.1
    np.testing.assert_allclose(res.relevancy, rel[rows], rtol=0, atol=tol)
    assert (res.relevancy[~has[rows]] == 0).all()
    clear = np.abs(rel - cut) > tol  # leave out voxels at the cut
    got = member_rows(res, rows)
    want = set(np.flatnonzero(selected & clear).tolist())
    assert want and want <= got
    assert not got & set(np.flatnonzero(~selected & clear).tolist())
    assert 'official relevancy' in res.message


def test_request_mode_beats_the_parameter(scene):
    snap, _, _, _, encoder = scene
    lerf = QueryEngine(QueryConfig(relevancy_mode='lerf'), encoder)
    official = QueryEngine(QueryConfig(relevancy_mode='official'), encoder)
    q = LocateQuery(queries=('mug',))
    by_request = lerf.locate(snap, LocateQuery(queries=('mug',), relevancy_mode='official'))
    by_param = official.locate(snap, q)
    np.testing.assert_array_equal(by_request.relevancy, by_param.relevancy)
    back = official.locate(snap, LocateQuery(queries=('mug',), relevancy_mode='lerf'))
    np.testing.assert_array_equal(back.relevancy, lerf.locate(snap, q).relevancy)
    assert np.abs(by_request.relevancy - back.relevancy).max() > 0.2
    assert 'lerf relevancy' in back.message and 'official relevancy' in by_request.message


def test_official_threshold_and_request_min_score(scene):
    snap, _, _, _, encoder = scene

    def n_points(engine, **kw):
        res = engine.locate(snap, LocateQuery(queries=('mug',), top_k=100, **kw))
        return sum(o.point_count for o in res.objects)

    loose = QueryEngine(QueryConfig(relevancy_mode='official', official_threshold=0.5,
                                    min_instance_voxels=1), encoder)
    strict = QueryEngine(QueryConfig(relevancy_mode='official', official_threshold=0.9,
                                     min_instance_voxels=1), encoder)
    assert n_points(loose) > n_points(strict) > 0
    assert n_points(loose, min_score=0.9) == n_points(strict)  # the request's min_score wins


def test_official_not_found_rests_on_the_instance_size(scene):
    snap, _, _, _, encoder = scene
    q = LocateQuery(queries=('mug', 'nothing'))
    # 'nothing' is unrelated to every voxel, yet min-max normalisation puts its most similar
    # voxels at the top: with the default instance size they form groups, and it is FOUND
    # (LERF relevancy, against the negatives, says NOT_FOUND).
    official = QueryEngine(QueryConfig(relevancy_mode='official'), encoder)
    res = official.locate(snap, LocateQuery(queries=('nothing',)))
    assert res.relevancy.max() == pytest.approx(1.0)
    assert res.objects[0].status == 'FOUND'
    lerf = QueryEngine(QueryConfig(relevancy_mode='lerf'), encoder).locate(
        snap, LocateQuery(queries=('nothing',)))
    assert [o.status for o in lerf.objects] == ['NOT_FOUND']
    # Only a larger query.min_instance_voxels than its groups turns it into NOT_FOUND, while the
    # one connected group of the real object survives.
    strict = QueryEngine(QueryConfig(relevancy_mode='official', min_instance_voxels=30),
                         encoder)
    objects = strict.locate(snap, q).objects
    assert [(o.query, o.status) for o in objects] == [('mug', 'FOUND'), ('nothing', 'NOT_FOUND')]
    assert objects[0].score >= 0.75 and objects[0].point_count >= 30


def test_bad_relevancy_mode_is_refused():
    cfg = QueryConfig(relevancy_mode='lerf')
    assert validate_query(LocateQuery(queries=('mug',), relevancy_mode=' Official '),
                          cfg).relevancy_mode == 'official'
    assert validate_query(LocateQuery(queries=('mug',)), cfg).relevancy_mode == ''
    with pytest.raises(LocateError, match=r"relevancy_mode='clip' is not one of 'lerf', "
                                          r"'official'.*query.relevancy_mode='lerf'"):
        validate_query(LocateQuery(queries=('mug',), relevancy_mode='clip'), cfg)
    with pytest.raises(LocateError, match='relevancy_mode must be a string'):
        validate_query(LocateQuery(queries=('mug',), relevancy_mode=None), cfg)
    with pytest.raises(ValueError, match='query.relevancy_mode'):
        config_from_flat({'query.relevancy_mode': 'clip'})
    with pytest.raises(ValueError, match='query.official_threshold'):
        config_from_flat({'query.official_threshold': 1.5})
