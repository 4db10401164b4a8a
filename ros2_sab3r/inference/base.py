"""The Backend protocol: what the pipeline and the node need from an inference backend.

Every backend (torch, onnxruntime, tensorrt, and the package's stand-ins) has the same shape::

    tokens = backend.encode(frame)          # once per frame/keyframe, opaque to the caller
    pair = backend.decode(tokens_a, tokens_b)  # per ordered pair -> PairPrediction

``input_size`` is the (H, W) network input; frames of any size are mapped onto it with
:func:`ros2_sab3r.model.preprocess.fixed_crop` (the pipeline maps intrinsics and colours the same
way). This module imports neither torch nor any runtime, so the pipeline can import it freely.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ros2_sab3r.types import CameraFrame, PairPrediction


class BackendUnavailable(RuntimeError):
    """The configured backend cannot be created; the message says why and what to set."""


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from an inference backend."""

    name: str
    device: str
    input_size: tuple[int, int]  # (H, W) of the network input

    def encode(self, frame: CameraFrame) -> Any: ...

    def decode(self, a: Any, b: Any) -> PairPrediction: ...
