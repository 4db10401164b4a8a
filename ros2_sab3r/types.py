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

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

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
            raise ValueError(f'CameraFrame.image must be (H, W, 3), got {getattr(img, "shape", img)}')
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


@runtime_checkable
class TextEncoder(Protocol):
    """Maps query strings into the CLIP feature space of the semantic head."""

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return (N, dim) float32 unit-norm embeddings, one per text (prompt ensemble applied)."""
        ...
