"""The perception pipeline without ROS: frames in, posed keyframes and a semantic map out.

    Pipeline(config, backend, text_encoder).step(frame) -> StepResult

Order of work per frame (the one place where it is written down):

1. Unposed mode (``frames.pose_source == 'none'``): decode the frame against the latest keyframe,
   measure the overlap (share of reciprocal descriptor matches) and register the frame to that
   keyframe (confidence-weighted Umeyama between the keyframe's canonical pointmap and its points
   as seen from the frame). When the overlap drops below ``keyframes.min_overlap``, or more
   than ``keyframes.max_unmapped`` of its confident points lie where no keyframe was (a
   :class:`CoverageGrid` of the keyframes' points; tracked frames are never fused, so what only
   they saw would be missing from the map), the frame becomes a keyframe: it is also decoded
   against the next most recent window keyframes, its pose and per-pair scales are refined
   jointly, and its pointmap is fused into the map.
   Several cameras (told apart by ``CameraFrame.frame_id``): cameras with static extrinsics
   T_BC (:meth:`Pipeline.set_extrinsics`; rigidly mounted, views need not overlap, e.g. front
   and back) each follow their own keyframes, and one without a keyframe in the window is
   placed at T_WB T_BC, T_WB the body pose of the latest frame of another such camera (T_BC in
   metres: the map must be metric, as MASt3R's pointmaps are). Cameras without extrinsics share
   one chain: each frame is registered to the latest keyframe of any camera (their views
   overlap). A frame of a camera without a keyframe in the window that can be neither placed
   nor registered is skipped, counted in :attr:`Pipeline.frames_unplaced` and its reason says
   why.
2. Posed mode (``'tf'``): the pose comes with the frame; a frame becomes a keyframe after enough
   motion, is decoded against recent keyframes only then, and each pair's scale is solved against
   the metric poses (the first keyframe's scale is fixed once the camera has moved).

The first keyframe is decoded against itself to get its own pointmap (a self-pair, as for a single
image); in unposed mode its pointmap defines the map's scale and its camera the map frame.

Threading: one writer (the worker calling step/reset/load) and any number of readers (snapshot,
locate, save) which only read the latest immutable MapSnapshot and never wait for the writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import logging
import threading
import time
from typing import TypeVar

import numpy as np

from ros2_sab3r.config import PerceptionConfig
from ros2_sab3r.frames.keyframes import (
    KeyframeWindow,
    WindowKeyframe,
    needs_keyframe_by_overlap,
    needs_keyframe_by_pose,
)
from ros2_sab3r.geometry.focal import estimate_focal, intrinsics_from_focal
from ros2_sab3r.geometry.matching import overlap_ratio
from ros2_sab3r.geometry.refine import refine_against_window
from ros2_sab3r.geometry.registration import (
    RegistrationError,
    bootstrap_scale_posed,
    pair_scale_posed,
    register_to_keyframe,
    similarity_to_T,
)
from ros2_sab3r.geometry.transforms import apply, is_rigid
from ros2_sab3r.inference import Backend
from ros2_sab3r.inference.base import decode_takes_request
from ros2_sab3r.inference.common import pool_prediction
from ros2_sab3r.mapping.fusion import fuse_keyframe
from ros2_sab3r.mapping.keys import KEY_OFFSET, pack_keys
from ros2_sab3r.mapping.persistence import map_from_file, read_map, save_map
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.mapping.semantic_map import warm_up as warm_up_mapping
from ros2_sab3r.mapping.snapshot import MapSnapshot
from ros2_sab3r.model.preprocess import intrinsics_to_network, resample_to_network
from ros2_sab3r.query.engine import QueryEngine
from ros2_sab3r.query.labels import label_voxels
from ros2_sab3r.types import (
    GEOMETRY_ONLY,
    VIEW1_FEATURES,
    CameraFrame,
    DecodeRequest,
    FrameRejected,
    LocateQuery,
    LocateResult,
    PairPrediction,
    PosedKeyframe,
    StepLatency,
    StepResult,
    StepStatus,
    TextEncoder,
    ViewPrediction,
)

log = logging.getLogger(__name__)
_T = TypeVar('_T')


class StageClock:
    """Milliseconds per stage of one step (a stage run several times adds up), from the
    clock's creation to :meth:`latency`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._ms: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., _T], *args) -> _T:
        """fn(*args), its time added to `stage` (one of StepLatency's fields)."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._ms[stage] = self._ms.get(stage, 0.0) + 1e3 * (time.perf_counter() - t)

    def latency(self) -> StepLatency:
        return StepLatency(**self._ms, total=1e3 * (time.perf_counter() - self._start))


class PredictionError(FrameRejected):
    """A backend output that cannot be used (wrong shapes, no finite points)."""


def sanitize_view(v: ViewPrediction, hw: tuple[int, int], what: str) -> ViewPrediction:
    """Check shapes; zero the confidence of non-finite points instead of failing.

    Descriptors are not checked here: only the overlap measure reads them, on its seed grid, and
    it ignores non-finite ones itself. Checking them here cost ~2 ms per view at 512x384 (24
    channels), 12 ms per unposed keyframe (three pairs), for arrays mostly never read.
    """
    H, W = hw
    if v.X.shape != (H, W, 3) or v.C.shape != (H, W):
        raise PredictionError(f'{what}: X {v.X.shape} / C {v.C.shape} do not match the network '
                              f'input {(H, W)}; the backend output is malformed')
    # Fast path for the usual clean output: a whole-array test is ~5x cheaper than the per-pixel
    # np.isfinite(...).all(-1) over (H, W, 3).
    if np.isfinite(v.X).all() and np.isfinite(v.C).all() and v.C.min() > 0:
        return v
    ok = np.isfinite(v.X).all(-1) & np.isfinite(v.C) & (v.C > 0)
    if not ok.any():
        raise PredictionError(f'{what}: no finite, confident point in the pointmap (all NaN or '
                              'zero confidence); the frame is skipped')
    if ok.all():
        return v
    return dataclasses.replace(v, X=np.where(ok[..., None], v.X, 0.0).astype(np.float32),
                               C=np.where(ok, v.C, 0.0).astype(np.float32))


def _median_depth(X: np.ndarray, C: np.ndarray, min_conf: float) -> float:
    # every 4th pixel each way: a scale reference for thresholds, 16x cheaper than all pixels
    X, C = X[::4, ::4], C[::4, ::4]
    z = X[..., 2][(C >= min_conf) & np.isfinite(X[..., 2])]
    return float(np.median(np.abs(z))) if len(z) else 1.0


class CoverageGrid:
    """Where keyframes have seen: the set of cells (`cell` wide, map units) holding a keyframe
    point. A sorted int64 key array: lookups by searchsorted, one merge per keyframe. At most
    `max_cells` cells (the map's voxel bound): past it, the cells covered longest ago are
    forgotten, as the map evicts its least recently seen voxels.

    Cells twice the map's voxel, points every `stride`-th pixel: a surface seen again with
    pointmap noise of a fraction of a voxel still falls into cells already covered.
    """

    def __init__(self, cell: float, max_cells: int, stride: int = 4) -> None:
        self.cell = float(cell)
        self.max_cells = int(max_cells)
        self.stride = int(stride)
        self._keys = np.zeros(0, np.int64)
        self._added = np.zeros(0, np.int64)  # per cell: the add() that last covered it
        self._adds = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _cell_keys(self, T_WC: np.ndarray, X: np.ndarray, C: np.ndarray, min_conf: float,
                   scale: float = 1.0) -> np.ndarray:
        s = self.stride
        Xs, Cs = X[::s, ::s].reshape(-1, 3), C[::s, ::s].reshape(-1)
        ok = (Cs >= min_conf) & np.isfinite(Xs).all(-1)
        ijk = np.floor(apply(T_WC, scale * Xs[ok].astype(np.float64)) / self.cell)
        return pack_keys(ijk[(np.abs(ijk) < KEY_OFFSET - 2).all(-1)])

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(insert positions, covered mask) of sorted `keys`."""
        pos = np.searchsorted(self._keys, keys)
        if not len(self._keys):
            return pos, np.zeros(len(keys), bool)
        return pos, self._keys[np.minimum(pos, len(self._keys) - 1)] == keys

    def add(self, T_WC: np.ndarray, X: np.ndarray, C: np.ndarray, min_conf: float) -> None:
        """Cover the cells of the confident points X (H, W, 3) (camera frame, map scale)."""
        self._adds += 1
        new = np.unique(self._cell_keys(T_WC, X, C, min_conf))
        pos, known = self._find(new)
        self._added[pos[known]] = self._adds
        # one copy of the arrays (np.union1d sorted all of it again: ~100 ms at 250k cells)
        self._keys = np.insert(self._keys, pos[~known], new[~known])
        self._added = np.insert(self._added, pos[~known], self._adds)
        excess = len(self._keys) - self.max_cells
        if excess > 0:
            keep = np.sort(np.argpartition(self._added, excess)[excess:])
            self._keys, self._added = self._keys[keep], self._added[keep]

    def unmapped_share(self, T_WC: np.ndarray, X: np.ndarray, C: np.ndarray, min_conf: float,
                       scale: float = 1.0) -> float:
        """Share of the confident points `scale` * X (H, W, 3) outside every covered cell (0
        without confident points)."""
        keys = self._cell_keys(T_WC, X, C, min_conf, scale)
        if not len(keys):
            return 0.0
        return float(1.0 - self._find(keys)[1].mean())

    def clear(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._added = np.zeros(0, np.int64)
        self._adds = 0


class Pipeline:
    """Keyframes, poses and the semantic map from a stream of CameraFrames (module docstring)."""

    def __init__(self, config: PerceptionConfig, backend: Backend, text_encoder: TextEncoder
                 ) -> None:
        self._cfg = config.validate()
        self._backend = backend
        # Heads on demand: geometry only for tracked frames and window pairs, the feature heads
        # of view 1 (the new keyframe) only; a backend without requests computes everything.
        self._requests = decode_takes_request(backend)
        self._text_encoder = text_encoder
        self._posed = self._cfg.frames.pose_source == 'tf'
        self._window = KeyframeWindow(self._cfg.keyframes.window_size)
        self._map = self._new_map()
        # the integration kernels compiled (or loaded from numba's cache) now, not at the
        # first keyframe
        warm_up_mapping(self._cfg.mapping, clip_dim=self._text_encoder.dim)
        self._coverage = CoverageGrid(2.0 * self._cfg.mapping.voxel_size_m,
                                      self._cfg.mapping.max_voxels)
        self._query = QueryEngine(self._cfg.query, text_encoder)
        self._write_lock = threading.RLock()  # one writer at a time: step, reset, load
        self._extrinsics: dict[str, np.ndarray] = {}  # frame_id -> (4, 4) T_BC
        self._T_WB: np.ndarray | None = None  # body pose of the latest placed rig frame
        self.frames_processed = 0
        self.frames_skipped = 0
        # unposed mode: frames of a camera neither extrinsics nor registration could place
        self.frames_unplaced: dict[str, int] = {}

    def _new_map(self) -> SemanticVoxelMap:
        gravity = np.asarray(self._cfg.mapping.gravity_in_map, float) if self._posed else None
        return SemanticVoxelMap(self._cfg.mapping, clip_dim=self._text_encoder.dim,
                                gravity=gravity, frame=self._cfg.frames.map_frame)

    def apply_live_config(self, config: PerceptionConfig) -> None:
        """Run with `config` from the next frame / Locate on: keyframe selection, geometry and
        query parameters (the live ones, ``ParamSpec.read_only`` False). The configure-time
        ones (window size, mapping, frames) must be unchanged: they shaped the window and map.
        """
        config = config.validate()
        # one reference swap each: a step or Locate in flight finishes with what it read
        self._query = QueryEngine(config.query, self._text_encoder)
        self._cfg = config

    # --------------------------------------------------------------------------- readers
    @property
    def config(self) -> PerceptionConfig:
        """The validated configuration the pipeline runs with."""
        return self._cfg

    def keyframe_poses(self) -> list[np.ndarray]:
        """(4, 4) T_WC of the keyframes in the window, oldest first."""
        return [item.keyframe.T_WC for item in self._window]

    def latest_keyframe(self) -> PosedKeyframe | None:
        """The newest keyframe of the window, None before the first."""
        latest = self._window.latest()
        return None if latest is None else latest.keyframe

    def label_map(self, labels: Sequence[str], snapshot: MapSnapshot | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Closed-set labelling of `snapshot` (default: the latest): (label index (N,) int32,
        score (N,) float32) per voxel, see :func:`ros2_sab3r.query.labels.label_voxels`."""
        snap = self._map.snapshot() if snapshot is None else snapshot
        return label_voxels(snap, self._query.embed(list(labels)), self._cfg.query.temperature,
                            self._cfg.query.threads)

    def snapshot(self) -> MapSnapshot:
        """The latest immutable map snapshot (never blocks)."""
        return self._map.snapshot()

    def locate(self, query: LocateQuery, snapshot: MapSnapshot | None = None) -> LocateResult:
        """Answer a Locate request on `snapshot` (default: the latest); raises LocateError on
        bad input."""
        return self._query.locate(self._map.snapshot() if snapshot is None else snapshot, query)

    def gravity(self, snapshot: MapSnapshot) -> np.ndarray | None:
        """(3,) gravity (down) in `snapshot`'s frame, as Locate uses it: known (posed maps),
        else the floor-plane estimate (query.estimate_gravity, cached per map version), else
        None."""
        return self._query.gravity(snapshot)

    def save(self, path) -> None:
        """Write the latest snapshot of the map to `path` atomically (npz + JSON metadata)."""
        save_map(self._map, path, extra={'pose_source': self._cfg.frames.pose_source,
                                        'backend': getattr(self._backend, 'name', '')})

    # --------------------------------------------------------------------------- writers
    def set_extrinsics(self, frame_id: str, T_BC: np.ndarray | None) -> None:
        """Unposed mode: camera `frame_id` is rigidly mounted at T_BC (4, 4; body from camera,
        metres) on the body the other cameras with extrinsics share; None forgets it. Used to
        place a camera that has no keyframe in the window (module docstring)."""
        if not isinstance(frame_id, str) or not frame_id:
            raise ValueError('set_extrinsics needs the camera frame_id the frames carry')
        if T_BC is None:
            self._extrinsics.pop(frame_id, None)
            return
        T = np.asarray(T_BC, dtype=np.float64)
        if T.shape != (4, 4) or not is_rigid(T):
            raise ValueError(f'extrinsics of camera {frame_id!r} must be a finite rigid (4, 4) '
                             f'transform T_BC, got shape {T.shape}')
        with self._write_lock:
            self._extrinsics[frame_id] = T.copy()

    def close(self) -> None:
        """Release the backend's resources now (TensorRT: GPU buffers and engines) rather than
        when it is garbage-collected; the pipeline is not used afterwards."""
        close = getattr(self._backend, 'close', None)
        if close is not None:
            close()

    def load(self, path) -> None:
        """Replace the map by the one in `path`; on any error the current map is kept.

        In unposed mode the loaded map's frame is the camera frame of its first keyframe, so new
        frames (which start a new trajectory) are not registered against it: loading is for
        querying. In posed mode new frames keep extending it.
        """
        mf = read_map(path, self._cfg.mapping, self._text_encoder.dim)
        new_map = map_from_file(mf, self._cfg.mapping, frame=self._cfg.frames.map_frame)
        with self._write_lock:
            self._map = new_map
            self._window.clear()
            self._coverage.clear()
            self._T_WB = None
        if not self._posed:
            log.warning('loaded map %s in unposed mode: new frames start a new trajectory and are '
                        'not relocalised against it', path)

    def reset(self) -> None:
        """Forget keyframes and map (e.g. after the robot was carried elsewhere)."""
        with self._write_lock:
            self._window.clear()
            self._map.clear()
            self._coverage.clear()
            self._T_WB = None
            self.frames_processed = 0
            self.frames_skipped = 0
            self.frames_unplaced = {}

    def step(self, frame: CameraFrame) -> StepResult:
        """Process one frame; never raises for bad data (the result says what was skipped)."""
        if not isinstance(frame, CameraFrame):
            raise TypeError(f'Pipeline.step takes a CameraFrame, got {type(frame).__name__}')
        with self._write_lock:
            clock = StageClock()
            try:
                result = (self._step_posed if self._posed else self._step_unposed)(frame, clock)
            except FrameRejected as exc:
                result = self._skipped(frame, str(exc))
            self.frames_processed += 1
            if result.status == StepStatus.SKIPPED:
                self.frames_skipped += 1
                log.debug('frame %d skipped: %s', frame.stamp_ns, result.reason)
            return dataclasses.replace(
                result, latency=clock.latency(), keyframes_in_window=len(self._window),
                keyframes_total=self._window.total, voxels=self._map.n_voxels)

    # ------------------------------------------------------------------------- internals
    def _skipped(self, frame: CameraFrame, reason: str) -> StepResult:
        return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.SKIPPED, reason=reason)

    def _backend_call(self, clock: StageClock, stage: str, fn: Callable[..., _T], *args) -> _T:
        """A backend encode/decode; the ValueError a backend raises for input it cannot take
        (wrong image size, a frame it does not know, tokens of another backend) rejects the
        frame."""
        try:
            return clock.run(stage, fn, *args)
        except FrameRejected:
            raise
        except ValueError as exc:
            raise FrameRejected(f'{type(exc).__name__}: {exc}') from exc

    def _encode(self, clock: StageClock, frame: CameraFrame):
        return self._backend_call(clock, 'encode', self._backend.encode, frame)

    def _decode(self, clock: StageClock, a, b, request: DecodeRequest) -> PairPrediction:
        args = (a, b, request) if self._requests else (a, b)
        pred = self._backend_call(clock, 'decode', self._backend.decode, *args)
        # model.feature_pool, part of the decode stage (the torch backend pooled on its device
        # already: a no-op then)
        pred = clock.run('decode', pool_prediction, pred, self._cfg.model.feature_pool)
        hw = tuple(pred.image_size)
        return dataclasses.replace(pred, view1=sanitize_view(pred.view1, hw, 'view 1'),
                                   view2=sanitize_view(pred.view2, hw, 'view 2'))

    def _with_features(self, clock: StageClock, a, b, pred: PairPrediction) -> PairPrediction:
        """`pred` (a geometry-only decode of the pair (a, b)) with view 1's features: asked
        for again (the torch backend runs only the missing heads), or `pred` itself when the
        backend computed everything anyway."""
        return self._decode(clock, a, b, VIEW1_FEATURES) if self._requests else pred

    def _intrinsics(self, frame: CameraFrame, X: np.ndarray, C: np.ndarray
                    ) -> tuple[np.ndarray, bool]:
        H, W = X.shape[:2]
        if frame.K is not None:
            return intrinsics_to_network(frame.K, frame.image.shape[:2], (H, W)), False
        f = estimate_focal(X, mask=C >= self._cfg.geometry.min_confidence)
        return intrinsics_from_focal(f, W, H), True

    def _make_keyframe(self, frame: CameraFrame, T_WC: np.ndarray, X: np.ndarray,
                       view: ViewPrediction) -> PosedKeyframe:
        K, estimated = self._intrinsics(frame, X, view.C)
        return PosedKeyframe(
            keyframe_id=self._window.total, stamp_ns=frame.stamp_ns, frame_id=frame.frame_id,
            T_WC=T_WC, K=K, X=X.astype(np.float32), C=view.C,
            rgb=resample_to_network(frame.image, X.shape[:2]), S_clip=view.S_clip,
            S_dino=view.S_dino, focal_estimated=estimated)

    def _camera_keyframes(self, frame_id: str) -> list[WindowKeyframe]:
        """The window's keyframes of camera `frame_id`, newest first."""
        return [w for w in self._window.recent(len(self._window))
                if w.keyframe.frame_id == frame_id]

    def _placed(self, frame: CameraFrame, T_WC: np.ndarray) -> None:
        """Remember the body pose when the frame's camera has extrinsics."""
        T_BC = self._extrinsics.get(frame.frame_id)
        if T_BC is not None:
            self._T_WB = T_WC @ np.linalg.inv(T_BC)

    def _keyframe_result(self, frame: CameraFrame, kf: PosedKeyframe, reason: str,
                         overlap: float | None = None) -> StepResult:
        self._placed(frame, kf.T_WC)
        return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.KEYFRAME, reason=reason,
                          T_WC=kf.T_WC, keyframe_id=kf.keyframe_id, overlap=overlap)

    def _place_camera(self, frame: CameraFrame, tokens, clock: StageClock
                      ) -> StepResult | None:
        """Unposed mode, a camera without a keyframe in the window: the map's first keyframe,
        or a keyframe placed by its extrinsics; None when neither applies (it is then
        registered to the latest keyframe of any camera)."""
        if self._window.latest() is None:
            pred = self._decode(clock, tokens, tokens, VIEW1_FEATURES)
            kf = self._make_keyframe(frame, np.eye(4), pred.view1.X, pred.view1)
            self._insert(kf, tokens, clock)
            return self._keyframe_result(frame, kf, 'first keyframe')
        T_BC = self._extrinsics.get(frame.frame_id)
        if T_BC is None or self._T_WB is None:
            return None
        pred = self._decode(clock, tokens, tokens, VIEW1_FEATURES)
        kf = self._make_keyframe(frame, self._T_WB @ T_BC, pred.view1.X, pred.view1)
        self._insert(kf, tokens, clock)
        return self._keyframe_result(frame, kf,
                                     f'camera {frame.frame_id!r} placed by its extrinsics')

    def _unplaced(self, frame: CameraFrame, kf: PosedKeyframe, exc: Exception) -> StepResult:
        """A camera without keyframes whose frame does not register to the map: counted."""
        cam = frame.frame_id
        n = self.frames_unplaced[cam] = self.frames_unplaced.get(cam, 0) + 1
        why = ('it has extrinsics but no camera with extrinsics was placed yet'
               if cam in self._extrinsics else 'it has no extrinsics (Pipeline.set_extrinsics)')
        reason = (f'camera {cam!r} cannot be placed: {why}, and its view does not register to '
                  f'keyframe {kf.keyframe_id} of camera {kf.frame_id!r} ({exc})')
        if n == 1 or n % 100 == 0:
            log.warning('%s; %d frames of it unplaced so far', reason, n)
        return self._skipped(frame, reason)

    def _step_unposed(self, frame: CameraFrame, clock: StageClock) -> StepResult:
        g = self._cfg.geometry
        tokens = self._encode(clock, frame)
        own = self._camera_keyframes(frame.frame_id)
        if own and frame.frame_id in self._extrinsics:
            # a rig camera follows its own keyframes: the others' views need not overlap
            latest, partners = own[0], own
        else:
            placed = None if own else self._place_camera(frame, tokens, clock)
            if placed is not None:
                return placed
            # the latest keyframes of any camera: one camera, or cameras whose views overlap
            # (they share one chain of keyframes)
            partners = self._window.recent(self._cfg.keyframes.pairs_per_keyframe)
            latest = partners[0]
        pred = self._decode(clock, tokens, latest.tokens, GEOMETRY_ONLY)
        overlap = clock.run('match', overlap_ratio, pred.view1.D, pred.view2.D,
                              self._cfg.keyframes.match_stride, pred.view1.D_conf,
                              pred.view2.D_conf, g.min_confidence)
        kf_latest = latest.keyframe
        try:
            sim = clock.run('pose', register_to_keyframe, pred.view2.X, pred.view2.C,
                            kf_latest.X, kf_latest.C, g)
            depth = _median_depth(kf_latest.X, kf_latest.C, g.min_confidence)
            if sim.rmse > g.max_registration_rmse * depth:
                raise RegistrationError(
                    f'registration to keyframe {kf_latest.keyframe_id} is inconsistent (RMS '
                    f'{sim.rmse:.3f} m at depth {depth:.2f} m, above '
                    'geometry.max_registration_rmse)')
        except RegistrationError as exc:
            if own:
                raise
            return self._unplaced(frame, kf_latest, exc)
        T_WC = kf_latest.T_WC @ similarity_to_T(sim)
        kc = self._cfg.keyframes
        if needs_keyframe_by_overlap(overlap, kc):
            why = f'overlap {overlap:.2f} < {kc.min_overlap}'
        else:
            unmapped = 0.0
            if kc.max_unmapped < 1.0:
                unmapped = clock.run('match', self._coverage.unmapped_share, T_WC,
                                     pred.view1.X, pred.view1.C,
                                     self._cfg.mapping.min_confidence, sim.s)
            if unmapped <= kc.max_unmapped:
                self._placed(frame, T_WC)
                return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.TRACKED,
                                  T_WC=T_WC, overlap=overlap)
            why = f'unmapped {unmapped:.2f} > {kc.max_unmapped}'
        pred = self._with_features(clock, tokens, latest.tokens, pred)
        edges = [(kf_latest, pred.view2, sim.s)]
        for other in partners[1:self._cfg.keyframes.pairs_per_keyframe]:
            p = self._decode(clock, tokens, other.tokens, GEOMETRY_ONLY)
            try:
                s = clock.run('pose', register_to_keyframe, p.view2.X, p.view2.C,
                                other.keyframe.X, other.keyframe.C, g)
            except RegistrationError as exc:
                log.debug('pair with keyframe %d not used: %s', other.keyframe.keyframe_id, exc)
                continue
            edges.append((other.keyframe, p.view2, s.s))
        scale = sim.s
        if g.refine_iterations > 0:
            refined = clock.run('refine', refine_against_window, T_WC, edges, g, depth)
            T_WC, scale = refined.T_WC, float(refined.scales[0])
        kf = self._make_keyframe(frame, T_WC, scale * pred.view1.X, pred.view1)
        self._insert(kf, tokens, clock)
        return self._keyframe_result(frame, kf, why, overlap)

    def _step_posed(self, frame: CameraFrame, clock: StageClock) -> StepResult:
        g = self._cfg.geometry
        if frame.T_WC is None:
            return self._skipped(frame, "no pose with the frame (frames.pose_source is 'tf'); "
                                        'check TF between the map and camera frames')
        T_WC = np.asarray(frame.T_WC, dtype=np.float64)
        if not is_rigid(T_WC):
            return self._skipped(frame, 'the frame pose is not a finite rigid transform')
        latest = self._window.latest()
        if latest is None:
            tokens = self._encode(clock, frame)
            pred = self._decode(clock, tokens, tokens, VIEW1_FEATURES)
            kf = self._make_keyframe(frame, T_WC, pred.view1.X, pred.view1)
            # Its scale is unknown until the camera moves: kept in the window, fused later.
            self._window.insert(WindowKeyframe(kf, tokens, metric=False))
            return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.KEYFRAME, T_WC=T_WC,
                              keyframe_id=kf.keyframe_id,
                              reason='first keyframe; map waits for motion to fix the scale')
        new, why = needs_keyframe_by_pose(T_WC, latest.keyframe.T_WC, self._cfg.keyframes)
        if not new:
            return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.TRACKED, T_WC=T_WC)
        tokens = self._encode(clock, frame)
        partners = self._window.recent(self._cfg.keyframes.pairs_per_keyframe)
        scaled_X = []
        for wk in partners:
            p = self._decode(clock, tokens, wk.tokens, GEOMETRY_ONLY)
            kf = wk.keyframe
            args = (p.view2.X, p.view2.C, kf.X, kf.C, T_WC, kf.T_WC, g)
            try:
                if wk.metric:
                    s = clock.run('pose', pair_scale_posed, *args)
                else:
                    s, k = clock.run('pose', bootstrap_scale_posed, *args)
                    fixed = dataclasses.replace(kf, X=(kf.X / k).astype(np.float32))
                    self._window.replace_latest(WindowKeyframe(fixed, wk.tokens, metric=True))
                    self._integrate(fixed, clock)
            except RegistrationError as exc:
                if not wk.metric:
                    raise
                log.debug('pair with keyframe %d not used: %s', kf.keyframe_id, exc)
                continue
            if not scaled_X:
                # the newest usable partner's pair gives the keyframe its points and features
                view1 = self._with_features(clock, tokens, wk.tokens, p).view1
            scaled_X.append(p.view1.X / s)
        if not scaled_X:
            raise RegistrationError('no window keyframe shares enough confident points with this '
                                    'frame to fix its scale')
        kf = self._make_keyframe(frame, T_WC, scaled_X[0], view1)
        self._insert(kf, tokens, clock)
        return StepResult(stamp_ns=frame.stamp_ns, status=StepStatus.KEYFRAME, reason=why,
                          T_WC=T_WC, keyframe_id=kf.keyframe_id)

    def _insert(self, kf: PosedKeyframe, tokens, clock: StageClock) -> None:
        self._window.insert(WindowKeyframe(kf, tokens, metric=True))
        self._integrate(kf, clock)
        if not self._posed:
            self._coverage.add(kf.T_WC, kf.X, kf.C, self._cfg.mapping.min_confidence)

    def _integrate(self, kf: PosedKeyframe, clock: StageClock) -> None:
        clock.run('integrate', fuse_keyframe, self._map, kf, self._cfg.mapping)
