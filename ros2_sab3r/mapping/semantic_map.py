"""SemanticVoxelMap: the bounded semantic voxel map's writer (one thread), publishing snapshots.

Each voxel keeps a confidence-weighted running mean of its points' position and colour, a weight,
an observation count, the stamp it was last seen, and running weighted means of the CLIP features
(stored as bfloat16, int8 with a per-voxel scale, or int8 codes of a projection fitted to the map,
with their norm: mapping.feature_codec, see mapping.codec) and optionally DINO features (fp16, or
projected int8 codes) that fell into it.

Layout: voxels live in fixed-size blocks of slots (mapping.blocks); a sorted array of packed int64
voxel keys (mapping.keys) maps keys to slots (numpy searchsorted, no Python dict, no per-point
loops). Integration groups a batch of points by voxel with one sort and bincount, and the
features by weighted row sums of the feature cells (a sparse product, compiled in mapping.fold),
then folds them into the blocks in compiled loops (mapping.fold).

Snapshots: after every integration the map publishes a :class:`MapSnapshot` (mapping.snapshot)
holding references to the current blocks. Only blocks a reader may hold are copied before they are
written (copy-on-write): those of every snapshot :meth:`SemanticVoxelMap.snapshot` has handed
out. A snapshot nobody asked for is withdrawn when the next integration starts and its blocks
are written in place, so integration into a large map no longer copies whole 4 MB blocks for
every keyframe (0.63 M points/s into a 418k-voxel map before, see benchmarks/mapping.py). A
reader asking during such an integration gets the newest snapshot handed out before (it never
waits); so that this is never far behind while readers come, an integration starting when the
last hand-out is :data:`MAX_READER_LAG` integrations old treats the latest snapshot as handed
out (it copies what it writes), as long as a reader asked within the last
:data:`READERS_ACTIVE_FOR` integrations. Without readers nothing is kept for them: each such
hand-out kept the old copies of the blocks written after it, up to a second copy of the map
(10,000 frames of benchmarks/pipeline.py's memory run: RSS 830 -> 904 MB, against flat). The
first reader after a quiet spell, arriving during an integration, gets the last snapshot a
reader had (its map_stamp_ns says how old).

Bounded memory: at most `max_voxels` voxels; when new voxels would exceed it, the least recently
seen voxels are evicted first (ties: the lighter one).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping.blocks import BLOCK_SIZE, Block, next_version
from ros2_sab3r.mapping.codec import (
    FeatureProjection,
    bf16_decode,
    bf16_encode,
    fold_bf16_mean,
    int8_decode,
    int8_encode,
)
from ros2_sab3r.mapping.fold import (
    batch_sums,
    fold_block,
    fold_int8,
    fold_scalars,
    init_slots,
    insert_sorted,
    lookup_sorted,
    weighted_row_sums,
)
from ros2_sab3r.mapping.snapshot import MapSnapshot, ProjectionState

# Integrations a reader arriving during an in-place integration can be behind, at most: past
# it, the next integration keeps the latest snapshot for readers (and copies what it writes).
MAX_READER_LAG = 8
# Readers count as active (MAX_READER_LAG applies) this many integrations after their last
# request.
READERS_ACTIVE_FOR = 4 * MAX_READER_LAG


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
        self.codec = cfg.feature_codec  # of the features in memory and in files
        # 'pca_int8': the bases the stored codes are expressed in (None: full channels)
        self._proj: dict[str, FeatureProjection | None] = {'clip': None, 'dino': None}
        if self.codec == 'pca_int8' and self.clip_dim:
            self._proj['clip'] = self._new_projection('clip', self.clip_dim)
        if self.codec == 'pca_int8' and self.dino_dim:
            self._proj['dino'] = self._new_projection('dino', self.dino_dim)
        self._blocks: list[Block] = []
        self._shared: set[int] = set()  # blocks a handed-out snapshot references
        self._index_keys = np.zeros(0, np.int64)  # sorted
        self._index_slots = np.zeros(0, np.int64)
        self._free = np.zeros(0, np.int64)  # free slots, reused first
        self._n_slots = 0  # slots handed out so far (free ones included)
        self._version = 0
        self._stamp_ns = 0
        self._lock = threading.Lock()  # guards publication and hand-out; one writer is assumed
        self.evicted_total = 0
        self._writing = False  # an integration is writing blocks of the withdrawn snapshot
        self._read_version: int | None = None  # self._version at the latest snapshot() call
        self._snapshot = self._publish()
        self._handed = self._snapshot  # the newest snapshot handed to a reader

    # ---------------------------------------------------------------------------- properties
    @property
    def n_voxels(self) -> int:
        return int(len(self._index_keys))

    def _new_projection(self, kind: str, dim: int) -> FeatureProjection:
        rank = (self.cfg.clip_projection_dim if kind == 'clip'
                else self.cfg.dino_projection_dim)
        return FeatureProjection(dim, rank, self.cfg.projection_refit_residual)

    def _width(self, kind: str) -> int:
        """Stored channels of CLIP or DINO features (the projection's rank under pca_int8)."""
        proj = self._proj[kind]
        return proj.rank if proj is not None else (self.clip_dim if kind == 'clip'
                                                   else self.dino_dim)

    @property
    def projections(self) -> dict[str, FeatureProjection | None]:
        """'clip' / 'dino' -> the writer's FeatureProjection (pca_int8), else None; read-only
        use (tests, benchmarks)."""
        return dict(self._proj)

    def snapshot(self) -> MapSnapshot:
        """The latest published snapshot, or while an integration writes the blocks of that one
        (nobody had asked for it), the newest one handed out before. Never waits for the
        writer; a snapshot handed out is never written again."""
        with self._lock:
            self._read_version = self._version
            if self._handed is not self._snapshot and not self._writing:
                self._hand_out()
            return self._handed

    def _hand_out(self) -> None:
        # under self._lock, no integration running: the blocks of the latest snapshot are the
        # current blocks at the same indices
        self._shared.update(range(len(self._snapshot.blocks)))
        self._handed = self._snapshot

    def _begin_write(self) -> None:
        """Withdraw the latest snapshot if no reader has it (its blocks become writable in
        place), unless the last hand-out is MAX_READER_LAG integrations old while readers are
        active."""
        with self._lock:
            if (self._handed is not self._snapshot
                    and self._snapshot.version - self._handed.version >= MAX_READER_LAG
                    and self._read_version is not None
                    and self._version - self._read_version <= READERS_ACTIVE_FOR):
                self._hand_out()
            self._writing = True

    def _end_write(self, snapshot: MapSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._writing = False

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
        with_cells = cells is not None and (S_clip is not None or S_dino is not None)
        M = 0
        if with_cells:
            S_any = S_clip if S_clip is not None else S_dino
            M = int(np.prod(S_any.shape[:-1]))  # feature cells
            cells = np.ascontiguousarray(np.asarray(cells).reshape(-1), np.int64)
            if len(cells) != len(X_W):
                raise ValueError(f'integrate: {len(cells)} feature cells for {len(X_W)} points')
        # points grouped by voxel with one sort (what np.unique does), whose order also lays out
        # the (U, M) feature weights row by row as CSR (no COO -> CSR conversion): mapping.fold
        sums = batch_sums(np.ascontiguousarray(X_W), np.ascontiguousarray(C),
                          np.ascontiguousarray(rgb), self.voxel_size,
                          self.cfg.min_confidence, cells if with_cells else None, M)
        if sums is None:
            return 0
        n_ok = len(sums.pts)
        ukeys, wsum, psum, csum = sums.ukeys, sums.wsum, sums.psum, sums.csum
        clip_sum = clip_wsum = dino_sum = dino_wsum = None
        rotations = {}  # kind -> (k, k) rotation of the stored codes after a refit
        if with_cells:
            # float32: the sums stay float32 (U x 512 float64 would double the work)
            indptr, cols, w_has, fw = sums.indptr, sums.cols, sums.w_cols, sums.fw
            used = None
            for kind, S, dim in (('clip', S_clip, self.clip_dim), ('dino', S_dino,
                                                                   self.dino_dim)):
                if S is None or not dim:
                    continue
                S = S.reshape(M, -1)
                proj = self._proj[kind]
                if proj is not None:  # pca_int8: sums of the projected cell features
                    if used is None:
                        used = np.flatnonzero(np.bincount(cols, minlength=M))
                    S = np.asarray(S, np.float32)
                    Y = None if proj.basis is None else S @ proj.basis
                    if len(used) == M:  # every cell (the usual keyframe): no copies
                        R = proj.observe(S, Y)
                    else:
                        R = proj.observe(S[used], None if Y is None else Y[used])
                    if R is not None:
                        rotations[kind] = R
                    if Y is None or R is not None or proj.basis is None:
                        Y = S @ proj.basis
                    S = Y  # (M, k): cheaper than projecting the (U, F) sums
                total = weighted_row_sums(indptr, cols, w_has, S)
                if kind == 'clip':
                    clip_sum, clip_wsum = total, fw
                else:
                    dino_sum, dino_wsum = total, fw

        self._begin_write()
        try:
            for kind, R in rotations.items():
                self._rotate(kind, R)
            self._fold(ukeys, stamp_ns, (wsum, psum, csum, clip_sum, clip_wsum, dino_sum,
                                         dino_wsum))
        finally:
            # also after an error: the withdrawn snapshot's blocks may be half written
            self._version += 1
            self._end_write(self._publish())
        return n_ok

    def _rotate(self, kind: str, R: np.ndarray) -> None:
        """Re-express every stored code of `kind` in a refitted basis (codes @ R), block by
        block (copy-on-write applies: handed-out snapshots keep the old basis and codes)."""
        w_name = f'{kind}_w'
        for b, blk in enumerate(self._blocks):
            rows = np.flatnonzero(blk.valid & (getattr(blk, w_name) > 0))
            if not len(rows):
                continue
            blk = self._writable(b)
            values = getattr(blk, kind)
            scale = getattr(blk, f'{kind}_scale')
            q, s = int8_encode(int8_decode(values[rows], scale[rows]) @ R)
            values[rows], scale[rows] = q, s
            if kind == 'clip':
                qf = q.astype(np.float32)
                blk.clip_norm[rows] = s * np.sqrt(np.einsum('ij,ij->i', qf, qf))

    def _fold(self, ukeys: np.ndarray, stamp_ns: int, batch: tuple) -> None:
        """Fold per-voxel sums (batch) of the voxels `ukeys` (ascending) into the map."""
        wsum = batch[0]
        pos, found = lookup_sorted(self._index_keys, ukeys)  # pos: also where new keys go
        old_slots = self._index_slots[pos[found]]
        new_rows = np.flatnonzero(~found)
        new_rows, evicted = self._make_room(new_rows, wsum, old_slots)
        new_slots = self._allocate(len(new_rows))
        self._update(old_slots, np.flatnonzero(found), ukeys, stamp_ns, batch, fresh=False)
        self._update(new_slots, new_rows, ukeys, stamp_ns, batch, fresh=True)
        if len(new_rows) or len(evicted):
            # one pass over the index: the evicted entries out, the new keys in at the
            # positions the look-up found (ascending, as ukeys)
            drop = self._slot_mask(evicted)[self._index_slots] if len(evicted) else None
            self._index_keys, self._index_slots = insert_sorted(
                self._index_keys, self._index_slots, pos[new_rows], ukeys[new_rows], new_slots,
                drop)
        self._stamp_ns = max(self._stamp_ns, int(stamp_ns))

    def _make_room(self, new_rows: np.ndarray, wsum: np.ndarray, old_slots: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Evict least recently seen voxels so that the new ones fit under max_voxels.

        Voxels observed in the current batch are never evicted; if the batch alone overflows the
        map, its lightest new voxels are dropped instead. Returns the new rows that fit and the
        evicted slots: emptied and free, still in the key index (the caller takes them out).
        """
        cap = self.cfg.max_voxels
        excess = self.n_voxels + len(new_rows) - cap
        evicted = np.zeros(0, np.int64)
        if excess <= 0:
            return new_rows, evicted
        # by slot, not by index entry: the blocks' arrays are read in order. Valid slots are
        # the index's voxels
        evictable = self._slot_field('valid').copy()
        evictable[old_slots] = False
        cand = np.flatnonzero(evictable)
        n_evict = min(excess, len(cand))
        if n_evict:
            evicted = self._least_recent(cand, n_evict)
            self._evict(evicted)
        room = cap - (self.n_voxels - len(evicted))
        if len(new_rows) > room:
            keep = np.argsort(-wsum[new_rows], kind='stable')[:room]
            new_rows = np.sort(new_rows[keep])
        return new_rows, evicted

    def _least_recent(self, cand: np.ndarray, n: int) -> np.ndarray:
        """The n least recently seen of the slots `cand` (ascending), among those last seen at
        the same time the lighter first (the order of (last_seen, weight); a partition, not a
        sort: a full 1M-voxel map evicts a few thousand voxels on every keyframe)."""
        last = self._slot_field('last_seen')[cand]
        cut = np.partition(last, n - 1)[n - 1]  # the stamp of the n-th least recent
        older = cand[last < cut]
        at_cut = cand[last == cut]
        need = n - len(older)
        if need < len(at_cut):  # (a keyframe's voxels share its stamp: often ~100k of them)
            wt = self._slot_field('weight')[at_cut]
            w_cut = np.partition(wt, need - 1)[need - 1]
            lighter = at_cut[wt < w_cut]
            at_cut = np.concatenate([lighter, at_cut[wt == w_cut][:need - len(lighter)]])
        return np.concatenate([older, at_cut])

    def _slot_mask(self, slots: np.ndarray) -> np.ndarray:
        """(slots handed out,) bool, True at `slots` (a look-up table, where np.isin sorts)."""
        mask = np.zeros(self._n_slots, bool)
        mask[slots] = True
        return mask

    def _slot_field(self, name: str) -> np.ndarray:
        """A field of every slot handed out, by slot (the blocks' arrays end to end)."""
        if not self._blocks:  # (an empty map)
            return np.zeros(0)
        return np.concatenate([getattr(blk, name) for blk in self._blocks])[:self._n_slots]

    def _evict(self, slots: np.ndarray) -> None:
        """Empty the voxels at `slots` and free them (the key index keeps them: see _fold)."""
        for b, rows, _ in self._group(slots):
            blk = self._writable(b)
            blk.valid[rows] = False
            blk.weight[rows] = 0
            blk.clip_w[rows] = 0
            blk.clip_norm[rows] = 0
            blk.dino_w[rows] = 0
        self._free = np.concatenate([self._free, np.sort(slots)])
        self.evicted_total += len(slots)

    def _allocate(self, n: int) -> np.ndarray:
        take = min(n, len(self._free))
        slots = self._free[:take]
        self._free = self._free[take:]
        fresh = np.arange(self._n_slots, self._n_slots + n - take, dtype=np.int64)
        self._n_slots += n - take
        while len(self._blocks) * BLOCK_SIZE < self._n_slots:
            self._blocks.append(Block(self._width('clip'), self._width('dino'), self.codec))
        return np.concatenate([slots, fresh])

    def _group(self, slots: np.ndarray):
        """Yield (block index, row indices, positions in `slots`) for slots, one group per
        touched block (slices of three arrays, not an array per group: a keyframe re-observing
        voxels all over a 1M-voxel map touches ~250 blocks)."""
        if len(slots) == 0:
            return
        order = np.argsort(slots, kind='stable')
        s = slots[order]
        blocks = s // BLOCK_SIZE
        rows = s - blocks * BLOCK_SIZE
        cuts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
        starts = [0, *cuts.tolist()]
        stops = [*cuts.tolist(), len(s)]
        for a, z, b in zip(starts, stops, blocks[starts].tolist()):
            yield b, rows[a:z], order[a:z]

    def _writable(self, b: int) -> Block:
        if b in self._shared:
            self._blocks[b] = self._blocks[b].copy()
            self._shared.discard(b)
        blk = self._blocks[b]
        blk.version = next_version()  # what readers cached of its old contents is stale
        return blk

    def _update(self, slots: np.ndarray, sel: np.ndarray, ukeys: np.ndarray, stamp_ns: int,
                batch: tuple, fresh: bool) -> None:
        """Fold batch rows `sel` (voxel sums) into the voxels at `slots` (same order); fresh:
        the slots become new voxels of keys ukeys[sel].

        Block by block (a keyframe re-observing voxels all over a 1M-voxel map touches ~250
        blocks), in compiled loops for all but bf16 / fp16 features (:meth:`_update_in_place`).
        """
        groups = list(self._group(slots))
        if not groups:
            return
        blocks = [self._writable(b) for b, _, _ in groups]
        self._update_in_place(groups, blocks, sel, ukeys, stamp_ns, batch, fresh)

    def _update_in_place(self, groups: list, blocks: list[Block], sel: np.ndarray,
                         ukeys: np.ndarray, stamp_ns: int, batch: tuple, fresh: bool) -> None:
        """The work of :meth:`_update`: compiled loops (mapping.fold) read and write each touched
        slot once, block by block, instead of gathering every field of the touched slots,
        folding and scattering back; same arithmetic, same results. Fresh slots are first made
        empty voxels (weight 0), into which the fold writes a new voxel's values."""
        wsum, psum, csum, clip_sum, clip_wsum, dino_sum, dino_wsum = batch
        if fresh:
            ukeys = np.ascontiguousarray(ukeys, np.int64)
            for (_, rows, order), blk in zip(groups, blocks):
                init_slots(rows, sel[order], ukeys, blk)
        feats = []
        for kind, fsum_all, fw_all in (('clip', clip_sum, clip_wsum),
                                       ('dino', dino_sum, dino_wsum)):
            if fsum_all is None or getattr(blocks[0], kind) is None:
                continue
            if getattr(blocks[0], f'{kind}_scale') is None:  # bf16 / fp16: the numpy fold
                self._fold_features(kind, groups, blocks, sel, fsum_all, fw_all)
            else:
                feats.append((kind, np.ascontiguousarray(fsum_all, np.float32),
                              np.ascontiguousarray(fw_all, np.float32)))
        wsum = np.ascontiguousarray(wsum, np.float64)
        psum = np.ascontiguousarray(psum, np.float64)
        csum = np.ascontiguousarray(csum, np.float64)
        for (_, rows, order), blk in zip(groups, blocks):
            src = sel[order]
            if not feats:
                fold_scalars(rows, src, stamp_ns, wsum, psum, csum, blk.weight, blk.pos,
                             blk.color, blk.count, blk.last_seen)
                continue
            kind, fsum_all, fw_all = feats[0]
            fold_block(rows, src, stamp_ns, wsum, psum, csum, blk.weight, blk.pos, blk.color,
                       blk.count, blk.last_seen, fsum_all, fw_all, getattr(blk, kind),
                       getattr(blk, f'{kind}_scale'), blk.clip_norm if kind == 'clip' else None,
                       getattr(blk, f'{kind}_w'))
            for kind, fsum_all, fw_all in feats[1:]:
                fold_int8(rows, src, fsum_all, fw_all, getattr(blk, kind),
                          getattr(blk, f'{kind}_scale'),
                          blk.clip_norm if kind == 'clip' else None, getattr(blk, f'{kind}_w'))

    def _fold_features(self, kind: str, groups: list, blocks: list[Block], sel: np.ndarray,
                       fsum_all: np.ndarray, fw_all: np.ndarray) -> None:
        """The numpy fold of bf16 CLIP / fp16 DINO means into voxels already in the map."""
        rows_of = [rows for _, rows, _ in groups]
        src = sel[np.concatenate([order for _, _, order in groups])]
        w_name = f'{kind}_w'
        fw = fw_all[src]
        has = np.flatnonzero(fw > 0)
        if not len(has):
            return
        bounds = np.cumsum([0] + [len(rows) for rows in rows_of])
        cuts = np.searchsorted(has, bounds)
        sub_blocks, sub_rows = [], []
        for i, (blk, rows) in enumerate(zip(blocks, rows_of)):
            if cuts[i + 1] > cuts[i]:
                sub_blocks.append(blk)
                sub_rows.append(rows[has[cuts[i]:cuts[i + 1]] - bounds[i]])
        fsum = fsum_all[src[has]]
        fw_old = _gather(sub_blocks, sub_rows, w_name)
        fw_new = (fw_old + fw[has]).astype(np.float32)
        values = _gather(sub_blocks, sub_rows, kind)
        if kind == 'clip':
            norm = np.zeros(len(has), np.float32)
            fold_bf16_mean(values, norm, np.arange(len(has)), fsum, fw_old, fw_new)
            _scatter(sub_blocks, sub_rows, 'clip_norm', norm)
        else:
            mean = values.astype(np.float32)
            mean *= (fw_old / fw_new)[:, None]
            mean += fsum / fw_new[:, None]
            values = mean
        _scatter(sub_blocks, sub_rows, kind, values)
        _scatter(sub_blocks, sub_rows, w_name, fw_new)

    def _enable_dino(self, dim: int) -> None:
        self.dino_dim = int(dim)
        if self.codec == 'pca_int8':
            self._proj['dino'] = self._new_projection('dino', self.dino_dim)
        for b in range(len(self._blocks)):
            self._blocks[b] = self._blocks[b].copy(dino_width=self._width('dino'))
            self._shared.discard(b)

    def _publish(self) -> MapSnapshot:
        """A snapshot of the current blocks (handed out by :meth:`snapshot` on request)."""
        proj = {kind: None if p is None or p.basis is None else
                ProjectionState(p.basis, p.moment.copy(), p.fit_residual)
                for kind, p in self._proj.items()}
        return MapSnapshot(blocks=tuple(self._blocks), voxel_size=self.voxel_size,
                           n_voxels=self.n_voxels, version=self._version,
                           stamp_ns=self._stamp_ns, clip_dim=self.clip_dim,
                           dino_dim=self.dino_dim, gravity=self.gravity, frame=self.frame,
                           clip_projection=proj['clip'], dino_projection=proj['dino'])

    # ------------------------------------------------------------------------ whole-map ops
    def clear(self) -> None:
        """Forget every voxel (the published snapshot stays valid for its readers). A pca_int8
        map keeps its projection (refitted when new features drift from it)."""
        self._begin_write()
        self._blocks = []
        self._shared = set()
        self._index_keys = np.zeros(0, np.int64)
        self._index_slots = np.zeros(0, np.int64)
        self._free = np.zeros(0, np.int64)
        self._n_slots = 0
        self._stamp_ns = 0
        self._version += 1
        self._end_write(self._publish())

    def arrays(self) -> dict[str, np.ndarray]:
        """The map's content as flat arrays (the persistence format), from :meth:`snapshot`
        (any thread)."""
        return self.contents()[0]

    def contents(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, feature metadata) of one snapshot (any thread): what a map file holds.

        Features as stored in memory (mapping.feature_codec): 'bf16': clip_bf16 and fp16
        dino; 'int8': clip_int8 + clip_scale and fp16 dino; 'pca_int8': clip_int8 +
        clip_scale + clip_basis + clip_moment, the same for dino (dino_int8, ...)."""
        snap = self.snapshot()
        out = {'keys': snap.keys, 'positions': snap.positions,
               'colors': snap._gather('color').reshape(-1, 3).astype(np.float32),
               'weights': snap.weights, 'counts': snap.counts, 'last_seen_ns': snap.last_seen_ns,
               'clip_weights': snap.clip_weights,
               'dino_weights': snap._gather('dino_w').astype(np.float32)}
        meta = {'feature_codec': self.codec}
        for kind, dim, proj in (('clip', self.clip_dim, snap.clip_projection),
                                ('dino', self.dino_dim, snap.dino_projection)):
            if not dim:
                continue
            width = self._width(kind)
            values = snap._gather(kind).reshape(-1, width)
            if values.dtype == np.int8:
                out[f'{kind}_int8'] = values
                out[f'{kind}_scale'] = snap._gather(f'{kind}_scale').astype(np.float32)
            else:
                out['clip_bf16' if kind == 'clip' else 'dino'] = values
            if self._proj[kind] is not None:
                meta[f'{kind}_rank'] = width
                # a map without features yet has no basis: zeros (a zero moment: not fitted)
                out[f'{kind}_basis'] = (np.zeros((dim, width), np.float32) if proj is None
                                        else proj.basis)
                out[f'{kind}_moment'] = (np.zeros((width, width)) if proj is None
                                         else proj.moment)
                meta[f'{kind}_fit_residual'] = 0.0 if proj is None else proj.fit_residual
        return out, meta

    @classmethod
    def from_arrays(cls, cfg: MappingConfig, arrays: dict[str, np.ndarray], clip_dim: int,
                    dino_dim: int, stamp_ns: int, gravity: np.ndarray | None = None,
                    frame: str = '', feature_meta: dict | None = None) -> SemanticVoxelMap:
        """Rebuild a map from :meth:`contents` output (already validated by the caller), in
        mapping.feature_codec whatever the codec of the arrays (feature_meta's, default bf16):
        converted where they differ; a 'pca_int8' map from other arrays gets a projection
        fitted to them."""
        meta = feature_meta or {'feature_codec': 'bf16'}
        m = cls(cfg, clip_dim=clip_dim, dino_dim=dino_dim, gravity=gravity, frame=frame)
        keys = arrays['keys']
        n = len(keys)
        if n > cfg.max_voxels:
            raise ValueError(f'the map file holds {n} voxels but mapping.max_voxels is '
                             f'{cfg.max_voxels}; raise mapping.max_voxels to load it')
        file_codec = meta['feature_codec']
        weights = {'clip': arrays['clip_weights'], 'dino': arrays['dino_weights']}

        def decoded(kind: str, rows: np.ndarray) -> np.ndarray:
            """(len(rows), F) float32 features of the arrays, whatever their codec."""
            if f'{kind}_int8' in arrays:
                f = int8_decode(arrays[f'{kind}_int8'][rows], arrays[f'{kind}_scale'][rows])
                basis = arrays.get(f'{kind}_basis')
                return f if basis is None else f @ basis.T
            if kind == 'clip':
                return bf16_decode(arrays['clip_bf16'][rows])
            return arrays['dino'][rows].astype(np.float32)

        as_stored = {}  # kind -> the arrays' codes can be copied as they are
        for kind, dim in (('clip', m.clip_dim), ('dino', m.dino_dim)):
            proj = m._proj[kind]
            as_stored[kind] = file_codec == m.codec
            if not dim or proj is None:
                continue
            basis, moment = arrays.get(f'{kind}_basis'), arrays.get(f'{kind}_moment')
            if (file_codec == 'pca_int8' and basis is not None and basis.shape[1] == proj.rank
                    and np.trace(moment) > 0):
                m._proj[kind] = FeatureProjection(dim, proj.rank, cfg.projection_refit_residual,
                                                  basis, moment, meta[f'{kind}_fit_residual'])
                continue
            as_stored[kind] = False
            fused = np.flatnonzero(weights[kind] > 0)
            if len(fused):  # fitted to (at most 8192 of) the map's features
                step = max(1, len(fused) // 8192)
                proj.fit(decoded(kind, fused[::step]))

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
            for kind in ('clip', 'dino'):
                values, scale = getattr(blk, kind), getattr(blk, f'{kind}_scale')
                if values is None:
                    continue
                if as_stored[kind] and scale is not None:
                    values[rows] = arrays[f'{kind}_int8'][order]
                    scale[rows] = arrays[f'{kind}_scale'][order]
                elif as_stored[kind]:
                    values[rows] = arrays['clip_bf16' if kind == 'clip' else 'dino'][order]
                else:
                    f = decoded(kind, order)
                    proj = m._proj[kind]
                    if proj is not None and proj.basis is not None:
                        f = f @ proj.basis
                    if scale is not None:
                        values[rows], scale[rows] = int8_encode(f)
                    elif kind == 'clip':
                        values[rows] = bf16_encode(f)
                    else:
                        values[rows] = f
                if kind == 'clip' and scale is not None:
                    qf = values[rows].astype(np.float32)
                    blk.clip_norm[rows] = scale[rows] * np.sqrt(np.einsum('ij,ij->i', qf, qf))
                elif kind == 'clip':
                    blk.clip_norm[rows] = np.linalg.norm(bf16_decode(values[rows]), axis=1)
        order = np.argsort(keys)
        m._index_keys = keys[order].astype(np.int64)
        m._index_slots = slots[order]
        m._stamp_ns = int(stamp_ns)
        m._version = 1
        m._end_write(m._publish())
        return m



def warm_up(cfg: MappingConfig, clip_dim: int = 0, dino_dim: int = 0) -> None:
    """Compile (or load from numba's cache) the integration kernels of maps of this layout now
    rather than at the first keyframe (measured: 3.9 s on a fresh install, 0.9 s from the
    cache, on the 2-core development machine): a few synthetic points into a throwaway map of
    the same codec and widths, as new voxels, re-observed ones and with evictions. ('pca_int8'
    runs the kernels of 'int8' on its codes: warmed up as 'int8', without fitting a projection,
    ~0.1 s.)"""
    codec = 'int8' if cfg.feature_codec == 'pca_int8' else cfg.feature_codec
    m = SemanticVoxelMap(dataclasses.replace(cfg, max_voxels=24, feature_codec=codec), clip_dim,
                         dino_dim)
    rng = np.random.default_rng(0)
    n, cells = 64, 8
    X = rng.uniform(-4, 4, (n, 3)) * m.voxel_size
    for stamp in (1, 2, 3):  # re-observing half of the last batch, evicting; no features
        S_clip = rng.standard_normal((cells, clip_dim)).astype(np.float32) if clip_dim else None
        S_dino = rng.standard_normal((cells, dino_dim)).astype(np.float32) if dino_dim else None
        features = (S_clip is not None or S_dino is not None) and stamp < 3
        m.integrate(X, np.full(n, cfg.min_confidence + 1.0, np.float32),
                    rng.integers(0, 256, (n, 3)).astype(np.uint8), stamp,
                    rng.integers(-1, cells, n) if features else None, S_clip, S_dino)
        X = np.concatenate([X[:n // 2], X[n // 2:] + 8 * m.voxel_size])

def _gather(blocks: list[Block], rows_of: list[np.ndarray], name: str) -> np.ndarray:
    """Field `name` of blocks[i] at rows_of[i], concatenated."""
    return np.concatenate([getattr(blk, name)[rows] for blk, rows in zip(blocks, rows_of)])


def _scatter(blocks: list[Block], rows_of: list[np.ndarray], name: str, values: np.ndarray
             ) -> None:
    """Inverse of :func:`_gather`: values (concatenated) written at blocks[i], rows_of[i]."""
    lo = 0
    for blk, rows in zip(blocks, rows_of):
        getattr(blk, name)[rows] = values[lo:lo + len(rows)]
        lo += len(rows)
