"""The Backend protocol: what the pipeline, the node and load_model need from an inference backend.

Every backend (torch, onnxruntime, tensorrt, and the package's stand-ins) has the same shape::

    backend = Class.from_config(model_config)   # how load_model builds every backend
    backend.warm_up()                         # before the first frame; returns milliseconds
    tokens = backend.encode(frame)            # once per frame/keyframe, opaque to the caller
    pair = backend.decode(tokens_a, tokens_b)  # per ordered pair -> PairPrediction
    pair = backend.decode(tokens_a, tokens_b, GEOMETRY_ONLY)  # heads on demand (optional)
    backend.close()                           # free what it holds (GPU memory) now

``input_size`` is the (H, W) network input; frames of any size are mapped onto it with
:func:`ros2_sab3r.model.preprocess.fixed_crop` (the pipeline maps intrinsics and colours the same
way). This module imports neither torch nor any runtime, so the pipeline can import it freely.

Heads on demand: a backend whose ``decode`` takes a third argument ``request``
(:class:`~ros2_sab3r.types.DecodeRequest`) runs the feature heads only of the views asked for;
the built-in backends do. One without it (stand-ins, wrappers) computes everything, and the
pipeline then uses what it needs (:func:`decode_takes_request`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ros2_sab3r.types import CameraFrame, PairPrediction, TextEncoder


def decode_takes_request(backend: object) -> bool:
    """Whether ``backend.decode`` accepts a DecodeRequest (a parameter named ``request``)."""
    import inspect

    try:
        return 'request' in inspect.signature(backend.decode).parameters
    except (AttributeError, TypeError, ValueError):
        return False


class BackendUnavailable(RuntimeError):
    """The configured backend cannot be created; the message says why and what to set."""


@runtime_checkable
class Backend(Protocol):
    """What the pipeline, the node and load_model use of an inference backend.

    Built by :func:`ros2_sab3r.inference.factory.load_model` with the class method
    ``from_config(model_config)`` (a construction contract, so not part of this instance
    protocol: stand-ins built from rendered frames in tests have no configuration).
    """

    name: str  # for logs and PerceptionStatus.backend
    device: str  # 'cpu', 'cuda', 'cuda:0', ...
    input_size: tuple[int, int]  # (H, W) of the network input
    clip_dim: int  # width of the S_clip features (0: no CLIP head): the text tower must match
    # A text encoder the backend brings (stand-ins); None: load_model loads model.text_encoder.
    text_encoder: TextEncoder | None

    def encode(self, frame: CameraFrame) -> Any: ...

    def decode(self, a: Any, b: Any) -> PairPrediction:
        """The ordered pair (a, b); built-in backends also take ``request: DecodeRequest``."""
        ...

    def warm_up(self) -> float:
        """Run what lazy initialisation needs before the first frame; milliseconds taken."""
        ...

    def close(self) -> None:
        """Free what the backend holds (GPU buffers) now; it is unusable afterwards."""
        ...
