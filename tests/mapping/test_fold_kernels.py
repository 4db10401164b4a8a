"""The compiled fold of a batch into the map's blocks (mapping.fold) against the numpy arithmetic
it replaced: bit for bit, for re-observed voxels, new ones, skipped feature rows, all-zero
features and codes at the int8 limits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping import fold
from ros2_sab3r.mapping.blocks import Block
from ros2_sab3r.mapping.codec import fold_int8_mean, int8_encode
from ros2_sab3r.mapping.keys import KEY_OFFSET, pack_keys
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

pytestmark = pytest.mark.unit


def _block(rng, width: int) -> Block:
    blk = Block(width, 0, 'pca_int8')
    blk.weight[:] = rng.uniform(0.5, 9, len(blk.weight))
    blk.pos[:] = rng.uniform(-5, 5, blk.pos.shape)
    blk.color[:] = rng.uniform(0, 255, blk.color.shape)
    blk.count[:] = rng.integers(1, 50, len(blk.count))
    blk.clip[:], blk.clip_scale[:] = int8_encode(rng.standard_normal(blk.clip.shape))
    blk.clip_w[:] = rng.uniform(0.5, 9, len(blk.clip_w))
    return blk


@pytest.mark.parametrize('width', [16, 128, 512])
def test_int8_fold_equals_the_numpy_fold(width):
    rng = np.random.default_rng(width)
    blk = _block(rng, width)
    rows = np.sort(rng.choice(len(blk.weight), 300, replace=False))
    U = 400
    src = rng.permutation(U)[:300]  # batch rows in another order than the slots
    fsum = (rng.standard_normal((U, width)) * rng.uniform(0.1, 30, (U, 1))).astype(np.float32)
    fw = rng.uniform(0.5, 20, U).astype(np.float32)
    fw[src[:40]] = 0  # no feature for these voxels: left as they are
    fsum[src[40:50]] = 0
    blk.clip_w[rows[40:50]] = 0  # all-zero means: scale 0
    fsum[src[50:60], 0] = 1e4  # one channel far above the rest: the others round to 0
    want = blk.copy()
    has = np.flatnonzero(fw[src] > 0)
    r = rows[has]
    w_old = want.clip_w[r].copy()
    w_new = (w_old + fw[src[has]]).astype(np.float32)
    values, scale = want.clip[r].copy(), want.clip_scale[r].copy()
    norm = np.zeros(len(r), np.float32)
    fold_int8_mean(values, scale, norm, np.arange(len(r)), fsum[src[has]].copy(), w_old, w_new)
    want.clip[r], want.clip_scale[r], want.clip_norm[r] = values, scale, norm
    want.clip_w[r] = w_new

    fold.fold_int8(rows, src, fsum, fw, blk.clip, blk.clip_scale, blk.clip_norm, blk.clip_w)
    for name in ('clip', 'clip_scale', 'clip_norm', 'clip_w'):
        assert np.array_equal(getattr(blk, name), getattr(want, name)), name
    assert (blk.clip_scale[rows[40:50]] == 0).all() and (blk.clip[rows[40:50]] == 0).all()
    assert (np.abs(blk.clip[rows[50:60], 0]) == 127).all()


def test_scalar_fold_equals_the_float64_means():
    rng = np.random.default_rng(0)
    blk = _block(rng, 16)
    rows = np.sort(rng.choice(len(blk.weight), 500, replace=False))
    src = rng.permutation(500)
    wsum = rng.uniform(0.1, 20, 500)
    psum = rng.uniform(-50, 50, (500, 3)) * wsum[:, None]
    csum = rng.uniform(0, 255, (500, 3)) * wsum[:, None]
    w_old = blk.weight[rows].astype(np.float64)
    w_new = w_old + wsum[src]
    pos = (w_old[:, None] * blk.pos[rows] + psum[src]) / w_new[:, None]
    color = (w_old[:, None] * blk.color[rows] + csum[src]) / w_new[:, None]
    count = blk.count[rows] + 1
    fold.fold_scalars(rows, src, 7, wsum, psum, csum, blk.weight, blk.pos, blk.color, blk.count,
                      blk.last_seen)
    assert np.array_equal(blk.pos[rows], pos.astype(np.float32))
    assert np.array_equal(blk.color[rows], color.astype(np.float32))
    assert np.array_equal(blk.weight[rows], w_new.astype(np.float32))
    assert np.array_equal(blk.count[rows], count)
    assert (blk.last_seen[rows] == 7).all()
    untouched = np.setdiff1d(np.arange(len(blk.weight)), rows)
    assert (blk.last_seen[untouched] == 0).all()


@pytest.mark.parametrize('codec', ['int8', 'pca_int8'])
def test_a_new_voxel_folded_from_empty_is_its_batch_mean(codec):
    """New voxels (fresh slots, also reused ones after eviction: stale codes) get the batch's
    weighted means, exactly as the fold of a first observation computes them."""
    rng = np.random.default_rng(1)
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.5, max_voxels=40, feature_codec=codec,
                                       clip_projection_dim=8), clip_dim=8)
    S = rng.standard_normal((4, 8)).astype(np.float32)
    for stamp in range(1, 4):  # 3 x 30 distinct voxels into 40: evictions reuse slots
        X = np.arange(30)[:, None] * [1.0, 0, 0] + [0.25, 0.25, 100.0 * stamp + 0.25]
        X = X.repeat(2, 0)
        X = (X + rng.uniform(-0.2, 0.2, X.shape)).astype(np.float32)
        C = rng.uniform(5, 9, len(X)).astype(np.float32)
        cells = rng.integers(0, 4, len(X))
        m.integrate(X, C, np.zeros((len(X), 3), np.uint8), stamp, cells, S)
    snap = m.snapshot()
    assert m.evicted_total == 50 and snap.n_voxels == 40
    last = snap.last_seen_ns == 3
    assert last.sum() == 30
    order = np.argsort(X[::2, 0])
    want = ((X[0::2] * C[0::2, None] + X[1::2] * C[1::2, None])
            / (C[0::2] + C[1::2])[:, None])[order]
    got = snap.positions[last][np.argsort(snap.positions[last][:, 0])]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert (snap.counts[last] == 1).all()


def test_weighted_row_sums_equal_the_sparse_product():
    from scipy.sparse import csr_matrix
    rng = np.random.default_rng(2)
    U, M = 700, 96
    indptr = np.zeros(U + 1, np.int64)
    np.cumsum(rng.integers(0, 7, U), out=indptr[1:])  # some rows empty
    cols = rng.integers(0, M, indptr[-1])
    w = rng.uniform(0.1, 5, indptr[-1]).astype(np.float32)
    S = rng.standard_normal((M, 40)).astype(np.float32)
    got = fold.weighted_row_sums(indptr, cols, w, S)
    assert got.dtype == np.float32
    assert np.array_equal(got, csr_matrix((w, cols, indptr), shape=(U, M)) @ S)


def _numpy_batch_sums(X_W, C, rgb, voxel_size, min_confidence, cells):
    """The numpy formulation batch_sums replaced (SemanticVoxelMap.integrate before 2026-12-04):
    floor, the packed keys' np.argsort, np.bincount per voxel."""
    ijk = np.floor(X_W / voxel_size)
    inside = np.abs(ijk) < KEY_OFFSET - 2
    ok = inside[:, 0] & inside[:, 1] & inside[:, 2]
    ok &= np.isfinite(C) & (C >= min_confidence)
    sel = np.flatnonzero(ok)
    keys = pack_keys(ijk[sel])
    order = np.argsort(keys)
    sorted_keys = keys[order]
    first = np.empty(len(sel), bool)
    first[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    ukeys = sorted_keys[first]
    U = len(ukeys)
    inv = np.cumsum(first) - 1
    pts = sel[order]
    X, w, col = X_W[pts], C[pts].astype(np.float64), rgb[pts]
    wsum = np.bincount(inv, w, U)
    psum = np.stack([np.bincount(inv, w * X[:, k], U) for k in range(3)], -1)
    csum = np.stack([np.bincount(inv, w * col[:, k], U) for k in range(3)], -1)
    cell = cells[pts]
    has = cell >= 0
    rows_of = inv[has]
    indptr = np.zeros(U + 1, np.int64)
    np.cumsum(np.bincount(rows_of, minlength=U), out=indptr[1:])
    fw = np.bincount(rows_of, w[has].astype(np.float32), U).astype(np.float32)
    return dict(ukeys=ukeys, wsum=wsum, psum=psum, csum=csum, pts=pts, indptr=indptr,
                cols=cell[has], w_cols=w[has].astype(np.float32), fw=fw)


def test_batch_sums_equal_the_numpy_formulation_bit_for_bit():
    """Points skipped for every reason (NaN, inf, outside the key range, below or at the
    confidence cut), voxels with many points, points without a feature cell."""
    rng = np.random.default_rng(3)
    n = 5000
    X = rng.uniform(-2, 2, (n, 3)).astype(np.float32)
    X[:1000] = X[:1000] // 0.1 * 0.1 + 0.03  # crowded voxels
    X[10, 1], X[11, 2], X[12, 0] = np.nan, np.inf, 1e7  # 1e7 / 0.05 is outside the key range
    X[13] = [0, 0, -0.05 * (KEY_OFFSET - 2.5)]  # on the key range's edge: outside
    X[14] = [0, 0, -0.05 * (KEY_OFFSET - 3.5)]  # the voxel next to it: inside
    C = rng.uniform(0.0, 4.0, n).astype(np.float32)
    C[20], C[21] = np.nan, np.inf
    C[22:30] = 1.5  # exactly at the cut: kept
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    cells = rng.integers(-1, 300, n)
    C[13] = C[14] = 3.0
    want = _numpy_batch_sums(X, C, rgb, 0.05, 1.5, cells)
    assert 14 in want['pts'] and 13 not in want['pts']
    got = fold.batch_sums(X, C, rgb, 0.05, 1.5, cells, 300)
    assert len(got.pts) < n - 1000  # the cut removed some
    for name, value in want.items():
        assert np.array_equal(getattr(got, name), value), name
        assert getattr(got, name).dtype == value.dtype, name
    plain = fold.batch_sums(X, C, rgb, 0.05, 1.5, None)
    assert plain.indptr is None and plain.fw is None
    for name in ('ukeys', 'wsum', 'psum', 'csum', 'pts'):
        assert np.array_equal(getattr(plain, name), want[name]), name
    assert fold.batch_sums(X, np.zeros(n, np.float32), rgb, 0.05, 1.5, cells, 300) is None
    with pytest.raises(ValueError, match='feature cell index 299 out of range for 299'):
        fold.batch_sums(X, C, rgb, 0.05, 1.5, cells, 299)


def test_insert_sorted_equals_np_insert():
    rng = np.random.default_rng(4)
    keys = np.sort(rng.choice(10 ** 6, 2000, replace=False))
    slots = rng.permutation(2000)
    new_keys = np.sort(rng.choice(10 ** 6, 300, replace=False))
    new_keys = new_keys[~np.isin(new_keys, keys)]
    at = np.searchsorted(keys, new_keys)
    at[:3] = 0  # several before the first
    new_slots = rng.integers(0, 5000, len(new_keys))
    got_keys, got_slots = fold.insert_sorted(keys, slots, at, new_keys, new_slots)
    assert np.array_equal(got_keys, np.insert(keys, at, new_keys))
    assert np.array_equal(got_slots, np.insert(slots, at, new_slots))
    got_keys, _ = fold.insert_sorted(keys, slots, np.full(2, 2000), new_keys[:2], new_slots[:2])
    assert np.array_equal(got_keys, np.append(keys, new_keys[:2]))
    drop = rng.random(len(keys)) < 0.3
    drop[at[5]] = True  # an entry dropped where a new one goes
    got_keys, got_slots = fold.insert_sorted(keys, slots, at, new_keys, new_slots, drop)
    want = np.insert(keys, at, new_keys)[~np.insert(drop, at, False)]
    assert np.array_equal(got_keys, want)
    assert np.array_equal(got_slots, np.insert(slots, at, new_slots)[~np.insert(drop, at, False)])


def test_lookup_sorted_equals_searchsorted():
    rng = np.random.default_rng(5)
    index = np.sort(rng.choice(10 ** 7, 100_000, replace=False))
    for keys in (np.sort(np.concatenate([rng.choice(index, 3000, replace=False),
                                         rng.integers(-5, 10 ** 7 + 5, 3000)])),
                 index[:1], index[-1:], np.array([-1, 10 ** 8]), np.zeros(0, np.int64),
                 index[::2]):
        keys = np.unique(keys)
        pos, found = fold.lookup_sorted(index, keys)
        assert np.array_equal(pos, np.searchsorted(index, keys))
        assert np.array_equal(found, np.isin(keys, index))
    pos, found = fold.lookup_sorted(np.zeros(0, np.int64), np.arange(3))
    assert (pos == 0).all() and not found.any()


def test_warm_up_compiles_every_kernel_an_integration_runs(tmp_path):
    """In a fresh process (numba compiles per process, on first call): after warm_up, an
    integration of each kind compiles nothing more."""
    code = (
        'import numpy as np\n'
        'from ros2_sab3r.config import MappingConfig\n'
        'from ros2_sab3r.mapping import fold\n'
        'from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap, warm_up\n'
        'cfg = MappingConfig(feature_codec="pca_int8", max_voxels=300, clip_projection_dim=8)\n'
        'warm_up(cfg, 16)\n'
        'count = lambda: sum(len(k.signatures) for k in fold._kernels())\n'
        'warm = count()\n'
        'm = SemanticVoxelMap(cfg, clip_dim=16)\n'
        'rng = np.random.default_rng(0)\n'
        'for t in range(4):\n'
        '    X = rng.uniform(-1, 1, (2000, 3))\n'
        '    cells = rng.integers(-1, 5, 2000) if t < 3 else None\n'
        '    m.integrate(X, np.full(2000, 3.0), np.zeros((2000, 3), np.uint8), t, cells,\n'
        '                rng.standard_normal((5, 16)).astype(np.float32))\n'
        'assert m.evicted_total > 0\n'
        'print(warm, count())\n')
    env = {**os.environ, 'NUMBA_CACHE_DIR': str(tmp_path)}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         timeout=240, check=True).stdout.split()
    assert int(out[0]) >= 7 and out[0] == out[1], out
