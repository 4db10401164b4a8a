"""Pieces every backend shares: frame preprocessing, the token handle, outputs by name.

The decoder graph's outputs carry the official MASt3R names (``pts3d_1``, ``conf_1``, ``desc_1``,
``desc_conf_1``, ``clip_1``, ``dino_1``, ``pts3d_in_other_view_2``, ..., named in
:mod:`ros2_sab3r.model.outputs`); :func:`pair_from_named` turns them into the pipeline's
:class:`PairPrediction`, whichever runtime produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from ros2_sab3r.model.outputs import (
    DECODER_INPUTS,
    FEATURE_FIELDS,
    OUTPUT_FIELDS,
    PREDICTION_FIELDS,
    REQUIRED_OUTPUTS,
)
from ros2_sab3r.model.preprocess import fixed_crop
from ros2_sab3r.types import (
    FULL_DECODE,
    CameraFrame,
    DecodeRequest,
    PairPrediction,
    ViewPrediction,
)


@dataclass(frozen=True)
class FrameTokens:
    """What ``Backend.encode`` returns: encoder tokens of one frame, kept for its pairs."""

    tokens: Any  # (1, N, enc_dim): torch tensor (torch backend) or float32 numpy array
    image_size: tuple[int, int]  # (H, W) network input the tokens come from
    stamp_ns: int  # of the frame, for error messages
    owner: int  # id() of the backend that made them: tokens do not travel between backends


def frame_pixels(frame: CameraFrame, input_size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: the frame resized to cover the network input and centre-cropped, the
    same geometry the pipeline uses for intrinsics and colours (model.preprocess.fixed_crop)."""
    crop = fixed_crop(frame.image.shape[:2], input_size)
    return crop.apply(PIL.Image.fromarray(frame.image))


def check_pair(owner: object, a: FrameTokens, b: FrameTokens) -> None:
    for what, t in (('a', a), ('b', b)):
        if not isinstance(t, FrameTokens) or t.owner != id(owner):
            raise ValueError(
                f'decode({what}): tokens were not made by this backend ({type(t).__name__}); '
                'encode every frame with the backend that decodes it')


def pair_from_named(named: Mapping[str, np.ndarray], image_size: tuple[int, int],
                    extras: dict | None = None) -> PairPrediction:
    """Decoder outputs by official name, batch first ((1, H, W, ...)), -> PairPrediction."""
    missing = [n for n in REQUIRED_OUTPUTS if n not in named]
    if missing:
        raise ValueError(f'decoder outputs lack {missing}; re-export the model')
    views: dict[int, dict[str, np.ndarray]] = {1: {}, 2: {}}
    for name, array in named.items():
        if name in OUTPUT_FIELDS:
            view, field = OUTPUT_FIELDS[name]
            views[view][PREDICTION_FIELDS[field]] = np.ascontiguousarray(array[0],
                                                                         dtype=np.float32)
    return PairPrediction(view1=ViewPrediction(**views[1]), view2=ViewPrediction(**views[2]),
                          image_size=tuple(image_size), extras=dict(extras or {}))


def pool_factor(grid: tuple[int, int], image_size: tuple[int, int], pool: int) -> int:
    """How many cells of a feature grid each way ``model.feature_pool`` averages into one: the
    grid is brought to (H / pool, W / pool); 1 when it is that coarse already or does not
    divide into it (features a head gives on its own coarser grid are left as they are)."""
    H, W = image_size
    th, tw = H // pool, W // pool
    h, w = grid
    if pool <= 1 or h <= th or h % th or w % tw or h // th != w // tw:
        return 1
    return h // th


def pool_features(S: np.ndarray | None, image_size: tuple[int, int], pool: int
                  ) -> np.ndarray | None:
    """(h, w, F) features averaged over r x r cells (r from :func:`pool_factor`), float32."""
    if S is None:
        return None
    r = pool_factor(S.shape[:2], image_size, pool)
    if r == 1:
        return S
    h, w, F = S.shape
    # sum over the r columns, then the r rows, of each pooled cell (contiguous reductions)
    out = S.reshape(h, w // r, r, F).sum(axis=2, dtype=np.float32)
    out = out.reshape(h // r, r, w // r, F).sum(axis=1)
    out *= np.float32(1.0 / (r * r))
    return out


def pool_prediction(pred: PairPrediction, pool: int) -> PairPrediction:
    """Both views' S_clip/S_dino pooled (``model.feature_pool``); the same object when nothing
    changes (pool 1, or a backend that pooled them already)."""
    if pool <= 1:
        return pred
    views = []
    for v in (pred.view1, pred.view2):
        clip = pool_features(v.S_clip, pred.image_size, pool)
        dino = pool_features(v.S_dino, pred.image_size, pool)
        views.append(v if clip is v.S_clip and dino is v.S_dino else
                     dataclasses.replace(v, S_clip=clip, S_dino=dino))
    if views[0] is pred.view1 and views[1] is pred.view2:
        return pred
    return dataclasses.replace(pred, view1=views[0], view2=views[1])


def is_feature_output(name: str) -> bool:
    """Whether an official output name is a semantic feature map (CLIP/DINO head of a view)."""
    return OUTPUT_FIELDS.get(name, (0, ''))[1] in FEATURE_FIELDS


def requested_outputs(names: Sequence[str], request: DecodeRequest) -> list[str]:
    """The subset of decoder output ``names`` a request asks for: all geometry, and the feature
    outputs of the requested views only."""
    return [name for name in names if not is_feature_output(name)
            or request.wants_features(OUTPUT_FIELDS[name][0])]


def check_request(request: object) -> DecodeRequest:
    if not isinstance(request, DecodeRequest):
        raise TypeError(f'decode(request=...) takes a DecodeRequest, got '
                        f'{type(request).__name__}')
    return request


def parse_size(text: str) -> tuple[int, int]:
    """'384x512' (H x W) -> (384, 512)."""
    h, sep, w = text.lower().partition('x')
    try:
        size = (int(h), int(w))
    except ValueError:
        size = None
    if not sep or size is None or min(size) <= 0:
        raise ValueError(f'image size {text!r} must be HEIGHTxWIDTH, e.g. 384x512')
    return size


def warm_up(backend, runs: int = 1) -> float:
    """Run `runs` encode + self-pair decode on a grey frame at the network input size, so that
    the first real frame does not pay for lazy initialisation (allocator, kernels, engine
    contexts). Returns the last run's time in milliseconds."""
    import time

    H, W = backend.input_size
    frame = CameraFrame(stamp_ns=0, frame_id='warm_up', image=np.full((H, W, 3), 128, np.uint8))
    ms = 0.0
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        tokens = backend.encode(frame)
        backend.decode(tokens, tokens)
        ms = 1e3 * (time.perf_counter() - t)
    return ms


GraphRun = Callable[[dict[str, Any]], dict[str, Any]]  # feeds by input name -> outputs by name


class SplitDecoder:
    """Heads on demand on split graphs (export format 2), whatever runs them (ONNX Runtime
    sessions, TensorRT engines): the geometry graph once per ordered pair, each view's feature
    graph at most once, asking again for the pair just decoded (view 1's features of a tracked
    frame that became a keyframe) runs only what is missing. Pairs are told apart by the
    identity of their token arrays (a FrameTokens keeps its array)."""

    def __init__(self, geometry: GraphRun, features: Mapping[int, tuple[GraphRun, Sequence[str]]]
                 ) -> None:
        self._geometry = geometry
        self._features = dict(features)  # view -> (run, its input names)
        self._last: tuple[Any, Any, dict[str, Any]] | None = None

    def decode(self, tokens1: Any, tokens2: Any, request: DecodeRequest) -> dict[str, Any]:
        last = self._last
        if last is None or last[0] is not tokens1 or last[1] is not tokens2:
            self._last = None  # free the previous pair's layers first
            outputs = dict(self._geometry(dict(zip(DECODER_INPUTS, (tokens1, tokens2)))))
            last = self._last = (tokens1, tokens2, outputs)
        outputs = last[2]
        for view, (run, inputs) in self._features.items():
            done = any(OUTPUT_FIELDS.get(n) == (view, f) for n in outputs
                       for f in FEATURE_FIELDS)
            if request.wants_features(view) and not done:
                outputs.update(run({n: outputs[n] for n in inputs}))
        return {n: a for n, a in outputs.items() if n in OUTPUT_FIELDS}

    def forget(self) -> None:
        """Drop the last pair's outputs and token layers."""
        self._last = None


class ArrayGraphBackend:
    """encode/decode/warm_up/close shared by every built-in backend (torch, ONNX Runtime,
    TensorRT): a subclass sets name, device, input_size, clip_dim, has a from_config class
    method and provides encode_array((1, 3, H, W) float32 numpy image) -> tokens (any type;
    torch keeps them on its device) and decode_arrays(tokens1, tokens2) -> numpy outputs by
    official name."""

    name: str
    device: str
    input_size: tuple[int, int]
    text_encoder = None  # the text tower is model.text_encoder's (load_model)

    def encode_array(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode_arrays(self, tokens1: np.ndarray, tokens2: np.ndarray,
                      request: DecodeRequest = FULL_DECODE) -> dict[str, np.ndarray]:
        """Outputs by official name: at least those ``request`` asks for (extra feature outputs
        are dropped by :meth:`decode`)."""
        raise NotImplementedError

    def warm_up(self) -> float:
        """One encode + decode on a grey frame (see warm_up); returns milliseconds."""
        return warm_up(self)

    def close(self) -> None:
        """Nothing beyond Python references to free here (TensorRT frees its GPU buffers)."""

    def encode(self, frame: CameraFrame) -> FrameTokens:
        from ros2_sab3r.model.preprocess import u8_to_array

        x = u8_to_array(frame_pixels(frame, self.input_size))  # (1, 3, H, W)
        return FrameTokens(self.encode_array(x), self.input_size, frame.stamp_ns, id(self))

    def decode(self, a: FrameTokens, b: FrameTokens,
               request: DecodeRequest = FULL_DECODE) -> PairPrediction:
        """The ordered pair (a, b): geometry of both views, feature heads of the views
        ``request`` names (the others' S_clip/S_dino None)."""
        import time

        check_pair(self, a, b)
        check_request(request)
        t = time.perf_counter()
        named = self.decode_arrays(a.tokens, b.tokens, request)
        named = {k: named[k] for k in requested_outputs(list(named), request)}
        return pair_from_named(named, self.input_size, {
            'backend': self.name, 'decode_ms': 1e3 * (time.perf_counter() - t)})
