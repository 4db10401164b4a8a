"""The semantic voxel map, its feature codec and its files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping.codec import bf16_decode, bf16_encode
from ros2_sab3r.mapping.keys import pack_keys, unpack_keys
from ros2_sab3r.mapping.persistence import MapFileError, map_from_file, read_map, save_map
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

pytestmark = pytest.mark.unit


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
    # the key index and the blocks agree: each key's slot holds that key, free slots are empty
    slots = m._index_slots
    assert np.array_equal(m._slot_field('keys')[slots], m._index_keys)
    assert m._slot_field('valid').sum() == 1000 and m._slot_field('valid')[slots].all()
    assert not m._slot_field('valid')[m._free].any()



def test_eviction_among_voxels_last_seen_together_drops_the_lighter_at_real_stamps():
    """Stamps of today (1.7e18 ns): among voxels last seen at the same stamp, the lighter
    ones go first. (As float64, such stamps are 256 ns apart and the weight's term was lost.)"""
    T = 1_764_806_400_000_000_000  # 2025-12-04 00:00 UTC in nanoseconds
    cfg = MappingConfig(voxel_size_m=1.0, max_voxels=10, min_confidence=0.0)
    m = SemanticVoxelMap(cfg)
    X = (np.arange(10)[:, None] * [1.0, 0, 0] + 0.5).astype(np.float32)
    C = np.linspace(1.0, 0.1, 10).astype(np.float32)  # lighter from x = 0 to x = 9
    rgb = np.zeros((10, 3), np.uint8)
    m.integrate(X, C, rgb, T)
    m.integrate(X[:2] + [0, 5, 0], C[:2], rgb[:2], T + 1)  # two new voxels: two must go
    snap = m.snapshot()
    kept = np.sort(snap.positions[snap.last_seen_ns == T][:, 0])
    assert m.evicted_total == 2 and np.array_equal(kept, np.arange(8) + 0.5)

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
