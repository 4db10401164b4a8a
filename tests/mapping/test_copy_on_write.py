"""Copy-on-write only for blocks a reader may hold: snapshots handed out stay immutable, blocks
nobody holds are written in place, and a reader during an integration never waits."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping import semantic_map
from ros2_sab3r.mapping.blocks import Block
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

pytestmark = pytest.mark.unit

FIELDS = ('keys', 'valid', 'pos', 'color', 'weight', 'count', 'last_seen', 'clip', 'clip_w')


def _batch(rng, n=20_000, F=8):
    X = rng.uniform(0, 4, (n, 3)).astype(np.float32)  # 0.1 m voxels: several blocks
    S = rng.normal(size=(50, F)).astype(np.float32)
    return (X, np.full(n, 3.0, np.float32), rng.integers(0, 255, (n, 3)).astype(np.uint8),
            rng.integers(0, 50, n), S)


def _new_map():
    return SemanticVoxelMap(MappingConfig(voxel_size_m=0.1, max_voxels=100_000), clip_dim=8)


def _raw(snap):
    return [{f: getattr(b, f).copy() for f in FIELDS} for b in snap.blocks]


def _assert_unchanged(snap, raw):
    for blk, saved in zip(snap.blocks, raw, strict=True):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(blk, f), saved[f], err_msg=f)


@pytest.fixture
def copies(monkeypatch):
    """Counts Block.copy calls."""
    counter = {'n': 0}
    original = Block.copy

    def counted(self, *args, **kw):
        counter['n'] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(Block, 'copy', counted)
    return counter


def test_blocks_nobody_holds_are_written_in_place(copies, monkeypatch):
    monkeypatch.setattr(semantic_map, 'MAX_READER_LAG', 10 ** 9)
    rng = np.random.default_rng(0)
    m = _new_map()
    X, C, rgb, cells, S = _batch(rng)
    for stamp in range(1, 6):  # the same voxels again and again, no reader
        m.integrate(X + 0.001 * stamp, C, rgb, stamp, cells, S)
    assert len(m._blocks) >= 3
    assert copies['n'] == 0
    snap = m.snapshot()  # a reader takes one: its blocks must be copied before the next write
    raw = _raw(snap)
    m.integrate(X, C, rgb, 10, cells, S)
    assert copies['n'] == len(snap.blocks)
    _assert_unchanged(snap, raw)
    copies['n'] = 0
    m.integrate(X, C, rgb, 11, cells, S)  # the copies are the writer's own now
    assert copies['n'] == 0
    _assert_unchanged(snap, raw)
    assert m.snapshot().version > snap.version


def test_reader_during_an_integration_gets_the_last_handed_out_snapshot(monkeypatch):
    monkeypatch.setattr(semantic_map, 'MAX_READER_LAG', 10 ** 9)
    rng = np.random.default_rng(1)
    m = _new_map()
    X, C, rgb, cells, S = _batch(rng)
    m.integrate(X, C, rgb, 1, cells, S)
    held = m.snapshot()
    raw = _raw(held)
    m.integrate(X, C, rgb, 2, cells, S)  # published, not handed out: withdrawn at the next
    seen = []
    fold = m._fold

    def fold_with_a_reader(*args):
        seen.append(m.snapshot())  # a reader thread calling in the middle of the write
        fold(*args)
        seen.append(m.snapshot())

    monkeypatch.setattr(m, '_fold', fold_with_a_reader)
    m.integrate(X, C, rgb, 3, cells, S)
    assert seen == [held, held]
    _assert_unchanged(held, raw)
    latest = m.snapshot()
    assert latest is not held and latest.stamp_ns == 3 and latest.counts.max() >= 3


def test_a_late_reader_is_never_more_than_the_lag_behind(monkeypatch, copies):
    monkeypatch.setattr(semantic_map, 'MAX_READER_LAG', 3)
    rng = np.random.default_rng(2)
    m = _new_map()
    X, C, rgb, cells, S = _batch(rng)
    m.integrate(X, C, rgb, 1, cells, S)
    first = m.snapshot()
    seen = []
    fold = m._fold
    monkeypatch.setattr(m, '_fold', lambda *a: (seen.append(m.snapshot()), fold(*a)))
    for stamp in range(2, 8):
        m.integrate(X, C, rgb, stamp, cells, S)
    # without other readers: served versions lag by at most MAX_READER_LAG integrations, and
    # only the integrations that kept a snapshot for readers copied blocks
    assert seen[0] is first
    lags = [m_v - s.version for m_v, s in zip(range(first.version, first.version + 6), seen)]
    assert max(lags) <= 3 and max(lags) > 0
    assert 0 < copies['n'] <= 2 * len(m._blocks)



def test_without_readers_nothing_is_kept_for_them(monkeypatch, copies):
    """The lag's hand-outs stop READERS_ACTIVE_FOR integrations after the last reader: they kept
    old copies of the blocks written after them (up to a second map). The first reader during
    an integration after that gets the last snapshot a reader had."""
    monkeypatch.setattr(semantic_map, 'MAX_READER_LAG', 2)
    monkeypatch.setattr(semantic_map, 'READERS_ACTIVE_FOR', 4)
    rng = np.random.default_rng(4)
    m = _new_map()
    X, C, rgb, cells, S = _batch(rng)
    for stamp in range(1, 4):  # never read: written in place
        m.integrate(X, C, rgb, stamp, cells, S)
    assert copies['n'] == 0
    read = m.snapshot()
    for stamp in range(4, 8):  # a reader came: the lag's hand-outs keep snapshots (copies)
        m.integrate(X, C, rgb, stamp, cells, S)
    assert copies['n'] > 0
    n = copies['n']
    for stamp in range(8, 20):  # the reader is gone: nothing copied any more
        m.integrate(X, C, rgb, stamp, cells, S)
    assert copies['n'] <= n + len(m._blocks)  # (at most the hand-out at the end of the span)
    n = copies['n']
    for stamp in range(20, 30):
        m.integrate(X, C, rgb, stamp, cells, S)
    assert copies['n'] == n
    seen = []
    fold = m._fold
    monkeypatch.setattr(m, '_fold', lambda *a: (seen.append(m.snapshot()), fold(*a)))
    m.integrate(X, C, rgb, 30, cells, S)
    assert read.version < seen[0].version < m.snapshot().version  # stale, kept, intact
    assert seen[0].stamp_ns < 30 and m.snapshot().stamp_ns == 30

def test_save_reads_a_handed_out_snapshot(tmp_path):
    rng = np.random.default_rng(3)
    m = _new_map()
    X, C, rgb, cells, S = _batch(rng)
    m.integrate(X, C, rgb, 1, cells, S)
    arrays = m.arrays()
    assert m._handed is m._snapshot  # arrays() took it the way a reader does
    assert len(arrays['keys']) == m.n_voxels
