"""Voxel keys: integer voxel indices (i, j, k) packed into one int64, 21 bits per axis.

Packed keys sort and search as plain integers (numpy searchsorted, no Python dict), and a
neighbour's key is the key plus a constant (:func:`key_offset`).
"""

from __future__ import annotations

import numpy as np

KEY_BITS = 21  # bits per axis
KEY_OFFSET = 1 << (KEY_BITS - 1)  # offset binary: indices in [-KEY_OFFSET, KEY_OFFSET) fit
_MASK = (1 << KEY_BITS) - 1


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """(N, 3) integer voxel indices -> (N,) int64 keys (21 bits per axis, offset binary)."""
    v = ijk.astype(np.int64) + KEY_OFFSET
    return (v[:, 0] << (2 * KEY_BITS)) | (v[:, 1] << KEY_BITS) | v[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """(N,) int64 keys -> (N, 3) int64 voxel indices."""
    return np.stack([(keys >> (2 * KEY_BITS)) & _MASK, (keys >> KEY_BITS) & _MASK, keys & _MASK],
                    -1) - KEY_OFFSET


def key_offset(di: int, dj: int, dk: int) -> int:
    """Packed-key difference of a neighbour at (di, dj, dk) (valid away from the range edges)."""
    return (di << (2 * KEY_BITS)) + (dj << KEY_BITS) + dk

