"""Unit tests of the pipeline stages (fast, no rendering of sequences)."""

from __future__ import annotations

import os
import threading

import numpy as np
from pipeline_doubles import HashTextEncoderDouble
import pytest
from scipy.spatial.transform import Rotation
import torch

from ros2_sab3r.config import MappingConfig, QueryConfig
from ros2_sab3r.eval.synthetic import make_scene
from ros2_sab3r.frames.buffer import FrameBuffer
from ros2_sab3r.frames.keyframes import KeyframeWindow, WindowKeyframe
from ros2_sab3r.geometry.boxes import box_iou, fit_box
from ros2_sab3r.geometry.focal import estimate_focal
from ros2_sab3r.geometry.matching import overlap_ratio
from ros2_sab3r.geometry.refine import PairConstraint, refine_keyframe
from ros2_sab3r.geometry.registration import RegistrationError, umeyama
from ros2_sab3r.geometry.transforms import make_T, pose_distance
from ros2_sab3r.mapping.persistence import MapFileError, map_from_file, read_map, save_map
from ros2_sab3r.mapping.semantic_map import (
    SemanticVoxelMap,
    bf16_decode,
    bf16_encode,
    pack_keys,
    unpack_keys,
)
from ros2_sab3r.query.engine import LocateError, QueryEngine, validate_query
from ros2_sab3r.types import CameraFrame, LocateQuery, OrientedBox

pytestmark = pytest.mark.unit


def test_synthetic_scene_is_deterministic_and_consistent():
    a = make_scene(3).sequence(2, 64, 48)
    b = make_scene(3).sequence(2, 64, 48)
    assert np.array_equal(a[1].rgb, b[1].rgb) and np.array_equal(a[1].depth, b[1].depth)
    f = a[0]
    assert f.rgb.std() > 10  # textured, not flat
    assert f.semantic.shape == f.depth.shape == f.instance.shape == (48, 64)
    assert np.isfinite(f.depth).all() and (f.depth > 0).all()


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


def test_focal_from_pointmap():
    f = make_scene(1).sequence(1, 128, 96)[0]
    from ros2_sab3r.eval.synthetic import backproject
    est = estimate_focal(backproject(f.depth, f.K))
    assert abs(est - f.K[0, 0]) / f.K[0, 0] < 1e-3
    with pytest.raises(ValueError, match='CameraInfo'):
        estimate_focal(np.full((8, 8, 3), np.nan, np.float32))


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


def test_box_fit_upright_and_iou():
    rng = np.random.default_rng(0)
    yaw = 0.4
    q = Rotation.from_euler('z', yaw).as_quat()
    gt = OrientedBox(np.array([1.0, 2.0, 0.5]), q, np.array([2.0, 1.0, 0.4]))
    local = rng.uniform(-0.5, 0.5, (2000, 3)) * gt.size
    pts = local @ gt.rotation().T + gt.center
    box = fit_box(pts, gravity=np.array([0, 0, -1.0]))
    assert box_iou(box, gt) > 0.9
    assert box_iou(fit_box(pts), gt) > 0.8  # PCA without gravity
    assert box_iou(gt, gt) > 0.99
    far = OrientedBox(gt.center + 10, q, gt.size)
    assert box_iou(gt, far) == 0.0
    assert np.all(fit_box(pts[:1], min_size=0.05).size >= 0.05)


def test_frame_buffer_drops_oldest():
    buf = FrameBuffer(2)
    img = np.zeros((4, 4, 3), np.uint8)
    for i in range(5):
        buf.push(CameraFrame(stamp_ns=i, frame_id='c', image=img))
    assert buf.dropped == 3 and len(buf) == 2
    assert buf.pop(0).stamp_ns == 3 and buf.pop(0).stamp_ns == 4
    assert buf.pop(0.01) is None
    t = threading.Thread(target=lambda: buf.close())
    t.start()
    assert buf.pop(1.0) is None
    t.join()


def test_keyframe_window_evicts_oldest():
    w = KeyframeWindow(2)
    evicted = [w.insert(WindowKeyframe(keyframe=i, tokens=None)) for i in range(4)]
    assert [e.keyframe if e else None for e in evicted] == [None, None, 0, 1]
    assert [k.keyframe for k in w.recent(5)] == [3, 2] and w.total == 4


def _batch(rng, n=5000, offset=0.0, F=16):
    X = rng.uniform(0, 1, (n, 3)).astype(np.float32) + offset
    cells = rng.integers(0, 10, n)
    S = rng.normal(size=(10, F)).astype(np.float32)
    return X, np.full(n, 3.0, np.float32), rng.integers(0, 255, (n, 3)).astype(np.uint8), cells, S


def test_voxel_keys_roundtrip():
    ijk = np.array([[0, 0, 0], [-5, 7, 1000], [-(2 ** 19), 2 ** 19, -3]])
    assert np.array_equal(unpack_keys(pack_keys(ijk)), ijk)


def test_map_integration_means_and_snapshot_immutability():
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.5, max_voxels=1000), clip_dim=4)
    X = np.array([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.7, 0.1, 0.1]], np.float32)
    C = np.array([1.0 + 1, 3.0, 2.0], np.float32)  # weights 2 and 3 in the first voxel
    rgb = np.array([[0, 0, 0], [100, 100, 100], [255, 0, 0]], np.uint8)
    S = np.eye(4, dtype=np.float32)[:2]
    m.integrate(X, C, rgb, 10, np.array([0, 0, 1]), S)
    snap = m.snapshot()
    assert snap.n_voxels == 2
    i = int(np.argmin(snap.positions[:, 0]))
    assert np.allclose(snap.positions[i], (2 * 0.1 + 3 * 0.2) / 5, atol=1e-6)
    assert snap.colors[i][0] == 60 and snap.counts[i] == 1 and snap.last_seen_ns[i] == 10
    before = snap.positions.copy(), snap.features('clip').copy()
    m.integrate(X + 0.01, C, rgb, 20, np.array([1, 1, 1]), S)
    assert np.array_equal(snap.positions, before[0])  # old snapshot unchanged
    assert np.array_equal(snap.features('clip'), before[1])
    new = m.snapshot()
    assert new.version > snap.version and new.counts.max() == 2
    # the low-confidence and non-finite points are not fused
    m.integrate(np.array([[5, 5, 5], [np.nan, 0, 0]], np.float32), np.array([1.0, 9.0]),
                np.zeros((2, 3), np.uint8), 30)
    assert m.n_voxels == 2


def test_dino_features_arriving_later_leave_old_snapshots_alone():
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.5, max_voxels=10_000), clip_dim=4)
    X = np.random.default_rng(0).uniform(0, 40, (5000, 3)).astype(np.float32)  # > 1 block
    C = np.full(len(X), 3.0, np.float32)
    rgb = np.zeros((len(X), 3), np.uint8)
    cells = np.zeros(len(X), np.int64)
    m.integrate(X, C, rgb, 1, cells, np.eye(4, dtype=np.float32)[:1])
    old = m.snapshot()
    assert old.n_voxels > 4096 and old.dino_dim == 0
    m.integrate(X[:10], C[:10], rgb[:10], 2, cells[:10], np.eye(4, dtype=np.float32)[1:2],
                np.ones((1, 6), np.float32))
    new = m.snapshot()
    assert new.dino_dim == 6 and old.features('dino') is None
    assert np.allclose(old.features('clip')[:, 0], 1.0, atol=1e-2)  # the old one unchanged
    fused = new.clip_weights > 0
    assert np.allclose(np.linalg.norm(new.features('dino')[new.last_seen_ns == 2], axis=1),
                       np.sqrt(6), atol=1e-2)
    assert fused.all() and np.array_equal(new.keys, old.keys)


def test_map_stays_bounded_and_evicts_least_recently_seen():
    rng = np.random.default_rng(0)
    cfg = MappingConfig(voxel_size_m=0.05, max_voxels=1000)
    m = SemanticVoxelMap(cfg, clip_dim=16)
    for t in range(6):
        X, C, rgb, cells, S = _batch(rng, 3000, offset=2.0 * t)
        m.integrate(X, C, rgb, t, cells, S)
        assert m.n_voxels <= 1000
    snap = m.snapshot()
    assert snap.n_voxels == 1000 and snap.last_seen_ns.min() == 5  # only the newest remain
    assert len(np.unique(snap.keys)) == 1000


def test_persistence_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    cfg = MappingConfig(voxel_size_m=0.05, max_voxels=5000)
    m = SemanticVoxelMap(cfg, clip_dim=16, dino_dim=8)
    X, C, rgb, cells, S = _batch(rng)
    m.integrate(X, C, rgb, 7, cells, S, rng.normal(size=(10, 8)).astype(np.float32))
    path = tmp_path / 'map.npz'
    save_map(m, path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]  # temp file renamed
    loaded = map_from_file(read_map(path, cfg, 16), cfg)
    a, b = m.snapshot(), loaded.snapshot()
    oa, ob = np.argsort(a.keys), np.argsort(b.keys)
    assert np.array_equal(a.keys[oa], b.keys[ob])
    assert np.allclose(a.positions[oa], b.positions[ob])
    assert np.array_equal(a.features('clip')[oa], b.features('clip')[ob])
    assert np.array_equal(a.features('dino')[oa], b.features('dino')[ob])
    assert b.stamp_ns == 7
    # incompatible and corrupt files: clear errors
    with pytest.raises(MapFileError, match='voxel_size_m'):
        read_map(path, MappingConfig(voxel_size_m=0.1), 16)
    with pytest.raises(MapFileError, match='512-d'):
        read_map(path, cfg, 512)
    bad = tmp_path / 'bad.npz'
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(MapFileError, match='not a readable'):
        read_map(bad, cfg, 16)
    np.savez(tmp_path / 'foreign.npz', x=np.zeros(3))
    with pytest.raises(MapFileError, match='metadata'):
        read_map(tmp_path / 'foreign.npz', cfg, 16)
    obj = tmp_path / 'pickled.npz'
    np.savez(obj, meta=np.array([{'a': 1}], dtype=object))
    with pytest.raises(MapFileError):
        read_map(obj, cfg, 16)
    with pytest.raises(MapFileError, match='does not exist'):
        read_map(tmp_path / 'none.npz', cfg, 16)


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


def test_refinement_recovers_pose_and_pair_scales():
    rng = np.random.default_rng(2)
    T_true = make_T(Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix(), [0.5, -0.2, 1.0])
    pairs, scales = [], [0.7, 1.3, 2.0]
    for s in scales:  # Q: points in the new camera at pair scale; Y: the same in the world
        Y = rng.uniform(-2, 2, (300, 3)) + [0, 0, 4]
        Q = (Y - T_true[:3, 3]) @ T_true[:3, :3] / s
        pairs.append(PairConstraint(Q, Y, rng.uniform(1, 5, 300), s * 1.1))
    Y_out = pairs[0].Y_W.copy()
    Y_out[:20] += 1.0  # outliers: the Huber loss must keep them from pulling the pose
    pairs[0] = PairConstraint(pairs[0].Q, Y_out, pairs[0].w, pairs[0].scale)
    T0 = make_T(Rotation.from_rotvec([0.12, -0.17, 0.0]).as_matrix(), [0.6, -0.1, 0.9])
    res = refine_keyframe(T0, pairs, 30, robust_scale=0.02)
    dt, dr = pose_distance(res.T_WC, T_true)
    assert dt < 1e-3 and dr < 0.05
    assert np.allclose(res.scales, scales, rtol=1e-3)
    assert res.iterations <= 30


def test_bfloat16_features_and_cosine():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = bf16_decode(bf16_encode(x))
    assert np.abs(y - x).max() <= np.abs(x).max() * 2 ** -8  # 8 mantissa bits, rounded
    assert np.array_equal(bf16_decode(bf16_encode(y)), y)  # representable values are exact
    # map cosine (bf16 product per block, stored norms) against a float64 reference
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.1, max_voxels=10_000), clip_dim=16)
    X = rng.uniform(0, 5, (6000, 3)).astype(np.float32)
    S = rng.normal(size=(50, 16)).astype(np.float32)
    cells = rng.integers(-1, 50, 6000)  # -1: some points carry no feature
    m.integrate(X, np.full(6000, 3.0, np.float32), np.zeros((6000, 3), np.uint8), 1, cells, S)
    snap = m.snapshot()
    E = rng.normal(size=(3, 16))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    F = snap.features('clip').astype(np.float64)
    norm = np.linalg.norm(F, axis=1)
    ref = np.where(norm > 0, (F @ E.T).T / np.maximum(norm, 1e-12), 0.0)
    sims = snap.cosine(E)
    assert sims.shape == (3, snap.n_voxels)
    assert np.abs(sims - ref).max() < 1e-2
    assert (sims[:, snap.clip_weights == 0] == 0).all()
    # query.threads: the same products on worker threads; the caller's torch setting is kept
    threads = torch.get_num_threads()
    assert np.array_equal(snap.cosine(E, threads=1), sims)
    assert np.array_equal(snap.cosine(E, threads=3), sims)
    assert torch.get_num_threads() == threads
    rows = np.array([5, 0, 17])
    assert np.array_equal(snap.take('pos', rows), snap.positions[rows])


def test_validate_query_is_shared_with_the_engine():
    cfg = QueryConfig(max_queries=2)
    q = validate_query(LocateQuery(queries=('  red   chair ',)), cfg)
    assert q.queries == ('red chair',)
    with pytest.raises(LocateError, match='query.max_queries=2'):
        validate_query(LocateQuery(queries=('a', 'b', 'c')), cfg)
    with pytest.raises(LocateError, match='empty'):
        QueryEngine(cfg, HashTextEncoderDouble(8)).validate(LocateQuery(queries=(' ',)))


def test_dino_and_clip_features_on_different_grids(scene, frames, text_encoder):
    from conftest import make_backend, make_pipeline, run
    from pipeline_doubles import FinerDinoBackendDouble

    from ros2_sab3r.pipeline import resample_cells

    S = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)
    np.testing.assert_array_equal(resample_cells(S.repeat(2, 0).repeat(2, 1), (4, 6)), S)
    backend = FinerDinoBackendDouble(make_backend(scene, frames[:8], text_encoder))
    pipeline = make_pipeline(backend, text_encoder, posed=True)
    results = run(pipeline, frames[:8], posed=True)
    assert all(r.status != 'skipped' for r in results), [r.reason for r in results]
    snap = pipeline.snapshot()
    assert snap.n_voxels > 1000 and snap.features('dino') is not None


def test_label_voxels_picks_the_closest_label_and_skips_featureless_voxels():
    from ros2_sab3r.config import MappingConfig
    from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
    from ros2_sab3r.query.labels import NO_LABEL, label_voxels

    rng = np.random.default_rng(0)
    E = np.linalg.qr(rng.standard_normal((16, 3)))[0].T.astype(np.float32)  # 3 unit labels
    X = np.stack([np.arange(30) * 0.2, np.zeros(30), np.zeros(30)], 1)
    truth = np.arange(30) % 3
    S = E[truth] + 0.05 * rng.standard_normal((30, 16)).astype(np.float32)
    cells = np.where(np.arange(30) < 27, np.arange(30), -1)  # the last 3 points: no feature
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.1), clip_dim=16)
    m.integrate(X, np.full(30, 5.0, np.float32), np.zeros((30, 3), np.uint8), 1, cells, S, None)
    snap = m.snapshot()
    labels, scores = label_voxels(snap, E, temperature=0.05)
    order = np.argsort(snap.positions[:, 0])
    assert list(labels[order][:27]) == list(truth[:27])
    assert (labels[order][27:] == NO_LABEL).all() and (scores[order][27:] == 0).all()
    assert (scores[order][:27] > 0.9).all() and (scores <= 1.0).all()
    empty = SemanticVoxelMap(MappingConfig(), clip_dim=16).snapshot()
    assert [len(a) for a in label_voxels(empty, E, 0.05)] == [0, 0]
