"""Compiled kernels of an integration, through numba: a batch's points summed per voxel
(:func:`batch_sums`), those sums folded into voxels already in the map one block at a time
(SemanticVoxelMap._update), and the key index's insertions (:func:`insert_sorted`).

Why: a keyframe re-observing 40k voxels spread over a 1M-voxel map touches ~250 blocks. The
numpy path gathered every field of the touched slots from each block, computed, and scattered
them back (~25 small operations per block), and decoded, folded and re-encoded the int8 codes
in several full passes over (n, k) temporaries; at 0.56-0.93 M points/s this was most of the
integration time. These loops read and write each touched slot once, in place. Summing the
batch took a dozen numpy passes over its points (gathers, np.bincount per field, the CSR of
feature weights); :func:`batch_sums` makes one after the sort.

They reproduce the numpy arithmetic bit for bit (no fastmath: no reassociation or fused
multiply-add): positions and colours in float64, feature means in float32 with the same
rounding steps, the norm of an int8 row from the exact integer sum of its squared codes (what
float32 einsum gives for them: the sums stay below 2**24), per-voxel sums in the order of the
same np.argsort. Compiled on first use (~1 s) and cached on disk like mapping.kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import threading
from typing import NamedTuple

import numpy as np

from ros2_sab3r.mapping.kernels import compile_cached
from ros2_sab3r.mapping.keys import KEY_BITS, KEY_OFFSET

_OFFSET = np.int64(KEY_OFFSET)
_SHIFT_I, _SHIFT_J = np.int64(2 * KEY_BITS), np.int64(KEY_BITS)
_MAGIC = np.float32(1.5 * 2 ** 23)  # x + _MAGIC - _MAGIC rounds float32 x half to even
_LOCK = threading.Lock()
_KERNELS = None


class _Kernels(NamedTuple):
    """The compiled kernels, by name (numba dispatchers)."""

    fold_scalars: Callable
    fold_int8: Callable
    fold_both: Callable
    init_slots: Callable
    row_sums: Callable
    select_keys: Callable
    voxel_sums: Callable
    merge_index: Callable
    lookup_sorted: Callable


def _compile():
    return compile_cached(_define, 'fold kernels')


def _define(cache: bool):
    from numba import njit

    @njit(cache=cache, nogil=True, boundscheck=False)
    def fold_scalars(rows, src, stamp, wsum, psum, csum, weight, pos, color, count,
                     last_seen):  # pragma: no cover - compiled
        for i in range(rows.shape[0]):
            r = rows[i]
            s = src[i]
            w_old = np.float64(weight[r])
            w_new = w_old + wsum[s]
            for k in range(3):
                pos[r, k] = (w_old * np.float64(pos[r, k]) + psum[s, k]) / w_new
                color[r, k] = (w_old * np.float64(color[r, k]) + csum[s, k]) / w_new
            count[r] += 1
            weight[r] = w_new
            last_seen[r] = stamp

    # no NaN/inf/signed-zero care (lets LLVM vectorise the max |x| reduction); no 'contract'
    # or 'reassoc': the products and sums round as numpy's do
    @njit(cache=cache, nogil=True, boundscheck=False, fastmath={'nnan', 'ninf', 'nsz'})
    def fold_int8(rows, src, fsum, fw, values, scale, norm, w_store,
                  with_norm):  # pragma: no cover - compiled
        k = values.shape[1]
        mean = np.empty(k, np.float32)
        for i in range(rows.shape[0]):
            s = src[i]
            f = fw[s]
            if not f > 0:
                continue
            r = rows[i]
            w_old = w_store[r]
            w_new = np.float32(w_old + f)
            a = np.float32(w_old / w_new)
            b = np.float32(np.float32(1.0) / w_new)
            sc = scale[r]
            v = values[r]  # 1-d views (see row_sums)
            x = fsum[s]
            for j in range(k):
                mean[j] = np.float32(np.float32(v[j]) * sc) * a + x[j] * b
            top = np.float32(0.0)
            for j in range(k):
                top = max(top, abs(mean[j]))
            new_scale = np.float32(top / np.float32(127.0))
            inv = np.float32(0.0)
            if new_scale > 0:
                inv = np.float32(np.float32(1.0) / new_scale)
            ssq = np.int32(0)  # < 127**2 * 512 < 2**31
            for j in range(k):
                # round half to even (np.rint) by the float32 magic number: exact for |x| <
                # 2**22, here |x| <= 127 (+ rounding); a libm rint call per element cost 5x
                x = np.float32(mean[j] * inv)
                q = np.float32(np.float32(x + _MAGIC) - _MAGIC)
                q = min(max(q, np.float32(-127.0)), np.float32(127.0))
                qi = np.int32(q)
                v[j] = np.int8(qi)
                ssq += qi * qi
            scale[r] = new_scale
            if with_norm:
                norm[r] = new_scale * np.sqrt(np.float32(ssq))
            w_store[r] = w_new

    @njit(cache=cache, nogil=True, boundscheck=False)
    def touch(rows, src, wsum, psum, csum, fsum, weight, pos, color, count, last_seen, values,
              scale, norm, w_store):  # pragma: no cover - compiled
        # one load per cache line of every touched slot, with nothing in between: the CPU
        # keeps dozens of these misses in flight, where the folding loops (long bodies per
        # slot) waited for each; returned so that the loads stay
        acc = 0.0
        k = values.shape[1]
        for i in range(rows.shape[0]):
            r = rows[i]
            acc += weight[r] + pos[r, 0] + color[r, 0] + count[r] + last_seen[r]
            for j in range(0, k, 64):
                acc += values[r, j]
            acc += scale[r] + norm[r] + w_store[r]
            s = src[i]  # the batch's sums are in key order, the slots are not
            acc += wsum[s] + psum[s, 0] + csum[s, 0]
            for j in range(0, fsum.shape[1], 16):
                acc += fsum[s, j]
        return acc

    @njit(cache=cache, nogil=True, boundscheck=False)
    def fold_both(rows, src, stamp, wsum, psum, csum, weight, pos, color, count, last_seen,
                  fsum, fw, values, scale, norm, w_store, with_norm):  # pragma: no cover
        acc = touch(rows, src, wsum, psum, csum, fsum, weight, pos, color, count, last_seen,
                    values, scale, norm, w_store)
        fold_scalars(rows, src, stamp, wsum, psum, csum, weight, pos, color, count, last_seen)
        fold_int8(rows, src, fsum, fw, values, scale, norm, w_store, with_norm)
        return acc

    @njit(cache=cache, nogil=True, boundscheck=False)
    def init_slots(rows, src, ukeys, keys, valid, weight, count, pos, color, clip_w, clip_norm,
                   dino_w):  # pragma: no cover - compiled
        for i in range(rows.shape[0]):
            r = rows[i]
            keys[r] = ukeys[src[i]]
            valid[r] = True
            weight[r] = 0.0
            count[r] = 0
            for k in range(3):
                pos[r, k] = 0.0
                color[r, k] = 0.0
            clip_w[r] = 0.0
            clip_norm[r] = 0.0
            dino_w[r] = 0.0

    @njit(cache=cache, nogil=True, boundscheck=False)
    def row_sums(indptr, cols, w, S, out):  # pragma: no cover - compiled
        # rows as 1-d views: LLVM vectorises the axpy over them (not over out[u, j], S[c, j])
        for u in range(indptr.shape[0] - 1):
            o = out[u]
            for jj in range(indptr[u], indptr[u + 1]):
                x = S[cols[jj]]
                a = w[jj]
                for j in range(o.shape[0]):
                    o[j] += a * x[j]

    @njit(cache=cache, nogil=True, boundscheck=False)
    def select_keys(X, C, vs, min_conf, limit, keys, sel):  # pragma: no cover - compiled
        # float32 throughout, as numpy computes floor(X / voxel_size) for float32 X
        n = 0
        for i in range(X.shape[0]):
            c = C[i]
            if not (np.isfinite(c) and c >= min_conf):
                continue
            fi = np.floor(X[i, 0] / vs)
            fj = np.floor(X[i, 1] / vs)
            fk = np.floor(X[i, 2] / vs)
            if not (abs(fi) < limit and abs(fj) < limit and abs(fk) < limit):  # NaN: False
                continue
            keys[n] = (((np.int64(fi) + _OFFSET) << _SHIFT_I) | ((np.int64(fj) + _OFFSET)
                                                                << _SHIFT_J)
                       | (np.int64(fk) + _OFFSET))
            sel[n] = i
            n += 1
        return n

    @njit(cache=cache, nogil=True, boundscheck=False)
    def voxel_sums(sorted_keys, pts, X, C, rgb, cells, with_cells, ukeys, wsum, psum, csum,
                   indptr, cols, w_cols, fw):  # pragma: no cover - compiled
        # one pass over the points in key order (sorted_keys, pts: gathered by numpy, whose
        # independent loads overlap where this loop's would wait on each other); each sum runs
        # in that order from 0, as np.bincount's do (float64 weights, products with the
        # float32 / uint8 values)
        U = -1
        nnz = 0
        last = np.int64(0)
        top = np.int64(-1)
        fw_acc = 0.0
        for t in range(pts.shape[0]):
            key = sorted_keys[t]
            if U < 0 or key != last:
                if U >= 0:
                    fw[U] = np.float32(fw_acc)
                U += 1
                last = key
                ukeys[U] = key
                wsum[U] = 0.0
                for k in range(3):
                    psum[U, k] = 0.0
                    csum[U, k] = 0.0
                indptr[U] = nnz
                fw_acc = 0.0
            p = pts[t]
            w = np.float64(C[p])
            wsum[U] += w
            for k in range(3):
                psum[U, k] += w * np.float64(X[p, k])
                csum[U, k] += w * np.float64(rgb[p, k])
            if with_cells:
                cell = cells[p]
                if cell >= 0:
                    cols[nnz] = cell
                    w_cols[nnz] = np.float32(w)
                    fw_acc += np.float64(np.float32(w))
                    nnz += 1
                    top = max(top, cell)
        if U >= 0:
            fw[U] = np.float32(fw_acc)
        indptr[U + 1] = nnz
        return U + 1, nnz, top

    @njit(cache=cache, nogil=True, boundscheck=False)
    def lookup_sorted(index, keys, pos, found):  # pragma: no cover - compiled
        # np.searchsorted(index, keys) for ascending keys: from where the last key stopped,
        # doubling steps then bisection (short hops over a 1M index where numpy's search
        # starts over at its top levels, cache misses each)
        n = index.shape[0]
        lo = 0
        for i in range(keys.shape[0]):
            key = keys[i]
            if lo < n and index[lo] < key:
                prev = lo  # index[prev] < key
                step = 1
                hi = lo + 1
                while hi < n and index[hi] < key:
                    prev = hi
                    step *= 2
                    hi = prev + step
                hi = min(hi, n)  # index[hi] >= key, or the end
                lo = prev + 1
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if index[mid] < key:
                        lo = mid + 1
                    else:
                        hi = mid
            pos[i] = lo
            found[i] = lo < n and index[lo] == key

    @njit(cache=cache, nogil=True, boundscheck=False)
    def merge_index(keys, slots, drop, with_drop, at, new_keys, new_slots, out_keys,
                    out_slots):  # pragma: no cover - compiled
        # np.insert(keys[~drop], ..) with `at` counted in keys (ascending; the new entries go
        # before the old one at the same place), for keys and slots in one pass
        j = 0
        src = 0
        n = keys.shape[0]
        for i in range(at.shape[0] + 1):
            stop = at[i] if i < at.shape[0] else n
            while src < stop:
                if not (with_drop and drop[src]):
                    out_keys[j] = keys[src]
                    out_slots[j] = slots[src]
                    j += 1
                src += 1
            if i < at.shape[0]:
                out_keys[j] = new_keys[i]
                out_slots[j] = new_slots[i]
                j += 1
        return j

    return _Kernels(fold_scalars, fold_int8, fold_both, init_slots, row_sums, select_keys,
                    voxel_sums, merge_index, lookup_sorted)


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                _KERNELS = _compile()
    return _KERNELS


def fold_scalars(rows: np.ndarray, src: np.ndarray, stamp_ns: int, wsum: np.ndarray,
                 psum: np.ndarray, csum: np.ndarray, weight: np.ndarray, pos: np.ndarray,
                 color: np.ndarray, count: np.ndarray, last_seen: np.ndarray) -> None:
    """Fold batch voxel sums src[i] (wsum (U,) float64, psum/csum (U, 3) float64) into the
    block's slots rows[i] in place: weighted means of position and colour, weight, count + 1,
    last_seen = stamp_ns."""
    _kernels().fold_scalars(rows, src, np.int64(stamp_ns), wsum, psum, csum, weight, pos, color,
                            count, last_seen)


def fold_int8(rows: np.ndarray, src: np.ndarray, fsum: np.ndarray, fw: np.ndarray,
              values: np.ndarray, scale: np.ndarray, norm: np.ndarray | None,
              w_store: np.ndarray) -> None:
    """Fold feature sums fsum[src[i]] (float32, weight fw[src[i]]; skipped where it is 0) into
    the int8 running means at rows[i] (values (slots, k) int8, scale, weight w_store), in place,
    as mapping.codec.fold_int8_mean does; norm (unless None) gets the stored rows' L2 norms."""
    with_norm = norm is not None
    _kernels().fold_int8(rows, src, fsum, fw, values, scale, norm if with_norm else scale,
                         w_store, with_norm)


def fold_block(rows: np.ndarray, src: np.ndarray, stamp_ns: int, wsum: np.ndarray,
               psum: np.ndarray, csum: np.ndarray, weight: np.ndarray, pos: np.ndarray,
               color: np.ndarray, count: np.ndarray, last_seen: np.ndarray, fsum: np.ndarray,
               fw: np.ndarray, values: np.ndarray, scale: np.ndarray, norm: np.ndarray | None,
               w_store: np.ndarray) -> None:
    """:func:`fold_scalars` then :func:`fold_int8` in one call (one dispatch per block: with
    ~250 small blocks per keyframe, numba's argument checks are a good part of the time)."""
    with_norm = norm is not None
    _kernels().fold_both(rows, src, np.int64(stamp_ns), wsum, psum, csum, weight, pos, color,
                         count, last_seen, fsum, fw, values, scale,
                         norm if with_norm else scale, w_store, with_norm)


def init_slots(rows: np.ndarray, src: np.ndarray, ukeys: np.ndarray, blk) -> None:
    """Make the block's slots rows[i] empty voxels of key ukeys[src[i]] (weights, count,
    position, colour and feature weights 0), so that folding a batch into them gives a new
    voxel's values."""
    _kernels().init_slots(rows, src, ukeys, blk.keys, blk.valid, blk.weight, blk.count,
                          blk.pos, blk.color, blk.clip_w, blk.clip_norm, blk.dino_w)


def weighted_row_sums(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, S: np.ndarray
                      ) -> np.ndarray:
    """(U, k) float32: row u sums w[jj] * S[cols[jj]] over jj in indptr[u]:indptr[u + 1], in
    that order (the CSR matrix (w, cols, indptr) times S, as scipy.sparse computes it in
    float32; one float32 axpy per entry, which its kernel runs ~5x slower). cols must be
    within S's rows (not checked)."""
    S = np.ascontiguousarray(S, np.float32)
    out = np.zeros((len(indptr) - 1, S.shape[1]), np.float32)
    _kernels().row_sums(np.ascontiguousarray(indptr, np.int64),
                        np.ascontiguousarray(cols, np.int64),
                        np.ascontiguousarray(w, np.float32), S, out)
    return out


@dataclass(frozen=True)
class BatchSums:
    """A batch of points summed per voxel (what SemanticVoxelMap.integrate folds into the map).

    ukeys (U,) int64, the voxels' keys, ascending; wsum (U,) float64, the sum of the points'
    confidences; psum, csum (U, 3) float64: sums of confidence x position / colour;
    pts (n,) the selected points, grouped by voxel in ukeys' order. With feature cells: the
    (U, M) weights of each voxel's points per feature cell as CSR (indptr (U + 1,), cols and
    w_cols (nnz,) float32, duplicates summed by the row sums) and fw (U,) float32, each voxel's
    feature weight; else those are None.
    """

    ukeys: np.ndarray
    wsum: np.ndarray
    psum: np.ndarray
    csum: np.ndarray
    pts: np.ndarray
    indptr: np.ndarray | None
    cols: np.ndarray | None
    w_cols: np.ndarray | None
    fw: np.ndarray | None


def batch_sums(X_W: np.ndarray, C: np.ndarray, rgb: np.ndarray, voxel_size: float,
               min_confidence: float, cells: np.ndarray | None, n_cells: int = 0
               ) -> BatchSums | None:
    """Sum the points X_W (N, 3) float32 with confidences C (N,) float32 (those at least
    min_confidence, finite, inside the key range) and colours rgb (N, 3) uint8 per voxel of
    voxel_size; cells (N,) int64, each point's feature cell (-1: none), or None. None when no
    point is kept. Same values, bit for bit, as the numpy formulation (floor, np.argsort of the
    packed keys, np.bincount per voxel) these loops replace (tests/mapping/test_fold_kernels.py).
    """
    kernels = _kernels()
    N = len(X_W)
    keys = np.empty(N, np.int64)
    sel = np.empty(N, np.int64)
    n = kernels.select_keys(X_W, C, np.float32(voxel_size), np.float32(min_confidence),
                   np.float32(KEY_OFFSET - 2), keys, sel)
    if n == 0:
        return None
    keys, sel = keys[:n], sel[:n]
    order = np.argsort(keys)  # the sort np.unique would do; its order within a voxel kept
    pts = sel[order]
    with_cells = cells is not None
    m = n if with_cells else 0
    out = (np.empty(n, np.int64), np.empty(n, np.float64), np.empty((n, 3), np.float64),
           np.empty((n, 3), np.float64), np.empty(n + 1, np.int64), np.empty(m, np.int64),
           np.empty(m, np.float32), np.empty(n, np.float32))
    # (without cells the loop never reads them: `keys` stands in, an int64 array like cells)
    U, nnz, top = kernels.voxel_sums(keys[order], pts, X_W, C, rgb,
                                     cells if with_cells else keys, with_cells, *out)
    if with_cells and top >= n_cells:  # the row sums do not check their indices
        raise ValueError(f'integrate: feature cell index {top} out of range for {n_cells} '
                         f'feature cells')
    ukeys, wsum, psum, csum, indptr, cols, w_cols, fw = out
    return BatchSums(ukeys[:U], wsum[:U], psum[:U], csum[:U], pts,
                     indptr[:U + 1] if with_cells else None,
                     cols[:nnz] if with_cells else None, w_cols[:nnz] if with_cells else None,
                     fw[:U] if with_cells else None)


def lookup_sorted(index: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(np.searchsorted(index, keys), whether index holds each key) for int64 `index` and
    `keys`, both ascending."""
    pos = np.empty(len(keys), np.int64)
    found = np.empty(len(keys), np.bool_)
    _kernels().lookup_sorted(np.ascontiguousarray(index, np.int64),
                             np.ascontiguousarray(keys, np.int64), pos, found)
    return pos, found


def insert_sorted(keys: np.ndarray, slots: np.ndarray, at: np.ndarray, new_keys: np.ndarray,
                  new_slots: np.ndarray, drop: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(np.insert(keys, at, new_keys), np.insert(slots, at, new_slots)) for int64 arrays and
    ascending `at`, in one pass; with drop (a bool per entry), the entries it marks are left
    out (`at` still counts them)."""
    n_drop = 0 if drop is None else int(np.count_nonzero(drop))
    n = len(keys) - n_drop + len(new_keys)
    out_keys, out_slots = np.empty(n, np.int64), np.empty(n, np.int64)
    written = _kernels().merge_index(
        keys, slots, np.zeros(0, np.bool_) if drop is None else drop, drop is not None,
        np.ascontiguousarray(at, np.int64), np.ascontiguousarray(new_keys, np.int64),
        np.ascontiguousarray(new_slots, np.int64), out_keys, out_slots)
    assert written == n
    return out_keys, out_slots
