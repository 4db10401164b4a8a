"""Compiled kernels folding a batch's per-voxel sums into voxels already in the map, one block at
a time (SemanticVoxelMap._update for re-observed voxels), through numba.

Why: a keyframe re-observing 40k voxels spread over a 1M-voxel map touches ~250 blocks. The
numpy path gathered every field of the touched slots from each block, computed, and scattered
them back (~25 small operations per block), and decoded, folded and re-encoded the int8 codes
in several full passes over (n, k) temporaries; at 0.56-0.93 M points/s this was most of the
integration time. These loops read and write each touched slot once, in place.

They reproduce the numpy arithmetic bit for bit (no fastmath: no reassociation or fused
multiply-add): positions and colours in float64, feature means in float32 with the same
rounding steps, the norm of an int8 row from the exact integer sum of its squared codes (what
float32 einsum gives for them: the sums stay below 2**24). Compiled on first use (~1 s) and
cached on disk like mapping.kernels.
"""

from __future__ import annotations

import threading

import numpy as np

from ros2_sab3r.mapping.kernels import compile_cached

_MAGIC = np.float32(1.5 * 2 ** 23)  # x + _MAGIC - _MAGIC rounds float32 x half to even
_LOCK = threading.Lock()
_KERNELS = None


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

    return fold_scalars, fold_int8, fold_both, init_slots, row_sums


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
    _kernels()[0](rows, src, np.int64(stamp_ns), wsum, psum, csum, weight, pos, color, count,
                  last_seen)


def fold_int8(rows: np.ndarray, src: np.ndarray, fsum: np.ndarray, fw: np.ndarray,
              values: np.ndarray, scale: np.ndarray, norm: np.ndarray | None,
              w_store: np.ndarray) -> None:
    """Fold feature sums fsum[src[i]] (float32, weight fw[src[i]]; skipped where it is 0) into
    the int8 running means at rows[i] (values (slots, k) int8, scale, weight w_store), in place,
    as mapping.codec.fold_int8_mean does; norm (unless None) gets the stored rows' L2 norms."""
    with_norm = norm is not None
    _kernels()[1](rows, src, fsum, fw, values, scale, norm if with_norm else scale, w_store,
                  with_norm)


def fold_block(rows: np.ndarray, src: np.ndarray, stamp_ns: int, wsum: np.ndarray,
               psum: np.ndarray, csum: np.ndarray, weight: np.ndarray, pos: np.ndarray,
               color: np.ndarray, count: np.ndarray, last_seen: np.ndarray, fsum: np.ndarray,
               fw: np.ndarray, values: np.ndarray, scale: np.ndarray, norm: np.ndarray | None,
               w_store: np.ndarray) -> None:
    """:func:`fold_scalars` then :func:`fold_int8` in one call (one dispatch per block: with
    ~250 small blocks per keyframe, numba's argument checks are a good part of the time)."""
    with_norm = norm is not None
    _kernels()[2](rows, src, np.int64(stamp_ns), wsum, psum, csum, weight, pos, color, count,
                  last_seen, fsum, fw, values, scale, norm if with_norm else scale, w_store,
                  with_norm)


def init_slots(rows: np.ndarray, src: np.ndarray, ukeys: np.ndarray, blk) -> None:
    """Make the block's slots rows[i] empty voxels of key ukeys[src[i]] (weights, count,
    position, colour and feature weights 0), so that folding a batch into them gives a new
    voxel's values."""
    _kernels()[3](rows, src, ukeys, blk.keys, blk.valid, blk.weight, blk.count, blk.pos,
                  blk.color, blk.clip_w, blk.clip_norm, blk.dino_w)


def weighted_row_sums(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, S: np.ndarray
                      ) -> np.ndarray:
    """(U, k) float32: row u sums w[jj] * S[cols[jj]] over jj in indptr[u]:indptr[u + 1], in
    that order (the CSR matrix (w, cols, indptr) times S, as scipy.sparse computes it in
    float32; one float32 axpy per entry, which its kernel runs ~5x slower). cols must be
    within S's rows (not checked)."""
    S = np.ascontiguousarray(S, np.float32)
    out = np.zeros((len(indptr) - 1, S.shape[1]), np.float32)
    _kernels()[4](np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(cols, np.int64),
                  np.ascontiguousarray(w, np.float32), S, out)
    return out
