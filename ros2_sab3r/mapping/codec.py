"""Feature codecs of the map's CLIP features (``mapping.feature_codec``).

'bf16' (the default): bfloat16 bit patterns (uint16), numpy having no bfloat16. 'int8': int8
values with one float32 scale per voxel (max |x| / 127), half the bytes; every Locate reads all
CLIP features, so it reads half as much, and multiplies them in float32 after an exact widening
(on a CPU without bf16 matrix units 3-4x faster per block than the bf16 product). Rounding
moves a stored unit feature by at most 1/254 of its largest channel per element: cosines with
a query change by ~1e-3 (measured in tests/mapping/test_feature_codec.py, bounded there at
1e-2), the relevancy of a voxel by a few thousandths.

'pca_int8': int8 codes (per-voxel scale) of the features projected on an orthonormal basis
fitted to the map (:class:`FeatureProjection`; mapping.clip_projection_dim, dino_projection_dim):
at 128 of 512 CLIP channels and 64 DINO channels a voxel takes ~280 bytes instead of ~1.2 KB
(bf16 with fp16 DINO), and Locate reads a quarter of the int8 bytes. Locate projects each text
embedding once and computes its similarity in the projected space (MapSnapshot.cosine): the
part of a stored feature outside the basis is dropped, which is why the basis is refitted as
soon as a keyframe brings features that leave its span (the stored codes are then rotated into
the new basis). Dense CLIP features of a scene span far fewer directions than their 512 channels;
tolerances on the evaluation scenes are in tests/mapping/test_feature_codec.py.

Why bfloat16 for CLIP: every Locate multiplies all CLIP features by the query embeddings; at 500k
voxels x 512 that reads 0.5 GB, and CPUs with bf16 matrix units (AVX512-BF16, AMX) do it about
twice as fast as from fp16 (torch, 2 cores: ~25 ms vs ~50 ms). bfloat16 keeps 8 mantissa bits:
the cosine similarity of a stored feature changes by ~1e-3 at most, far below the relevancy
margins.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from ros2_sab3r.config import FEATURE_CODECS

__all__ = ['FEATURE_CODECS', 'FeatureProjection', 'bf16_decode', 'bf16_encode',
           'fold_bf16_mean', 'fold_int8_mean', 'int8_decode', 'int8_encode']


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bfloat16 bit patterns (round to nearest even; finite input)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_decode(b: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 array (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def fold_bf16_mean(clip: np.ndarray, clip_norm: np.ndarray, rows: np.ndarray, fsum: np.ndarray,
                   w_old: np.ndarray, w_new: np.ndarray) -> None:
    """Fold weighted feature sums fsum (n, F) into running means stored as bfloat16 bits.

    clip: (slots, F) uint16 means, clip_norm: (slots,) their L2 norms, both updated at `rows`
    (the mean becomes (w_old * mean + fsum) / w_new). fsum is overwritten.

    Plain numpy on purpose, in as few passes as possible: torch would use several threads per
    operation, which on a small shared CPU costs more in thread wake-ups than it gains.
    """
    n, dim = fsum.shape
    halves = np.zeros((n, dim, 2), np.uint16)  # little-endian float32: high half = bf16 bits
    halves[..., 1] = clip[rows]
    mean = halves.view(np.float32).reshape(n, dim)  # exact bf16 -> float32
    mean *= (w_old / w_new).astype(np.float32)[:, None]
    fsum *= (1.0 / w_new).astype(np.float32)[:, None]
    mean += fsum
    clip_norm[rows] = np.sqrt(np.einsum('ij,ij->i', mean, mean))
    u = mean.view(np.uint32)  # round to nearest even in place, then keep the high halves
    carry = u >> 16
    carry &= 1
    u += carry
    u += 0x7FFF
    clip[rows] = halves[..., 1]


def int8_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, F) float -> ((n, F) int8, (n,) float32 scale): x ~ q * scale, scale = max|x| / 127
    per row (0 for an all-zero row)."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32) if x.size else \
        np.zeros(len(x), np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.rint(x * inv[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def int8_decode(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, F) int8 and (n,) scales -> (n, F) float32."""
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)[:, None]


def fold_int8_mean(clip: np.ndarray, clip_scale: np.ndarray, clip_norm: np.ndarray | None,
                   rows: np.ndarray, fsum: np.ndarray, w_old: np.ndarray,
                   w_new: np.ndarray) -> None:
    """:func:`fold_bf16_mean` for int8 means with a per-voxel scale: the stored mean is decoded,
    folded in float32 and encoded again; clip_norm (unless None) gets the norm of the stored
    (encoded) mean, so that a cosine computed from the stored values is exact up to the
    product's rounding."""
    mean = int8_decode(clip[rows], clip_scale[rows])
    mean *= (w_old / w_new).astype(np.float32)[:, None]
    fsum *= (1.0 / w_new).astype(np.float32)[:, None]
    mean += fsum
    q, scale = int8_encode(mean)
    clip[rows] = q
    clip_scale[rows] = scale
    if clip_norm is None:
        return
    qf = q.astype(np.float32)
    clip_norm[rows] = scale * np.sqrt(np.einsum('ij,ij->i', qf, qf))



class FeatureProjection:
    """An orthonormal basis P (F, k) fitted to a map's features, refitted when they drift.

    Fitted uncentred (what must survive are dot products with arbitrary query vectors). The
    history is kept as its projection on the basis, ``moment`` = sum of (S P)^T (S P) over the
    rows that fed it (k, k), which is what the map can represent anyway; a refit
    finds the dominant k-dimensional subspace of P moment P^T + S^T S of the new rows.

    Drift is judged cell by cell, not on average: a small object new to the map is a few dozen
    feature cells of a keyframe, and its features would be projected away unnoticed by a mean.
    ``fit_residual`` is the median share of a cell's energy outside the basis, measured on the
    keyframe of the last fit, mostly on cells the fit did not see (in-sample, a 128-d fit to a
    few hundred noisy rows looks better than it is). A keyframe triggers a refit when more than
    :data:`MIN_OUTLIERS` (and :data:`MIN_OUTLIER_SHARE`) of its cells exceed it by
    ``refit_residual``; the refit takes all those cells and a sample of the others.
    The writer owns an instance; snapshots get :attr:`basis`, a read-only array that a refit
    replaces (never writes).
    """

    SAMPLE = 256  # rows per keyframe that feed the history (cost ~SAMPLE * k * k)
    MAX_OUTLIERS = 1024  # outlier rows a refit takes at most
    MIN_OUTLIERS = 4  # fewer drifting cells than this are noise, not a new object
    MIN_OUTLIER_SHARE = 0.002  # nor fewer than this share of the keyframe's cells

    def __init__(self, dim: int, rank: int, refit_residual: float,
                 basis: np.ndarray | None = None, moment: np.ndarray | None = None,
                 fit_residual: float = 0.0) -> None:
        self.dim = int(dim)
        self.rank = min(int(rank), self.dim)
        self.refit_residual = float(refit_residual)
        self.basis = None if basis is None else _frozen(np.array(basis, np.float32))
        self.moment = (np.zeros((self.rank, self.rank)) if moment is None
                       else np.array(moment, np.float64))
        self.fit_residual = float(fit_residual)
        self.refits = 0  # refits after the first fit (tests, benchmarks)
        self._rng = np.random.default_rng(0)

    def _pick(self, n: int, k: int) -> np.ndarray:
        return np.arange(n) if n <= k else np.sort(self._rng.choice(n, k, replace=False))

    def residuals(self, S: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
        """(n,) share of each row's energy outside the basis (S (n, F); Y = S @ basis when
        already computed); 0 for zero rows, 1 without a basis."""
        total = np.einsum('ij,ij->i', S, S)
        if self.basis is None:
            return (total > 0).astype(np.float32)
        Y = S @ self.basis if Y is None else Y
        kept = np.einsum('ij,ij->i', Y, Y)
        return np.clip(1.0 - np.divide(kept, total, out=np.ones_like(total), where=total > 0),
                       0.0, 1.0)

    def observe(self, S: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray | None:
        """Take a keyframe's feature rows S (n, F) into account (Y = S @ basis when already
        computed): fits the first basis, or refits on drift. Returns R (k, k) when an existing
        basis was replaced (stored codes c in the old basis become c @ R in the new one), else
        None."""
        S = np.asarray(S, np.float32)
        if not len(S):
            return None
        if self.basis is None:
            return self.fit(S[self._pick(len(S), 2 * self.SAMPLE)], S)
        Y = S @ self.basis if Y is None else Y
        out = np.flatnonzero(self.residuals(S, Y) > self.fit_residual + self.refit_residual)
        if len(out) < max(self.MIN_OUTLIERS, self.MIN_OUTLIER_SHARE * len(S)):
            pick = self._pick(len(S), self.SAMPLE)
            self.moment += Y[pick].T.astype(np.float64) @ Y[pick]
            return None
        rows = np.union1d(out[self._pick(len(out), self.MAX_OUTLIERS)],
                          self._pick(len(S), self.SAMPLE))
        return self.fit(S[rows], S)

    def fit(self, S: np.ndarray, judge: np.ndarray | None = None) -> np.ndarray | None:
        """Fit the basis to rows S (n, F) and the history (refit), whatever the drift; returns
        the rotation of stored codes as :meth:`observe` does. ``fit_residual`` is measured on
        the rows `judge` (default S)."""
        S = np.asarray(S, np.float32)
        old = self.basis
        M = (S.T @ S).astype(np.float64)  # (F, F), the product in float32 (half the time)
        if old is not None:
            P = old.astype(np.float64)
            M += P @ self.moment @ P.T
        start = (self._rng.standard_normal((self.dim, self.rank)) if old is None else
                 old + 0.05 / np.sqrt(self.dim) * self._rng.standard_normal(old.shape))
        top = _dominant_subspace(M, start, self._rng)  # (F, k) float64
        total = float(np.trace(M))
        self.moment = top.T @ M @ top
        self.basis = _frozen(np.ascontiguousarray(top, np.float32))
        r = self.residuals(np.asarray(S if judge is None else judge, np.float32))
        self.fit_residual = float(np.median(r)) if len(r) and total > 0 else 0.0
        if old is None:
            return None
        self.refits += 1
        return (old.T @ self.basis).astype(np.float32)


SUBSPACE_ITERATIONS = 5


def _dominant_subspace(M: np.ndarray, start: np.ndarray, rng: np.random.Generator
                       ) -> np.ndarray:
    """Orthonormal basis (F, k) of the dominant k-dimensional eigen-subspace of the symmetric
    positive semi-definite M (F, F), by subspace iteration from `start` (F, k).

    Matrix products and k x k Cholesky factorisations only, no eigensolver or QR: those LAPACK
    routines, on BLAS threads meeting a busy CPU, took 0.1-6 s for a 512 x 512 eigh on the
    2-core development machine (a 128 x 128 one 0.5 s), where the products took milliseconds.
    The basis's order and rotation within the subspace do not matter to the codes.
    """
    Q = _orthonormal(np.asarray(start, np.float64), rng, 1)
    for i in range(SUBSPACE_ITERATIONS):
        Q = _orthonormal(M @ Q, rng, 2 if i == SUBSPACE_ITERATIONS - 1 else 1)
    return Q


def _orthonormal(Q: np.ndarray, rng: np.random.Generator, passes: int) -> np.ndarray:
    """Orthonormal columns spanning (about) those of Q (F, k), by Cholesky QR (twice: to
    working precision). A tiny random term keeps Q of full rank (M of lower rank than k, zero
    columns): the directions it adds carry no energy of M."""
    norm = float(np.abs(Q).max()) or 1.0
    Q = Q + 1e-6 * norm * rng.standard_normal(Q.shape)
    for _ in range(passes):
        L = np.linalg.cholesky(Q.T @ Q)
        Q = solve_triangular(L, Q.T, lower=True).T
    return Q


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
