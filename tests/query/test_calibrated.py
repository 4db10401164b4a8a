"""Calibrated Locate ('calibrated' relevancy): FOUND / NOT_FOUND independent of the absolute
cosine scale, reasons in the answer, one object one instance, upright boxes in unposed maps.

Maps are built directly: surfaces of boxes sampled as points, each point's CLIP feature the
CLIP-like stand-in's pixel feature of its class plus noise, DINO a vector per object."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, QueryConfig
from ros2_sab3r.geometry.boxes import box_iou
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.query.engine import EmptyMapError, QueryEngine
from ros2_sab3r.sim.standin import ClipLikeTextEncoderStandIn, HashTextEncoderStandIn
from ros2_sab3r.types import LocateQuery, LocateStatus, OrientedBox

pytestmark = pytest.mark.unit

VOXEL = 0.05


def _surface(lo, hi, step=0.025):
    """Points on the faces of the axis-aligned box [lo, hi] (z up), without its bottom."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    axes = [np.arange(lo[k], hi[k] + 1e-9, step) for k in range(3)]
    pts = []
    for k in range(3):
        others = [axes[j] for j in range(3) if j != k]
        g = np.stack(np.meshgrid(*others, indexing='ij'), -1).reshape(-1, 2)
        for v in ((lo[k], hi[k]) if k != 2 else (hi[k],)):
            p = np.insert(g, k, v, axis=1)
            pts.append(p)
    return np.concatenate(pts)


def build_map(objects, encoder, noise=0.5, seed=0, floor=True, to_camera=True):
    """objects: [(class name, lo, hi)]; a 4x4 m floor under them. Returns (snapshot, boxes).

    to_camera: express the map in an OpenCV camera frame looking level (y down), as an
    unposed map is, so gravity is unknown to the map."""
    rng = np.random.default_rng(seed)
    X, F, D = [], [], []
    dino = {}
    parts = [('floor', (-2, -2, -0.05), (2, 2, 0.0))] if floor else []
    for k, (name, lo, hi) in enumerate(parts + list(objects)):
        P = _surface(lo, hi)
        feat = encoder.pixel_feature(name) if hasattr(encoder, 'pixel_feature') else \
            encoder.encode([name])[0]
        X.append(P)
        F.append(feat + noise / np.sqrt(len(feat)) * rng.standard_normal((len(P), len(feat))))
        v = np.random.default_rng(100 + k).standard_normal(16)
        dino[k] = v / np.linalg.norm(v)
        D.append(dino[k] + 0.1 * rng.standard_normal((len(P), 16)))
    X, F, D = np.concatenate(X), np.concatenate(F), np.concatenate(D)
    # world z-up -> camera (x right, y down, z forward): x_c = x, y_c = -z, z_c = y
    R = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float) if to_camera else np.eye(3)
    Xc = X @ R.T
    vmap = SemanticVoxelMap(MappingConfig(voxel_size_m=VOXEL), clip_dim=encoder.dim)
    cells = np.arange(len(X))
    vmap.integrate(Xc.astype(np.float32), np.full(len(X), 5.0, np.float32),
                   np.zeros((len(X), 3), np.uint8), 1, cells, F.astype(np.float32),
                   D.astype(np.float32))
    boxes = {}
    for name, lo, hi in objects:
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        boxes.setdefault(name, []).append(OrientedBox(
            center=R @ ((lo + hi) / 2), quat_xyzw=np.array([0.0, 0, 0, 1]),
            size=np.abs(R @ (hi - lo))))
    return vmap.snapshot(), boxes


ROOM = [('sofa', (-1.5, 0.5, 0), (0.3, 1.4, 0.8)), ('lamp', (1.0, 1.0, 0), (1.3, 1.3, 1.5)),
        ('table', (-0.5, -1.2, 0), (0.7, -0.4, 0.75)), ('chair', (1.0, -1.5, 0),
                                                           (1.5, -1.0, 0.9))]


@pytest.fixture(scope='module')
def cliplike_room():
    enc = ClipLikeTextEncoderStandIn()
    snap, boxes = build_map(ROOM, enc)
    return snap, boxes, QueryEngine(QueryConfig(), enc)


def _by_query(result):
    out = {}
    for o in result.objects:
        out.setdefault(o.query, []).append(o)
    return out


def test_present_found_absent_not_found_with_reasons(cliplike_room):
    snap, boxes, engine = cliplike_room
    assert engine.cfg.relevancy_mode == 'calibrated'
    res = _by_query(engine.locate(snap, LocateQuery(
        queries=('sofa', 'lamp', 'table', 'chair', 'refrigerator', 'toilet', 'window'))))
    for name in ('sofa', 'lamp', 'table', 'chair'):
        found = [o for o in res[name] if o.status == LocateStatus.FOUND]
        assert len(found) == 1, (name, [(o.status, o.reason) for o in res[name]])
        assert 'beats' in found[0].reason and 0.62 <= found[0].score <= 1.0
        assert box_iou(found[0].box, boxes[name][0]) >= 0.75, name
    for name in ('refrigerator', 'toilet', 'window'):
        assert [o.status for o in res[name]] == [LocateStatus.NOT_FOUND], name
        assert res[name][0].reason and res[name][0].score == 0.0


def test_decision_does_not_depend_on_the_cosine_scale():
    """The same room with pixel features 3x closer to their text (cosines ~0.9 instead of 0.3)
    gives the same statuses: the decision is relative to the vocabulary."""
    statuses = []
    for cos in (0.3, 0.9):
        enc = ClipLikeTextEncoderStandIn(pixel_text_cosine=cos)
        snap, _ = build_map(ROOM, enc)
        res = QueryEngine(QueryConfig(), enc).locate(
            snap, LocateQuery(queries=('sofa', 'lamp', 'refrigerator', 'toilet'), top_k=1))
        statuses.append([o.status for o in res.objects])
    assert statuses[0] == statuses[1] == ['FOUND', 'FOUND', 'NOT_FOUND', 'NOT_FOUND']
    # LERF's absolute softmax temperature does depend on it: the same absent query flips
    lerf = []
    for cos in (0.3, 0.9):
        enc = ClipLikeTextEncoderStandIn(pixel_text_cosine=cos)
        snap, _ = build_map(ROOM, enc)
        res = QueryEngine(QueryConfig(relevancy_mode='lerf'), enc).locate(
            snap, LocateQuery(queries=('sofa',), top_k=1))
        lerf.append(res.objects[0].score)
    assert abs(lerf[0] - lerf[1]) > 0.01


def test_near_synonym_finds_the_object(cliplike_room):
    snap, _, engine = cliplike_room
    res = _by_query(engine.locate(snap, LocateQuery(queries=('couch', 'sofa'), top_k=1)))
    assert res['couch'][0].status == res['sofa'][0].status == LocateStatus.FOUND
    np.testing.assert_allclose(res['couch'][0].centroid, res['sofa'][0].centroid, atol=0.05)
    # a caller's negative that is the query's synonym does not compete with it
    res = engine.locate(snap, LocateQuery(queries=('sofa',), negatives=('couch',), top_k=1))
    assert res.objects[0].status == LocateStatus.FOUND
    # a related query loses where a vocabulary word fits better: no 'chair' on the sofa (x < 0)
    res = engine.locate(snap, LocateQuery(queries=('chair',), top_k=5))
    assert not any(o.status == LocateStatus.FOUND and o.centroid[0] < 0 for o in res.objects)


def test_map_with_one_object():
    enc = ClipLikeTextEncoderStandIn()
    snap, boxes = build_map([('lamp', (0, 0, 0), (0.3, 0.3, 1.5))], enc)
    engine = QueryEngine(QueryConfig(), enc)
    res = _by_query(engine.locate(snap, LocateQuery(queries=('lamp', 'sofa', 'bed'))))
    assert [o.status for o in res['lamp']] == [LocateStatus.FOUND]
    assert box_iou(res['lamp'][0].box, boxes['lamp'][0]) >= 0.75
    assert res['sofa'][0].status == res['bed'][0].status == LocateStatus.NOT_FOUND


def test_only_floor_and_empty_map():
    enc = ClipLikeTextEncoderStandIn()
    snap, _ = build_map([], enc)
    engine = QueryEngine(QueryConfig(), enc)
    res = engine.locate(snap, LocateQuery(queries=('chair', 'lamp')))
    assert [o.status for o in res.objects] == [LocateStatus.NOT_FOUND] * 2
    empty = SemanticVoxelMap(MappingConfig(voxel_size_m=VOXEL), clip_dim=enc.dim).snapshot()
    with pytest.raises(EmptyMapError, match='empty'):
        engine.locate(empty, LocateQuery(queries=('chair',)))


@pytest.mark.parametrize('encoder', [ClipLikeTextEncoderStandIn(), HashTextEncoderStandIn()],
                         ids=['cliplike', 'hash'])
def test_class_present_twice_two_instances_both_found(encoder):
    objects = [('chair', (-1.0, -1.0, 0), (-0.5, -0.5, 0.9)),
               ('chair', (1.0, 0.5, 0), (1.5, 1.0, 0.9)),
               ('table', (-0.3, -0.3, 0), (0.6, 0.3, 0.75))]
    snap, boxes = build_map(objects, encoder)
    res = QueryEngine(QueryConfig(), encoder).locate(snap, LocateQuery(queries=('chair',)))
    found = [o for o in res.objects if o.status == LocateStatus.FOUND]
    assert len(found) == 2, [(o.status, o.reason) for o in res.objects]
    ious = sorted(max(box_iou(o.box, b) for o in found) for b in boxes['chair'])
    assert ious[0] >= 0.75


def test_small_fragment_of_the_query_elsewhere_is_dropped():
    enc = HashTextEncoderStandIn()
    objects = [('sofa', (-1.5, 0.5, 0), (0.3, 1.4, 0.8)),
               ('sofa', (1.5, -1.5, 0), (1.6, -1.4, 0.1))]
    snap, _ = build_map(objects, enc)

    def found(**cfg):
        res = QueryEngine(QueryConfig(**cfg), enc).locate(snap, LocateQuery(queries=('sofa',)))
        return sorted(o.point_count for o in res.objects if o.status == LocateStatus.FOUND)

    kept = found(min_relative_size=0.0)
    assert len(kept) == 2 and kept[0] < 0.1 * kept[1]
    assert found() == kept[1:]


def test_one_object_split_by_a_gap_is_merged():
    """A lamp in two parts 10 cm apart (less than query.merge_gap_m): one object when the parts'
    DINO features agree, two when they differ or merging is off."""
    enc = HashTextEncoderStandIn()
    parts = [('lamp', (0, 0, 0), (0.3, 0.3, 0.6)), ('lamp', (0, 0, 0.7), (0.3, 0.3, 1.2))]
    snap, _ = build_map(parts, enc)  # one DINO vector per entry: the parts look different

    def found(**cfg):
        res = QueryEngine(QueryConfig(**cfg), enc).locate(snap, LocateQuery(queries=('lamp',)))
        return sum(o.status == LocateStatus.FOUND for o in res.objects)

    assert found() == 2
    assert found(dino_split_similarity=-1.0) == 1  # DINO cuts off: the gap is bridged
    assert found(dino_split_similarity=-1.0, merge_gap_m=0.0) == 2


def test_unposed_boxes_are_upright(cliplike_room):
    snap, _, engine = cliplike_room
    assert snap.gravity is None
    g = engine.gravity(snap)
    np.testing.assert_allclose(g, [0, 1, 0], atol=0.02)  # camera y is down in this map
    flat = QueryEngine(QueryConfig(estimate_gravity=False), engine.text_encoder)
    assert flat.gravity(snap) is None
