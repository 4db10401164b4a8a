"""Bounded semantic voxel map with immutable snapshots.

Each voxel keeps a confidence-weighted running mean of its points' position and colour, a weight,
an observation count, the stamp it was last seen, and running weighted means of the CLIP features
(stored as bfloat16, with their norm) and optionally DINO features (fp16) that fell into it.

Why bfloat16 for CLIP: every Locate multiplies all CLIP features by the query embeddings; at 500k
voxels x 512 that reads 0.5 GB, and CPUs with bf16 matrix units (AVX512-BF16, AMX) do it about
twice as fast as from fp16 (torch, 2 cores: ~25 ms vs ~50 ms). bfloat16 keeps 8 mantissa bits:
the cosine similarity of a stored feature changes by ~1e-3 at most, far below the relevancy
margins. numpy has no bfloat16, so the arrays hold the raw bit patterns (uint16).

Layout: voxels live in fixed-size blocks of slots; a sorted array of packed int64 voxel keys maps
keys to slots (numpy searchsorted, no Python dict, no per-point loops). Integration groups a batch
of points by voxel with np.unique and bincount, and the features with one sparse matrix product.

Snapshots: after every integration the map publishes a :class:`MapSnapshot` holding references to
the current blocks. A block referenced by a published snapshot is copied before it is written
(copy-on-write), so a query keeps reading a consistent map while integration continues, without
copying the whole map (at 500k voxels the CLIP features alone are ~0.5 GB).

Bounded memory: at most `max_voxels` voxels; when new voxels would exceed it, the least recently
seen voxels are evicted first (ties: the lighter one).

"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
import itertools
import logging
import mmap
import threading

import numpy as np
from scipy.sparse import coo_matrix

from ros2_sab3r.config import MappingConfig

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096  # voxel slots per block: the unit of copy-on-write
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_POPULATE', 0)
_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """(N, 3) integer voxel indices -> (N,) int64 keys (21 bits per axis, offset binary)."""
    v = ijk.astype(np.int64) + _OFFSET
    return (v[:, 0] << (2 * _BITS)) | (v[:, 1] << _BITS) | v[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """(N,) int64 keys -> (N, 3) int64 voxel indices."""
    return np.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK],
                    -1) - _OFFSET


def key_offset(di: int, dj: int, dk: int) -> int:
    """Packed-key difference of a neighbour at (di, dj, dk) (valid away from the range edges)."""
    return (di << (2 * _BITS)) + (dj << _BITS) + dk


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bfloat16 bit patterns (round to nearest even; finite input)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_decode(b: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 array (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _fold_clip(blk: _Block, rows: np.ndarray, fsum: np.ndarray, w_old: np.ndarray,
               w_new: np.ndarray) -> None:
    """Fold weighted feature sums fsum (n, F) into the running CLIP means of a block's rows.

    Plain numpy on purpose, in as few passes as possible: torch would use several threads per
    operation, which on a small shared CPU costs more in thread wake-ups than it gains.
    """
    n, dim = fsum.shape
    halves = np.zeros((n, dim, 2), np.uint16)  # little-endian float32: high half = bf16 bits
    halves[..., 1] = blk.clip[rows]
    mean = halves.view(np.float32).reshape(n, dim)  # exact bf16 -> float32
    mean *= (w_old / w_new).astype(np.float32)[:, None]
    fsum *= (1.0 / w_new).astype(np.float32)[:, None]
    mean += fsum
    blk.clip_norm[rows] = np.sqrt(np.einsum('ij,ij->i', mean, mean))
    u = mean.view(np.uint32)  # round to nearest even in place, then keep the high halves
    carry = u >> 16
    carry &= 1
    u += carry
    u += 0x7FFF
    blk.clip[rows] = halves[..., 1]


class _Block:
    """Slots of BLOCK_SIZE voxels (struct of arrays), all in one anonymous memory mapping.

    Why a mapping of its own and not numpy's allocator: copy-on-write replaces every block an
    integration touches (~4 MB each at 512-d CLIP). From the malloc heap, those long-lived
    copies interleave with the integration's temporaries of varying size and fragment it: over
    10 000 frames RSS crept by 5-8 MB per 1000 frames while the memory in use stayed flat. A
    mapping goes back to the system as soon as its block is dropped (RSS now flat within 0.1 MB
    per 1000 frames); the price is faulting in fresh pages for each copy, ~9% of the integration
    rate of a fresh map.
    """

    __slots__ = ('keys', 'valid', 'pos', 'color', 'weight', 'count', 'last_seen', 'clip',
                 'clip_norm', 'clip_w', 'dino', 'dino_w')

    def __init__(self, clip_dim: int, dino_dim: int) -> None:
        n = BLOCK_SIZE
        fields = [('keys', np.int64, 1), ('valid', np.bool_, 1), ('pos', np.float32, 3),
                  ('color', np.float32, 3), ('weight', np.float32, 1), ('count', np.uint32, 1),
                  ('last_seen', np.int64, 1),
                  ('clip', np.uint16, clip_dim),  # bfloat16 bits; None when clip_dim is 0
                  ('clip_norm', np.float32, 1),  # L2 norm of each clip row (0: no feature)
                  ('clip_w', np.float32, 1), ('dino', np.float16, dino_dim),
                  ('dino_w', np.float32, 1)]
        # each array starts on a 64-byte boundary (cache lines, vector loads)
        sizes = [(n * width * np.dtype(dt).itemsize + 63) // 64 * 64 for _, dt, width in fields]
        # zero-filled, unmapped when its last array is freed; private (shared anonymous memory
        # is tmpfs-backed, slower to fault in) and populated in one call rather than page by
        # page (~10% of the integration time of a 512x384 keyframe)
        buf = mmap.mmap(-1, sum(sizes), flags=_MAP_FLAGS)
        offset = 0
        for (name, dt, width), size in zip(fields, sizes):
            if name in ('clip', 'dino') and width == 0:
                setattr(self, name, None)
                continue
            a = np.frombuffer(buf, dt, n * width, offset)
            setattr(self, name, a.reshape(n, width) if name in ('pos', 'color', 'clip', 'dino')
                    else a)
            offset += size

    def copy(self, dino_dim: int | None = None) -> _Block:
        """A copy; with dino_dim, one with (zero) DINO features of that width added."""
        new = _Block(0 if self.clip is None else self.clip.shape[1],
                     dino_dim if dino_dim is not None else
                     0 if self.dino is None else self.dino.shape[1])
        for name in _Block.__slots__:
            value = getattr(self, name)
            if value is not None:
                np.copyto(getattr(new, name), value)
        return new


@dataclass(frozen=True)
class MapSnapshot:
    """An immutable view of the map at one moment. Flat arrays are built on first use."""

    blocks: tuple  # tuple of _Block, never written after publication
    voxel_size: float
    n_voxels: int
    version: int  # increases with every integration
    stamp_ns: int  # newest observation stamp in the map (0: empty)
    clip_dim: int
    dino_dim: int
    gravity: np.ndarray | None = None  # (3,) in the map frame, None when unknown
    frame: str = ''

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
        return bf16_decode(raw) if kind == 'clip' else raw.astype(np.float32)

    @cached_property
    def _inv_clip_norm(self) -> np.ndarray:  # (N,) float32, 0 where no feature was fused
        norm = self._gather('clip_norm').astype(np.float32)
        return np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 1e-12)

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
        Et = torch.from_numpy(np.ascontiguousarray(np.asarray(E, np.float32).T)).to(
            torch.bfloat16)  # (F, T)
        raw = torch.empty((len(self.blocks) * BLOCK_SIZE, len(E)), dtype=torch.bfloat16)
        claim = itertools.count()  # next() is atomic: each block is taken by one worker

        def work(_=None) -> None:
            with torch.inference_mode():
                while (b := next(claim)) < len(self.blocks):
                    # (BLOCK_SIZE, F) view of the stored bits, no copy
                    torch.mm(torch.from_numpy(self.blocks[b].clip).view(torch.bfloat16), Et,
                             out=raw[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])

        if threads:
            list(_product_pool(threads).map(work, range(threads)))
        else:
            work()
        sims = torch.empty((len(E), len(raw)), dtype=torch.float32)
        sims.copy_(raw.T)  # (T, n_slots): one transposing, widening pass
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


class SemanticVoxelMap:
    """The writable map (one writer thread); readers use :meth:`snapshot`."""

    def __init__(self, cfg: MappingConfig, clip_dim: int = 0, dino_dim: int = 0,
                 gravity: np.ndarray | None = None, frame: str = '') -> None:
        self.cfg = cfg
        self.voxel_size = float(cfg.voxel_size_m)
        self.clip_dim = int(clip_dim)
        self.dino_dim = int(dino_dim) if cfg.fuse_dino else 0
        self.gravity = None if gravity is None else np.asarray(gravity, dtype=np.float64)
        self.frame = frame
        self._blocks: list[_Block] = []
        self._shared: set[int] = set()  # blocks referenced by the published snapshot
        self._index_keys = np.zeros(0, np.int64)  # sorted
        self._index_slots = np.zeros(0, np.int64)
        self._free = np.zeros(0, np.int64)  # free slots, reused first
        self._n_slots = 0  # slots handed out so far (free ones included)
        self._version = 0
        self._stamp_ns = 0
        self._lock = threading.Lock()  # guards publication only; one writer is assumed
        self.evicted_total = 0
        self._snapshot = self._publish()

    # ---------------------------------------------------------------------------- properties
    @property
    def n_voxels(self) -> int:
        return int(len(self._index_keys))

    def snapshot(self) -> MapSnapshot:
        """The latest published snapshot (never blocks on an integration in progress)."""
        return self._snapshot

    # --------------------------------------------------------------------------- integration
    def integrate(self, X_W: np.ndarray, C: np.ndarray, rgb: np.ndarray, stamp_ns: int,
                  cells: np.ndarray | None = None, S_clip: np.ndarray | None = None,
                  S_dino: np.ndarray | None = None) -> int:
        """Fuse points into the map and publish a new snapshot; returns the points fused.

        X_W: (N, 3) world points; C: (N,) confidences (points below mapping.min_confidence and
        non-finite points are skipped); rgb: (N, 3) uint8; cells: (N,) index of each point's
        feature cell in S_clip (M, Fc) / S_dino (M, Fd), -1 for none.
        """
        X_W = np.asarray(X_W, dtype=np.float32).reshape(-1, 3)
        C = np.asarray(C, dtype=np.float32).reshape(-1)
        rgb = np.asarray(rgb).reshape(-1, 3)
        if not (len(X_W) == len(C) == len(rgb)):
            raise ValueError(f'integrate: X_W, C and rgb lengths differ: {len(X_W)}, {len(C)}, '
                             f'{len(rgb)}')
        if S_clip is not None and self.clip_dim and S_clip.shape[-1] != self.clip_dim:
            raise ValueError(f'CLIP features have {S_clip.shape[-1]} channels but the map holds '
                             f'{self.clip_dim}; the text encoder and backend must agree')
        if S_dino is not None and self.dino_dim == 0 and self.cfg.fuse_dino:
            self._enable_dino(S_dino.shape[-1])
        if S_dino is not None and self.dino_dim and S_dino.shape[-1] != self.dino_dim:
            raise ValueError(f'DINO features have {S_dino.shape[-1]} channels, the map holds '
                             f'{self.dino_dim}')
        ijk = np.floor(X_W / self.voxel_size)
        ok = np.isfinite(C) & (C >= self.cfg.min_confidence) & np.isfinite(ijk).all(-1)
        ok &= (np.abs(ijk) < _OFFSET - 2).all(-1)
        n_ok = int(ok.sum())
        if n_ok == 0:
            return 0
        X, w, col = X_W[ok], C[ok].astype(np.float64), rgb[ok].astype(np.float64)
        keys = pack_keys(ijk[ok])
        ukeys, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(-1)
        U = len(ukeys)
        wsum = np.bincount(inv, w, U)
        psum = np.stack([np.bincount(inv, w * X[:, k], U) for k in range(3)], -1)
        csum = np.stack([np.bincount(inv, w * col[:, k], U) for k in range(3)], -1)
        clip_sum = clip_wsum = dino_sum = dino_wsum = None
        if cells is not None and (S_clip is not None or S_dino is not None):
            cell = np.asarray(cells).reshape(-1)[ok]
            has = cell >= 0
            S_any = S_clip if S_clip is not None else S_dino
            M = int(np.prod(S_any.shape[:-1]))  # feature cells
            # float32: the products below stay float32 (U x 512 float64 would double the work)
            A = coo_matrix((w[has].astype(np.float32), (inv[has], cell[has])),
                           shape=(U, M)).tocsr()  # (U, M)
            fw = np.asarray(A.sum(axis=1)).reshape(-1)
            if S_clip is not None and self.clip_dim:
                clip_sum, clip_wsum = A @ S_clip.reshape(M, -1).astype(np.float32), fw
            if S_dino is not None and self.dino_dim:
                dino_sum, dino_wsum = A @ S_dino.reshape(M, -1).astype(np.float32), fw

        pos = np.searchsorted(self._index_keys, ukeys)
        found = np.zeros(U, bool)
        inside = pos < len(self._index_keys)
        found[inside] = self._index_keys[pos[inside]] == ukeys[inside]
        old_slots = self._index_slots[pos[found]]
        new_rows = np.flatnonzero(~found)
        new_rows = self._make_room(new_rows, wsum, old_slots)
        new_slots = self._allocate(len(new_rows))

        batch = (wsum, psum, csum, clip_sum, clip_wsum, dino_sum, dino_wsum)
        self._update(old_slots, np.flatnonzero(found), ukeys, stamp_ns, batch, fresh=False)
        self._update(new_slots, new_rows, ukeys, stamp_ns, batch, fresh=True)
        if len(new_rows):
            order = np.argsort(ukeys[new_rows])
            nk, ns = ukeys[new_rows][order], new_slots[order]
            at = np.searchsorted(self._index_keys, nk)
            self._index_keys = np.insert(self._index_keys, at, nk)
            self._index_slots = np.insert(self._index_slots, at, ns)
        self._stamp_ns = max(self._stamp_ns, int(stamp_ns))
        self._version += 1
        self._snapshot = self._publish()
        return n_ok

    def _make_room(self, new_rows: np.ndarray, wsum: np.ndarray, old_slots: np.ndarray
                   ) -> np.ndarray:
        """Evict least recently seen voxels so that the new ones fit under max_voxels.

        Voxels observed in the current batch are never evicted; if the batch alone overflows the
        map, its lightest new voxels are dropped instead. Returns the new rows that fit.
        """
        cap = self.cfg.max_voxels
        excess = self.n_voxels + len(new_rows) - cap
        if excess <= 0:
            return new_rows
        slots = self._index_slots
        evictable = ~np.isin(slots, old_slots)
        n_evict = min(excess, int(evictable.sum()))
        if n_evict:
            last = self._field_at(slots, 'last_seen')
            wt = self._field_at(slots, 'weight')
            # least recently seen first; among equals the lighter one
            order_key = np.where(evictable, last + 0.5 * np.tanh(wt), np.inf)
            victims = np.argpartition(order_key, n_evict - 1)[:n_evict]
            self._evict(slots[victims])
        room = cap - self.n_voxels
        if len(new_rows) > room:
            keep = np.argsort(-wsum[new_rows], kind='stable')[:room]
            new_rows = np.sort(new_rows[keep])
        return new_rows

    def _evict(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        for b, rows, _ in self._group(slots):
            blk = self._writable(b)
            blk.valid[rows] = False
            blk.weight[rows] = 0
            blk.clip_w[rows] = 0
            blk.clip_norm[rows] = 0
            blk.dino_w[rows] = 0
        keep = ~np.isin(self._index_slots, slots)
        self._index_keys = self._index_keys[keep]
        self._index_slots = self._index_slots[keep]
        self._free = np.concatenate([self._free, np.sort(slots)])
        self.evicted_total += len(slots)

    def _allocate(self, n: int) -> np.ndarray:
        take = min(n, len(self._free))
        slots = self._free[:take]
        self._free = self._free[take:]
        fresh = np.arange(self._n_slots, self._n_slots + n - take, dtype=np.int64)
        self._n_slots += n - take
        while len(self._blocks) * BLOCK_SIZE < self._n_slots:
            self._blocks.append(_Block(self.clip_dim, self.dino_dim))
        return np.concatenate([slots, fresh])

    def _group(self, slots: np.ndarray):
        """Yield (block index, row indices) for slots, one group per touched block."""
        if len(slots) == 0:
            return
        order = np.argsort(slots, kind='stable')
        s = slots[order]
        blocks = s // BLOCK_SIZE
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        for grp_order, grp in zip(np.split(order, cuts), np.split(s, cuts)):
            yield int(grp[0] // BLOCK_SIZE), grp % BLOCK_SIZE, grp_order

    def _writable(self, b: int) -> _Block:
        if b in self._shared:
            self._blocks[b] = self._blocks[b].copy()
            self._shared.discard(b)
        return self._blocks[b]

    def _field_at(self, slots: np.ndarray, name: str) -> np.ndarray:
        out = np.zeros(len(slots), np.float64)
        for b, rows, order in self._group(slots):
            out[order] = getattr(self._blocks[b], name)[rows]
        return out

    def _update(self, slots: np.ndarray, sel: np.ndarray, ukeys: np.ndarray, stamp_ns: int,
                batch: tuple, fresh: bool) -> None:
        """Fold batch rows `sel` (voxel sums) into the voxels at `slots` (same order)."""
        wsum, psum, csum, clip_sum, clip_wsum, dino_sum, dino_wsum = batch
        for b, rows, order in self._group(slots):
            blk = self._writable(b)
            src = sel[order]  # batch rows for these block rows
            w_add = wsum[src]
            if fresh:
                blk.keys[rows] = ukeys[src]
                blk.valid[rows] = True
                blk.weight[rows] = 0
                blk.count[rows] = 0
                blk.clip_w[rows] = 0
                blk.clip_norm[rows] = 0
                blk.dino_w[rows] = 0
            w_old = blk.weight[rows].astype(np.float64)
            w_new = w_old + w_add
            blk.pos[rows] = (w_old[:, None] * blk.pos[rows] + psum[src]) / w_new[:, None]
            blk.color[rows] = (w_old[:, None] * blk.color[rows] + csum[src]) / w_new[:, None]
            blk.weight[rows] = w_new
            blk.count[rows] += 1
            blk.last_seen[rows] = stamp_ns
            features = ((clip_sum, clip_wsum, 'clip', 'clip_w'),
                        (dino_sum, dino_wsum, 'dino', 'dino_w'))
            for fsum_all, fw_all, arr_name, w_name in features:
                arr = getattr(blk, arr_name)
                if fsum_all is None or arr is None:
                    continue
                fw = fw_all[src]
                has = fw > 0
                if not has.any():
                    continue
                r, s_has = rows[has], src[has]
                fw_old = getattr(blk, w_name)[r]
                fw_new = (fw_old + fw[has]).astype(np.float32)
                if arr_name == 'clip':
                    _fold_clip(blk, r, fsum_all[s_has], fw_old, fw_new)  # gathers: a copy
                else:
                    # float32 is plenty for a running mean stored as fp16
                    mean = arr[r].astype(np.float32)
                    mean *= (fw_old / fw_new)[:, None]
                    mean += fsum_all[s_has] / fw_new[:, None]
                    arr[r] = mean
                getattr(blk, w_name)[r] = fw_new

    def _enable_dino(self, dim: int) -> None:
        self.dino_dim = int(dim)
        for b in range(len(self._blocks)):
            self._blocks[b] = self._blocks[b].copy(dino_dim=self.dino_dim)
            self._shared.discard(b)

    def _publish(self) -> MapSnapshot:
        with self._lock:
            self._shared = set(range(len(self._blocks)))
            return MapSnapshot(blocks=tuple(self._blocks), voxel_size=self.voxel_size,
                               n_voxels=self.n_voxels, version=self._version,
                               stamp_ns=self._stamp_ns, clip_dim=self.clip_dim,
                               dino_dim=self.dino_dim, gravity=self.gravity, frame=self.frame)

    # ------------------------------------------------------------------------ whole-map ops
    def clear(self) -> None:
        """Forget every voxel (the published snapshot stays valid for its readers)."""
        self._blocks = []
        self._shared = set()
        self._index_keys = np.zeros(0, np.int64)
        self._index_slots = np.zeros(0, np.int64)
        self._free = np.zeros(0, np.int64)
        self._n_slots = 0
        self._stamp_ns = 0
        self._version += 1
        self._snapshot = self._publish()

    def arrays(self) -> dict[str, np.ndarray]:
        """The map's content as flat arrays (the persistence format)."""
        snap = self._snapshot
        out = {'keys': snap.keys, 'positions': snap.positions,
               'colors': snap._gather('color').reshape(-1, 3).astype(np.float32),
               'weights': snap.weights, 'counts': snap.counts, 'last_seen_ns': snap.last_seen_ns,
               'clip_weights': snap.clip_weights,
               'dino_weights': snap._gather('dino_w').astype(np.float32)}
        if self.clip_dim:
            out['clip_bf16'] = snap._gather('clip').reshape(-1, self.clip_dim)
        if self.dino_dim:
            out['dino'] = snap._gather('dino').reshape(-1, self.dino_dim)
        return out

    @classmethod
    def from_arrays(cls, cfg: MappingConfig, arrays: dict[str, np.ndarray], clip_dim: int,
                    dino_dim: int, stamp_ns: int, gravity: np.ndarray | None = None,
                    frame: str = '') -> SemanticVoxelMap:
        """Rebuild a map from :meth:`arrays` output (already validated by the caller)."""
        m = cls(cfg, clip_dim=clip_dim, dino_dim=dino_dim, gravity=gravity, frame=frame)
        keys = arrays['keys']
        n = len(keys)
        if n > cfg.max_voxels:
            raise ValueError(f'the map file holds {n} voxels but mapping.max_voxels is '
                             f'{cfg.max_voxels}; raise mapping.max_voxels to load it')
        slots = m._allocate(n)
        for b, rows, order in m._group(slots):
            blk = m._blocks[b]
            blk.keys[rows] = keys[order]
            blk.valid[rows] = True
            blk.pos[rows] = arrays['positions'][order]
            blk.color[rows] = arrays['colors'][order]
            blk.weight[rows] = arrays['weights'][order]
            blk.count[rows] = arrays['counts'][order]
            blk.last_seen[rows] = arrays['last_seen_ns'][order]
            blk.clip_w[rows] = arrays['clip_weights'][order]
            blk.dino_w[rows] = arrays['dino_weights'][order]
            if blk.clip is not None:
                blk.clip[rows] = arrays['clip_bf16'][order]
                blk.clip_norm[rows] = np.linalg.norm(bf16_decode(blk.clip[rows]), axis=1)
            if blk.dino is not None:
                blk.dino[rows] = arrays['dino'][order]
        order = np.argsort(keys)
        m._index_keys = keys[order].astype(np.int64)
        m._index_slots = slots[order]
        m._stamp_ns = int(stamp_ns)
        m._version = 1
        m._snapshot = m._publish()
        return m
