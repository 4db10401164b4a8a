"""Feature codecs of the map's CLIP features (``mapping.feature_codec``).

'bf16' (the default): bfloat16 bit patterns (uint16), numpy having no bfloat16. 'int8': int8
values with one float32 scale per voxel (max |x| / 127), half the bytes; every Locate reads all
CLIP features, so it reads half as much, and multiplies them in float32 after an exact widening
(on a CPU without bf16 matrix units 3-4x faster per block than the bf16 product). Rounding
moves a stored unit feature by at most 1/254 of its largest channel per element: cosines with
a query change by ~1e-3 (measured in tests/mapping/test_feature_codec.py, bounded there at
1e-2), the relevancy of a voxel by a few thousandths.

Why bfloat16 for CLIP: every Locate multiplies all CLIP features by the query embeddings; at 500k
voxels x 512 that reads 0.5 GB, and CPUs with bf16 matrix units (AVX512-BF16, AMX) do it about
twice as fast as from fp16 (torch, 2 cores: ~25 ms vs ~50 ms). bfloat16 keeps 8 mantissa bits:
the cosine similarity of a stored feature changes by ~1e-3 at most, far below the relevancy
margins.
"""

from __future__ import annotations

import numpy as np

from ros2_sab3r.config import FEATURE_CODECS

__all__ = ['FEATURE_CODECS', 'bf16_decode', 'bf16_encode', 'fold_bf16_mean', 'fold_int8_mean',
           'int8_decode', 'int8_encode']


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


def fold_int8_mean(clip: np.ndarray, clip_scale: np.ndarray, clip_norm: np.ndarray,
                   rows: np.ndarray, fsum: np.ndarray, w_old: np.ndarray,
                   w_new: np.ndarray) -> None:
    """:func:`fold_bf16_mean` for int8 means with a per-voxel scale: the stored mean is decoded,
    folded in float32 and encoded again; clip_norm gets the norm of the stored (encoded) mean,
    so that a cosine computed from the stored values is exact up to the product's rounding."""
    mean = int8_decode(clip[rows], clip_scale[rows])
    mean *= (w_old / w_new).astype(np.float32)[:, None]
    fsum *= (1.0 / w_new).astype(np.float32)[:, None]
    mean += fsum
    q, scale = int8_encode(mean)
    clip[rows] = q
    clip_scale[rows] = scale
    qf = q.astype(np.float32)
    clip_norm[rows] = scale * np.sqrt(np.einsum('ij,ij->i', qf, qf))

