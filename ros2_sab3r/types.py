"""Typed values passed between pipeline stages.

Notation used everywhere in the package:

- ``T_WC``: 4x4 float64 rigid transform, world-from-camera (maps camera points into the world/map
  frame). Cameras follow OpenCV (x right, y down, z forward), like ROS optical frames.
- ``X``: 3D points, ``(..., 3)`` float32, metres unless stated.
- ``C``: per-pixel confidence, ``(...)`` float32, >= 1 for MASt3R's ``exp`` confidence mode.
- ``D``: per-pixel local descriptors, ``(..., 24)`` float32, unit norm.
- ``S``: per-pixel semantic features (``S_clip``, ``S_dino``), ``(h, w, F)`` float32.
- ``K``: 3x3 pinhole intrinsics in pixels of the image they belong to.

Nothing in this module imports ROS; values are numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class CameraFrame:
    """One RGB image as it leaves the ROS boundary (or a bag reader)."""

    stamp_ns: int  # acquisition time, nanoseconds (ROS time of the source header)
    frame_id: str  # optical frame of the camera that took it
    image: np.ndarray  # (H, W, 3) uint8 RGB
    camera: str = ''  # camera name (topic namespace), several cameras can feed one node
    K: np.ndarray | None = None  # (3, 3) intrinsics of `image`, None when unknown
    T_WC: np.ndarray | None = None  # (4, 4) pose from outside (TF/odometry), None when unposed

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, 'shape', type(img).__name__)
            raise ValueError(f'CameraFrame.image must be (H, W, 3), got {shape}')
        if img.dtype != np.uint8:
            raise ValueError(f'CameraFrame.image must be uint8 RGB, got {img.dtype}')
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f'CameraFrame.image is empty: {img.shape}')
        if self.K is not None and np.asarray(self.K).shape != (3, 3):
            raise ValueError(f'CameraFrame.K must be 3x3, got {np.asarray(self.K).shape}')
        if self.T_WC is not None and np.asarray(self.T_WC).shape != (4, 4):
            raise ValueError(f'CameraFrame.T_WC must be 4x4, got {np.asarray(self.T_WC).shape}')


@dataclass(frozen=True)
class ViewPrediction:
    """SAB3R outputs for one view of a pair, at the network's input resolution (H, W)."""

    X: np.ndarray  # (H, W, 3) points expressed in the frame of view 1 of the pair
    C: np.ndarray  # (H, W) pointmap confidence
    D: np.ndarray  # (H, W, 24) local descriptors
    D_conf: np.ndarray  # (H, W) descriptor confidence
    S_clip: np.ndarray | None = None  # (h, w, Fc) CLIP-space features (h, w = H, W / stride)
    S_dino: np.ndarray | None = None  # (h, w, Fd) DINO-space features


@dataclass(frozen=True)
class PairPrediction:
    """What a backend returns for an ordered pair (view 1, view 2)."""

    view1: ViewPrediction
    view2: ViewPrediction
    image_size: tuple[int, int]  # (H, W) of the network input both views were resized/cropped to
    extras: dict = field(default_factory=dict)  # backend timing and provenance, never data


@dataclass(frozen=True)
class DecodeRequest:
    """Which outputs ``Backend.decode`` computes for an ordered pair: the geometry of both views
    (X, C, D, D_conf) always, the feature heads (S_clip, S_dino) only of the views listed here.
    A view left out has ``S_clip``/``S_dino`` None; everything computed is identical to what a
    full decode gives."""

    features: tuple[int, ...] = (1, 2)  # views (1 and/or 2) whose feature heads run

    def __post_init__(self) -> None:
        views = tuple(self.features)
        if any(v not in (1, 2) for v in views) or len(set(views)) != len(views):
            raise ValueError(f'DecodeRequest.features must name distinct views 1 and/or 2, got '
                             f'{self.features!r}')
        object.__setattr__(self, 'features', tuple(sorted(views)))

    def wants_features(self, view: int) -> bool:
        return view in self.features


FULL_DECODE = DecodeRequest()  # every output of both views (what decode(a, b) computes)
GEOMETRY_ONLY = DecodeRequest(features=())  # tracked frames: registration and overlap only
VIEW1_FEATURES = DecodeRequest(features=(1,))  # a new keyframe (view 1) with its features


@runtime_checkable
class TextEncoder(Protocol):
    """Maps query strings into the CLIP feature space of the semantic head."""

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return (N, dim) float32 unit-norm embeddings, one per text (prompt ensemble applied)."""
        ...


@dataclass(frozen=True)
class PosedKeyframe:
    """A keyframe once its pose is known: what the map integrates and the ROS layer publishes.

    Everything is at the network's input resolution (H, W) of the pair it came from.
    """

    keyframe_id: int  # 0, 1, 2, ... since the last reset
    stamp_ns: int  # stamp of the CameraFrame it was made from
    frame_id: str  # optical frame of that camera
    T_WC: np.ndarray  # (4, 4) float64 world-from-camera, metres
    K: np.ndarray  # (3, 3) intrinsics at (H, W); given or estimated from the pointmap
    X: np.ndarray  # (H, W, 3) float32 points in this camera's frame, map scale (metres if posed)
    C: np.ndarray  # (H, W) float32 pointmap confidence
    rgb: np.ndarray  # (H, W, 3) uint8 colours resampled to the network resolution
    S_clip: np.ndarray | None = None  # (h, w, Fc) CLIP-space features
    S_dino: np.ndarray | None = None  # (h, w, Fd) DINO-space features
    focal_estimated: bool = False  # True when K came from the pointmap (no CameraInfo)


class StepStatus(StrEnum):
    """What ``Pipeline.step`` made of a frame (a str: compares and serialises as its value)."""

    KEYFRAME = 'keyframe'  # a new keyframe, fused into the map (posed: once the scale is known)
    TRACKED = 'tracked'  # placed against the latest keyframe, not fused
    SKIPPED = 'skipped'  # not used; StepResult.reason says why


class LocateStatus(StrEnum):
    """Status of one Locate answer (a str; the wire values of LocatedObject.status's names)."""

    FOUND = 'FOUND'
    NOT_FOUND = 'NOT_FOUND'
    AMBIGUOUS = 'AMBIGUOUS'


class FrameRejected(ValueError):
    """A frame the pipeline cannot use: the backend refused its input or produced unusable
    output, or it could not be registered. ``Pipeline.step`` reports it as a skipped frame with
    this message; any other exception escaping a step is a bug and propagates."""


@dataclass(frozen=True)
class StepLatency:
    """Milliseconds spent per stage of one ``Pipeline.step``; None for a stage that did not run.

    A stage that runs several times in one step (decoding against several keyframes) counts
    its total.
    """

    encode: float | None = None  # backend.encode of the frame
    decode: float | None = None  # backend.decode of every pair
    match: float | None = None  # descriptor overlap with the latest keyframe (unposed)
    pose: float | None = None  # registration / pair scales
    refine: float | None = None  # window refinement of a new keyframe (unposed)
    integrate: float | None = None  # fusion into the map
    total: float = 0.0  # the whole step

    @classmethod
    def stages(cls) -> tuple[str, ...]:
        """Stage names in pipeline order, 'total' last."""
        return tuple(f.name for f in fields(cls))

    def ran(self) -> dict[str, float]:
        """Stage -> ms of the stages that ran (and 'total')."""
        return {k: v for k in self.stages() if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class StepResult:
    """What ``Pipeline.step`` did with one frame."""

    stamp_ns: int
    status: StepStatus
    reason: str = ''  # why a frame was skipped or why it became a keyframe, for logs and status
    T_WC: np.ndarray | None = None  # (4, 4) pose of the frame, None when it could not be placed
    keyframe_id: int | None = None  # id of the new keyframe when status is KEYFRAME
    overlap: float | None = None  # reciprocal-match ratio with the latest keyframe (unposed mode)
    keyframes_in_window: int = 0
    keyframes_total: int = 0
    voxels: int = 0  # voxels in the map after this step
    latency: StepLatency = field(default_factory=StepLatency)

    @property
    def is_keyframe(self) -> bool:
        return self.status == StepStatus.KEYFRAME


@dataclass(frozen=True)
class LocateQuery:
    """A Locate request, already free of ROS types. Zeros mean 'use the configured default'."""

    queries: tuple[str, ...]  # what to look for, UTF-8, at least one
    negatives: tuple[str, ...] = ()  # extra phrases the answer should not resemble
    top_k: int = 0  # instances returned per query; 0: query.default_top_k
    # relevancy a voxel needs to belong to a query; 0: query.default_min_score ('lerf'),
    # query.official_threshold ('official')
    min_score: float = 0.0
    labels: tuple[str, ...] = ()  # optional caller label per query (same length as queries)
    # scoring: 'lerf' or 'official' (see ros2_sab3r/query/engine.py); '': query.relevancy_mode
    relevancy_mode: str = ''


@dataclass(frozen=True)
class OrientedBox:
    """A 3D box: centre (m), orientation as a quaternion (x, y, z, w), edge lengths (m)."""

    center: np.ndarray  # (3,) float64 in the map frame
    quat_xyzw: np.ndarray  # (4,) float64, box axes -> map frame
    size: np.ndarray  # (3,) float64 edge lengths along the box's own x, y, z axes

    def rotation(self) -> np.ndarray:
        """(3, 3) rotation whose columns are the box axes in the map frame."""
        x, y, z, w = (float(v) for v in self.quat_xyzw)
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])


@dataclass(frozen=True)
class LocatedObject:
    """One instance found for one query (or the single NOT_FOUND entry of a query)."""

    query: str
    label: str  # the caller's label for the query, or the query itself
    status: LocateStatus
    # 'lerf'/'official': mean relevancy of the instance's voxels in [0, 1]; 'calibrated': the
    # query against its strongest vocabulary competitor at the instance; 0 when NOT_FOUND
    score: float
    centroid: np.ndarray | None = None  # (3,) confidence-weighted centre of its voxels, metres
    box: OrientedBox | None = None
    points: np.ndarray | None = None  # (N, 3) float32 voxel positions
    colors: np.ndarray | None = None  # (N, 3) uint8
    last_seen_ns: int = 0  # latest stamp that observed any of its voxels
    reason: str = ''  # why this status, in words (calibrated mode: the deciding comparison)

    @property
    def point_count(self) -> int:
        return 0 if self.points is None else int(len(self.points))


@dataclass(frozen=True)
class LocateResult:
    """Answer to a LocateQuery: per query its instances by descending score, or one NOT_FOUND."""

    objects: tuple[LocatedObject, ...]
    map_stamp_ns: int  # stamp of the newest observation in the snapshot that was queried
    frame: str = ''  # frame of all geometry (the map frame)
    message: str = ''
    # (N,) per voxel of the queried snapshot (its row order), the highest relevancy over the
    # queries; None when no map was queried. For display (the node's ~/relevancy cloud).
    relevancy: np.ndarray | None = field(default=None, repr=False, compare=False)
