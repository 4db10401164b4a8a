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
import weakref

import numpy as np

from ros2_sab3r.mapping.blocks import BLOCK_SIZE
from ros2_sab3r.mapping.codec import bf16_decode, int8_decode
from ros2_sab3r.mapping.kernels import MAX_COMPILED_EMBEDDINGS

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

        One product per block, straight from the stored values (no copy of the features, no
        per-query normalisation: the writer keeps the norms). bf16: a bfloat16 product rounded
        like the features themselves (~3 significant digits, an error of ~5e-4 at CLIP's typical
        similarity of 0.25, 1% of query.temperature). int8 codes: up to
        kernels.MAX_COMPILED_EMBEDDINGS embeddings by the compiled loop of mapping.kernels
        (exact float32 sums of the int8 values), more by widening to float32 and torch. Voxels
        without a fused feature get 0.

        threads > 0: that many worker threads (:func:`_product_pool`) take blocks one at a time,
        each product on one thread; 0: the calling thread (torch with its intra-op threads).
        Why workers and not torch's threads: every block's product waits for all of torch's
        threads, so while another process holds a core each of the ~120 products waits for it
        (2 torch threads then took ~3x as long as 1); workers just take fewer blocks.
        """
        if not self.clip_dim or not self.n_voxels:
            return np.zeros((len(E), self.n_voxels), np.float32)
        raw = self._products(self._embedding_in_codes(E), range(len(self.blocks)), threads)
        out = self._used_columns(raw)  # (T, N)
        out *= self._inv_clip_norm
        return out

    def cosine_rows(self, E: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(T, len(rows)) cosine similarity of T unit embeddings E (T, F) with the CLIP features
        of the voxels at flat indices `rows`: what :meth:`cosine` gives for them, from the
        stored values in their own space (int8 codes widened, bf16 decoded; a projected map's
        embeddings projected once), not from decoded full-width features; 0 for voxels without
        a fused feature."""
        rows = np.asarray(rows, np.int64)
        if not self.clip_dim or not len(rows):
            return np.zeros((len(E), len(rows)), np.float32)
        raw = self.take('clip', rows)
        values = bf16_decode(raw) if raw.dtype == np.uint16 else raw.astype(np.float32)
        out = self._embedding_in_codes(E) @ values.T
        out *= self._inv_clip_norm[rows]
        return out

    def _used_columns(self, raw: np.ndarray) -> np.ndarray:
        """(..., n_slots) per slot -> (..., N) per voxel. When the slots in use are the first N
        (slots rise, and the map reuses freed slots first: the usual layout) a view, not a copy
        (1.8 of ~25 ms on 1M voxels, T = 1)."""
        if self.slots[-1] == self.n_voxels - 1:
            return raw[..., :self.n_voxels]
        return np.take(raw, self.slots, axis=-1)

    def cosine_max(self, E: np.ndarray, cache: BlockMaxCache, threads: int = 0) -> np.ndarray:
        """(N,) the largest cosine over the T embeddings E with each voxel's CLIP feature (what
        'lerf' relevancy needs of its canonical negatives), computed only for the blocks that
        `cache` does not hold at their current version: a map that changed in a few blocks
        since the last query costs those blocks (the other blocks' maxima are reused)."""
        if not self.clip_dim or not self.n_voxels:
            return np.zeros(self.n_voxels, np.float32)
        E_codes = self._embedding_in_codes(E)
        scope = cache.scope(E_codes, self.clip_projection)
        done = cache.result(scope, self)
        if done is not None:
            return done
        have = {b: cache.get(scope, blk.version) for b, blk in enumerate(self.blocks)}
        stale = [b for b, v in have.items() if v is None]
        if stale:
            raw = self._products(E_codes, stale, threads).max(axis=0)  # (len(stale) * BS,)
            for i, b in enumerate(stale):
                have[b] = raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                cache.put(scope, self.blocks[b].version, have[b])
        cache.keep(scope, [blk.version for blk in self.blocks])
        # max over embeddings of (e . f) * inv_norm = inv_norm * max(e . f): inv_norm >= 0
        out = self._used_columns(np.concatenate([have[b] for b in range(len(self.blocks))]))
        out *= self._inv_clip_norm
        out.flags.writeable = False  # handed to every query on this snapshot
        cache.remember(scope, self, out)
        return out

    def _embedding_in_codes(self, E: np.ndarray) -> np.ndarray:
        """(T, F) embeddings -> (T, F or k) float32, in the space the codes are stored in."""
        E = np.asarray(E, np.float32)
        if self.clip_projection is not None:
            # pca_int8: each embedding projected once; its part outside the basis meets
            # nothing stored (the features' part there was dropped)
            E = E @ self.clip_projection.basis  # (T, k)
        return np.ascontiguousarray(E, np.float32)

    def _products(self, E: np.ndarray, blocks, threads: int) -> np.ndarray:
        """(T, len(blocks) * BLOCK_SIZE) float32: E (T, F) times the stored CLIP values of each
        listed block (row-major, int8 scale and norms not applied), in the listed order."""
        import torch  # imported on first use: building and saving maps does not need torch

        blocks = list(blocks)
        int8 = self.clip_codec != 'bf16'
        if int8 and len(E) <= MAX_COMPILED_EMBEDDINGS:
            from ros2_sab3r.mapping.kernels import int8_dots

            out = np.empty((len(E), len(blocks) * BLOCK_SIZE), np.float32)

            def work(_=None) -> None:
                while (i := next(claim)) < len(blocks):
                    int8_dots(self.blocks[blocks[i]].clip, E, out, i * BLOCK_SIZE)
        else:
            # int8 codes widened to float32 (exact; on a CPU without bf16 matrix units 3-4x
            # faster than the bf16 product, see mapping.codec), bf16 bits viewed as bfloat16
            dtype = torch.float32 if int8 else torch.bfloat16
            Et = torch.from_numpy(E).to(dtype)
            # E @ F^T, not F @ E^T: torch's CPU kernels run the skinny product ~4x faster this
            # way round (per 4096-row block, T = 5: 0.19 against 0.84 ms in float32, 2.2
            # against 7.5 ms in bf16)
            raw = torch.empty((len(E), len(blocks) * BLOCK_SIZE), dtype=dtype)

            def work(_=None) -> None:
                with torch.inference_mode():
                    while (i := next(claim)) < len(blocks):
                        stored = torch.from_numpy(self.blocks[blocks[i]].clip)
                        F = stored.to(dtype) if int8 else stored.view(torch.bfloat16)
                        torch.mm(Et, F.T, out=raw[:, i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])

            out = None
        claim = itertools.count()  # next() is atomic: each block is taken by one worker
        if threads:
            list(_product_pool(threads).map(work, range(threads)))
        else:
            work()
        if out is None:
            out = (raw if raw.dtype == torch.float32 else raw.to(torch.float32)).numpy()
        return out


class BlockMaxCache:
    """Per-block maxima of :meth:`MapSnapshot.cosine_max`, by block version (a block gets a new
    version whenever the writer touches it, mapping.blocks), within one scope: one set of
    embeddings in one basis of codes. Shared by the threads of one query engine.

    Holds at most one map's worth of blocks (4 bytes a voxel slot): entries of blocks the
    latest snapshot asked about no longer holds are dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scope: tuple | None = None
        self._pinned: tuple = ()  # what the scope's identities refer to (no id reuse)
        self._by_version: dict[int, np.ndarray] = {}
        # the last snapshot's whole result (weakly: the cache must not keep old blocks alive)
        self._last: tuple[weakref.ref, np.ndarray] | None = None

    def result(self, scope: tuple, snapshot: MapSnapshot) -> np.ndarray | None:
        """The (N,) result computed for this very snapshot, if it was the last one."""
        with self._lock:
            last = self._last
            if scope == self._scope and last is not None and last[0]() is snapshot:
                return last[1]
            return None

    def remember(self, scope: tuple, snapshot: MapSnapshot, out: np.ndarray) -> None:
        with self._lock:
            if scope == self._scope:
                self._last = (weakref.ref(snapshot), out)

    def scope(self, E_codes: np.ndarray, projection: ProjectionState | None) -> tuple:
        """The scope of these embeddings (in code space) and basis; switching scope empties
        the cache."""
        basis = None if projection is None else projection.basis
        key = (E_codes.shape, E_codes.tobytes(), None if basis is None else id(basis))
        with self._lock:
            if key != self._scope:
                self._scope, self._pinned, self._by_version = key, (basis,), {}
                self._last = None
        return key

    def get(self, scope: tuple, version: int) -> np.ndarray | None:
        with self._lock:
            return self._by_version.get(version) if scope == self._scope else None

    def put(self, scope: tuple, version: int, values: np.ndarray) -> None:
        with self._lock:
            if scope == self._scope:
                self._by_version[version] = values

    def keep(self, scope: tuple, versions) -> None:
        with self._lock:
            if scope == self._scope:
                live = set(versions)
                self._by_version = {v: a for v, a in self._by_version.items() if v in live}


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

