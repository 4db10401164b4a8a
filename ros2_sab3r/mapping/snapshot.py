"""MapSnapshot: an immutable view of the semantic map at one moment, and its readers.

A snapshot holds references to the writer's blocks at publication; the writer copies a block
before writing it again (copy-on-write), so a query keeps reading a consistent map while
integration continues, without copying the whole map (at 500k voxels the CLIP features alone
are ~0.5 GB).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
import itertools
import logging
import threading

import numpy as np

from ros2_sab3r.mapping.blocks import BLOCK_SIZE
from ros2_sab3r.mapping.codec import bf16_decode, int8_decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectionState:
    """The basis a 'pca_int8' map's codes are expressed in, as of one snapshot (see
    mapping.codec.FeatureProjection): a stored code c stands for the feature basis @ c."""

    basis: np.ndarray  # (F, k) float32, orthonormal columns, read-only
    moment: np.ndarray  # (k, k) float64: the fitted data's second moment in the basis
    fit_residual: float  # energy share outside the basis of the data of the last fit


@dataclass(frozen=True)
class MapSnapshot:
    """An immutable view of the map at one moment. Flat arrays are built on first use."""

    blocks: tuple  # tuple of Block, never written after publication
    voxel_size: float
    n_voxels: int
    version: int  # increases with every integration
    stamp_ns: int  # newest observation stamp in the map (0: empty)
    clip_dim: int
    dino_dim: int
    gravity: np.ndarray | None = None  # (3,) in the map frame, None when unknown
    frame: str = ''
    # mapping.feature_codec 'pca_int8': the bases of the stored CLIP / DINO codes
    clip_projection: ProjectionState | None = None
    dino_projection: ProjectionState | None = None

    @property
    def empty(self) -> bool:
        return self.n_voxels == 0

    def _gather(self, name: str) -> np.ndarray:
        parts = [getattr(b, name)[b.valid] for b in self.blocks]
        if not parts:
            return np.zeros(0)
        return np.concatenate(parts)

    @cached_property
    def keys(self) -> np.ndarray:  # (N,) int64
        return self._gather('keys')

    @cached_property
    def positions(self) -> np.ndarray:  # (N, 3) float32 metres
        return self._gather('pos').reshape(-1, 3).astype(np.float32)

    @cached_property
    def colors(self) -> np.ndarray:  # (N, 3) uint8
        return np.clip(np.rint(self._gather('color').reshape(-1, 3)), 0, 255).astype(np.uint8)

    @cached_property
    def weights(self) -> np.ndarray:  # (N,) float32
        return self._gather('weight').astype(np.float32)

    @cached_property
    def counts(self) -> np.ndarray:  # (N,) uint32
        return self._gather('count').astype(np.uint32)

    @cached_property
    def last_seen_ns(self) -> np.ndarray:  # (N,) int64
        return self._gather('last_seen').astype(np.int64)

    @cached_property
    def clip_weights(self) -> np.ndarray:  # (N,) float32, 0 where no feature was fused
        return self._gather('clip_w').astype(np.float32)

    @cached_property
    def slots(self) -> np.ndarray:  # (N,) int64 block * BLOCK_SIZE + row of each flat voxel
        parts = [b * BLOCK_SIZE + np.flatnonzero(blk.valid) for b, blk in enumerate(self.blocks)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Field `name` ('pos', 'color', 'keys', 'last_seen', ...) of the voxels at flat indices
        `rows` (any order), read from the blocks without gathering the whole map."""
        slots = self.slots[np.asarray(rows, dtype=np.int64)]
        first = getattr(self.blocks[0], name) if self.blocks else np.zeros(0)
        out = np.zeros((len(slots), *first.shape[1:]), first.dtype)
        order = None if np.all(slots[1:] >= slots[:-1]) else np.argsort(slots, kind='stable')
        s = slots if order is None else slots[order]
        bounds = np.searchsorted(s, np.arange(len(self.blocks) + 1) * BLOCK_SIZE)
        for b in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[b], bounds[b + 1]
            values = getattr(self.blocks[b], name)[s[lo:hi] - b * BLOCK_SIZE]
            if order is None:
                out[lo:hi] = values
            else:
                out[order[lo:hi]] = values
        return out

    def features(self, kind: str) -> np.ndarray | None:
        """(N, F) float32 'clip' or 'dino' features in voxel order (a copy), None when absent."""
        dim = self.clip_dim if kind == 'clip' else self.dino_dim
        if not dim:
            return None
        return self.feature_rows(kind, np.arange(self.n_voxels))

    def feature_rows(self, kind: str, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), F) float32 features of selected voxels (indices into the flat order)."""
        dim = self.clip_dim if kind == 'clip' else self.dino_dim
        if not dim:
            return None
        if not self.blocks:
            return np.zeros((0, dim), np.float32)
        raw = self.take(kind, rows)
        if raw.dtype == np.int8:
            values = int8_decode(raw, self.take(f'{kind}_scale', rows))
        elif kind == 'clip':
            return bf16_decode(raw)
        else:
            return raw.astype(np.float32)
        proj = self.clip_projection if kind == 'clip' else self.dino_projection
        return values if proj is None else values @ proj.basis.T

    @property
    def clip_codec(self) -> str:
        """mapping.feature_codec the features are stored with ('bf16', 'int8' or 'pca_int8')."""
        return self.blocks[0].codec if self.blocks else 'bf16'


    @cached_property
    def _inv_clip_norm(self) -> np.ndarray:  # (N,) float32, 0 where no feature was fused
        """1 / norm of each stored feature; int8: times its scale (the product is taken with
        the int8 values)."""
        norm = self._gather('clip_norm').astype(np.float32)
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-12)
        if self.clip_codec != 'bf16':
            inv *= self._gather('clip_scale').astype(np.float32)
        return inv

    def cosine(self, E: np.ndarray, threads: int = 0) -> np.ndarray:
        """(T, N) cosine similarity of T unit embeddings E (T, F) with every voxel's CLIP feature.

        One bfloat16 matrix product per block, straight from the stored bits (no copy of the
        features, no per-query normalisation: the writer keeps the norms). The products are
        rounded to bfloat16 like the features themselves: ~3 significant digits, an error of
        ~5e-4 at CLIP's typical similarity of 0.25, 1% of query.temperature. Voxels without a
        fused feature get 0.

        Cost: reading the features once (at 500k voxels x 512, 0.5 GB) bounds it; one core of
        the development machine reads ~9 GB/s, so ~55 ms on one thread whatever T (up to 16).
        threads > 0: that many worker threads (:func:`_product_pool`) take blocks one at a time,
        each product on one torch thread; 0: the calling thread, with torch's intra-op threads.
        Why workers and not torch's threads: every block's product waits for all of torch's
        threads, so while another process holds a core each of the ~120 products waits for it
        (2 torch threads then took ~3x as long as 1); workers just take fewer blocks.
        """
        import torch  # imported on first use: building and saving maps does not need torch

        if not self.clip_dim or not self.n_voxels:
            return np.zeros((len(E), self.n_voxels), np.float32)
        int8 = self.clip_codec != 'bf16'
        # int8: products in float32 on the widened values (exact widening; on a CPU without
        # bf16 matrix units 3-4x faster than the bf16 product, see mapping.codec)
        dtype = torch.float32 if int8 else torch.bfloat16
        E = np.asarray(E, np.float32)
        if self.clip_projection is not None:
            # pca_int8: each embedding projected once; its part outside the basis meets
            # nothing stored (the features' part there was dropped)
            E = E @ self.clip_projection.basis  # (T, k)
        Et = torch.from_numpy(np.ascontiguousarray(E)).to(dtype)  # (T, F or k)
        # (T, n_slots): each block's product written in its columns. E @ F^T, not F @ E^T:
        # torch's CPU kernels run the skinny product ~4x faster this way round (measured per
        # 4096-row block, T = 5: 0.19 against 0.84 ms in float32, 2.2 against 7.5 ms in bf16)
        raw = torch.empty((len(E), len(self.blocks) * BLOCK_SIZE), dtype=dtype)
        claim = itertools.count()  # next() is atomic: each block is taken by one worker

        def work(_=None) -> None:
            with torch.inference_mode():
                while (b := next(claim)) < len(self.blocks):
                    stored = torch.from_numpy(self.blocks[b].clip)
                    # (BLOCK_SIZE, F): a bf16 view of the stored bits (no copy), or the int8
                    # values widened to float32, their scale applied afterwards
                    F = stored.to(dtype) if int8 else stored.view(torch.bfloat16)
                    torch.mm(Et, F.T, out=raw[:, b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])

        if threads:
            list(_product_pool(threads).map(work, range(threads)))
        else:
            work()
        sims = raw if raw.dtype == torch.float32 else raw.to(torch.float32)  # (T, n_slots)
        out = np.take(sims.numpy(), self.slots, axis=1)  # (T, N), valid slots only
        out *= self._inv_clip_norm
        return out


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _product_pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads whose torch operations each run on one intra-op thread (one pool per size,
    kept for the process).

    torch fixes a thread's intra-op thread count from the process-wide setting the first time
    that thread uses it; the workers do so while the setting is 1, which is restored right
    after (a thread of another component starting torch within those microseconds would also
    get 1).
    """
    import torch

    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix='sab3r-cosine')
            started = threading.Barrier(workers, timeout=30)  # one task per distinct thread

            def init(_) -> int:
                n = torch.get_num_threads()
                started.wait()
                return n

            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                counts = list(pool.map(init, range(workers)))
            finally:
                torch.set_num_threads(prev)
            if set(counts) != {1}:
                log.warning('similarity workers run torch on %s threads, not 1', counts)
            _POOLS[workers] = pool
    return pool

