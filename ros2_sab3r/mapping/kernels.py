"""Compiled kernels for Locate's similarity pass on int8 codes (mapping.feature_codec 'int8' and
'pca_int8'), through numba.

Why not torch or BLAS: the product of a few embeddings (T = 1-8) with a block of int8 codes is
a skinny matrix product, and both ways BLAS offers are slow for it on a CPU. Measured on the
development machine (AMD EPYC, AVX2 only, MKL torch), 1,080,276 voxels of 128-d codes, one
thread: widening the codes to float32 and ``torch.mm`` took 43 ms for T = 1 and 89 ms for T = 5
(the widening alone ~24 ms; BLAS runs an m = 5 product at ~12 GFLOP/s); torch's int8 paths
(``_int_mm``, ``_weight_int8pack_mm``) were 25-60x slower per block, and fbgemm's dynamic int8
linear needs prepacked copies of every block (660 ms, and twice the memory). A loop compiled by
numba reads the int8 codes once, widens four rows at a time into a float32 buffer and keeps four
running sums per embedding: 15 ms for T = 1, 30 ms for T = 5, 46 ms for T = 8 (a row at a time:
14, 52 and 86 ms; same machine, load 2.1). For more embeddings (the 'calibrated' vocabulary, ~70)
BLAS wins again: see :data:`MAX_COMPILED_EMBEDDINGS`.

Compiled on first use (~0.7 s) and cached on disk where numba can write (NUMBA_CACHE_DIR when
set, else beside this file, else numba's per-user cache directory); where none is writable (a
read-only install under a user without a home) it is compiled without a cache, each process
paying the compile once. :func:`warm_up` compiles ahead (the query engine calls it).
"""

from __future__ import annotations

from collections.abc import Callable
import logging
import threading
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)
_T = TypeVar('_T')

# Up to this many embeddings per pass the compiled loop clearly beats widening + BLAS (per 1M
# voxels on one thread, load 2: T = 8 49 against 86 ms, 16: 89 / 125, 24: 134 / 207; from 32
# on within 6-20%, 72: 484 / 514); beyond it the caller uses torch.
MAX_COMPILED_EMBEDDINGS = 24

_LOCK = threading.Lock()
_KERNEL = None


def compile_cached(define: Callable[[bool], _T], what: str) -> _T:
    """define(cache=True), the numba kernels on numba's disk cache; define(cache=False) with a
    warning where numba finds no writable cache directory (it raises RuntimeError, 'no locator',
    when the decorator runs). `what` names the kernels in the warning."""
    try:
        return define(True)
    except RuntimeError as err:
        log.warning('%s compiled without an on-disk cache (%s); set NUMBA_CACHE_DIR to a '
                    'writable directory to keep them between runs', what, err)
        return define(False)


def _compile():
    return compile_cached(_define, 'similarity kernel')


def _define(cache: bool):
    from numba import njit  # imported on first use: mapping without Locate does not need it

    @njit(cache=cache, nogil=True, fastmath=True, boundscheck=False)
    def int8_dots(F, E, out, col0):  # pragma: no cover - compiled
        """out[t, col0 + i] = sum_j E[t, j] * F[i, j]; F (n, k) int8, E (T, k) float32.

        Four rows at a time: each widened once into a float32 buffer, then each embedding
        meets the four in one pass over j (four running sums that LLVM vectorises over j, one
        load of E[t] per four rows). A row at a time widened every row T times and loaded E[t]
        per row: 52 against 30 ms for T = 5 on 1M voxels, one thread."""
        n, k = F.shape
        T = E.shape[0]
        b0 = np.empty(k, np.float32)
        b1 = np.empty(k, np.float32)
        b2 = np.empty(k, np.float32)
        b3 = np.empty(k, np.float32)
        n4 = n - n % 4
        for i in range(0, n4, 4):
            for j in range(k):
                b0[j] = F[i, j]
                b1[j] = F[i + 1, j]
                b2[j] = F[i + 2, j]
                b3[j] = F[i + 3, j]
            for t in range(T):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for j in range(k):
                    e = E[t, j]
                    s0 += e * b0[j]
                    s1 += e * b1[j]
                    s2 += e * b2[j]
                    s3 += e * b3[j]
                out[t, col0 + i] = s0
                out[t, col0 + i + 1] = s1
                out[t, col0 + i + 2] = s2
                out[t, col0 + i + 3] = s3
        for i in range(n4, n):  # the last n % 4 rows
            for t in range(T):
                s = np.float32(0.0)
                for j in range(k):
                    s += E[t, j] * np.float32(F[i, j])
                out[t, col0 + i] = s

    return int8_dots


def int8_dots(F: np.ndarray, E: np.ndarray, out: np.ndarray, col0: int) -> None:
    """Write E @ F.T into out[:, col0:col0 + len(F)]: F (n, k) int8 codes, E (T, k) float32
    (contiguous), out (T, M) float32. Releases the GIL while it runs (threads can share blocks)."""
    global _KERNEL
    if _KERNEL is None:
        with _LOCK:
            if _KERNEL is None:
                _KERNEL = _compile()
    _KERNEL(F, E, out, col0)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel for the shapes Locate uses."""
    out = np.empty((1, 2), np.float32)
    int8_dots(np.zeros((2, 4), np.int8), np.zeros((1, 4), np.float32), out, 0)
