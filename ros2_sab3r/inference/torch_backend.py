"""PyTorch backend: the network itself, on CPU or CUDA, in fp32, fp16 or bf16.

fp16/bf16 apply to the backbone (encoder and decoders); the heads and their post-processing run
in fp32 (``Sab3rNet.run_heads``), because ``expm1``/``exp`` of the depth and confidence overflow
in fp16 (on CUDA their matmuls use TF32 when the backbone is fp16/bf16). All calls run under
``torch.inference_mode``. On CUDA, ``cuda_graphs`` captures the encoder and the decoder + heads
as CUDA graphs for the static input size: one launch per stage instead of hundreds of kernels,
with static input/output buffers that are copied in and out.

Heads on demand (:class:`~ros2_sab3r.types.DecodeRequest`): the feature heads (CLIP, DINO at full
resolution, most of a decode's work) run only for the views asked for. Eagerly, the decoders run
once per ordered pair and each head at most once: asking again for the pair just decoded (view
1's features of a tracked frame that became a keyframe) runs only the heads still missing. With
CUDA graphs each request kind is its own captured graph (a second request re-runs the decoders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import logging

import numpy as np
import torch

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.common import ArrayGraphBackend, is_feature_output, pool_factor
from ros2_sab3r.model.network import BACKBONE_DTYPES, DecoderGraph, Sab3rNet
from ros2_sab3r.model.outputs import (
    GEOMETRY_FIELDS,
    VIEWS,
    EncodedImage,
    ViewTokens,
    output_name,
    output_names,
)
from ros2_sab3r.model.preprocess import check_patch_multiple
from ros2_sab3r.types import FULL_DECODE, GEOMETRY_ONLY, VIEW1_FEATURES, DecodeRequest

log = logging.getLogger(__name__)


class _CudaGraphStage:
    """A function of static-shape CUDA tensors replayed as one captured CUDA graph."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]],
                 example: tuple[torch.Tensor, ...], warmup: int = 3) -> None:
        self._inputs = tuple(t.clone() for t in example)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(warmup):
                fn(*self._inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = fn(*self._inputs)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self._inputs, args):
            static.copy_(value)
        self._graph.replay()
        # The next replay overwrites the static outputs: hand out copies.
        return tuple(t.clone() for t in self._outputs)


@dataclass
class _DecodedPair:
    """The last ordered pair decoded: its encoder tokens (by identity), the decoder's token
    lists of both views and the head outputs run so far, by official name."""

    tokens1: torch.Tensor
    tokens2: torch.Tensor
    views: tuple[ViewTokens, ViewTokens]
    outputs: dict[str, torch.Tensor]


class TorchBackend(ArrayGraphBackend):
    """Backend protocol on a :class:`Sab3rNet` (checkpoint or random weights)."""

    def __init__(self, net: Sab3rNet, input_size: tuple[int, int], device: str = 'cpu',
                 dtype: str = 'fp32', cuda_graphs: bool = False, feature_pool: int = 1) -> None:
        """feature_pool: model.feature_pool, applied to the feature heads' outputs on the
        device, before they are copied to the host (decode_arrays)."""
        if dtype == 'int8':
            raise BackendUnavailable(
                "model.dtype 'int8' is the onnxruntime backend's quantised CPU graphs "
                "(sab3r-export --int8); the torch backend runs 'fp32', 'fp16' or 'bf16'")
        if dtype not in BACKBONE_DTYPES:
            raise BackendUnavailable(
                f'model.dtype={dtype!r} is not one of {", ".join(BACKBONE_DTYPES)}')
        if device == 'cuda' and not torch.cuda.is_available():
            raise BackendUnavailable(
                "model.device is 'cuda' but torch sees no CUDA device (torch "
                f"{torch.__version__}); set model.device 'cpu' or install a CUDA build of torch")
        if cuda_graphs and device != 'cuda':
            raise BackendUnavailable("model.cuda_graphs needs model.device 'cuda'")
        p = net.cfg.patch_size
        try:
            check_patch_multiple(input_size, p, 'network input')
        except ValueError as exc:
            raise BackendUnavailable(
                f'{exc}; set model.image_height/model.image_width to multiples of {p}') from None
        self.net = net.to(device).eval()
        self.net.set_backbone_dtype(BACKBONE_DTYPES[dtype])
        if device == 'cuda' and dtype != 'fp32':
            # Asking for a reduced-precision backbone also lets the fp32 heads' matmuls use TF32
            # (fp32 range, 10-bit mantissa inputs, fp32 accumulation; cuDNN already runs fp32
            # convolutions so by default). H200, sab3r_cd 384x512, bf16 + CUDA graphs: full
            # pair 29.6 -> 23.6 ms, tracked frame 16.8 -> 12.5 ms (benchmarks/device_check.py,
            # 2026-12-04). A process-wide torch setting; model.dtype 'fp32' keeps full fp32.
            torch.set_float32_matmul_precision('high')
        # The heads are convolution stacks up to full resolution, which oneDNN (CPU) and cuDNN
        # run fastest channels-last (sab3r_cd decode on 2 CPU threads: 8.9 s -> 7.5 s). Only the
        # weights' memory layout changes, not their values or the outputs.
        for head in self.net.heads():
            head.to(memory_format=torch.channels_last)
        self.input_size = tuple(input_size)
        self.device = device
        self.dtype = dtype
        self.feature_pool = int(feature_pool)
        self.name = f'torch {net.cfg.name} {device} {dtype}' + (' cuda-graphs' if cuda_graphs
                                                                else '')
        self._encode_fn: Callable = self._encode_eager
        # CUDA graphs: one captured decoder per DecodeRequest.features (static outputs each).
        self._graphs: dict[tuple[int, ...], _CudaGraphStage] | None = None
        self._last: _DecodedPair | None = None
        if cuda_graphs:
            self._capture()

    @classmethod
    def from_config(cls, model: ModelConfig) -> TorchBackend:
        """The network of ``model.checkpoint`` (checkpoint file, directory or Hugging Face repo
        id; ``model.architecture`` names a release file's network)."""
        from ros2_sab3r.model.checkpoint import CheckpointError, load_network

        if model.cpu_threads:
            torch.set_num_threads(model.cpu_threads)
        try:
            net = load_network(model.checkpoint, config=model.architecture or None, device='cpu')
        except CheckpointError as exc:
            raise BackendUnavailable(f'model.checkpoint: {exc}') from None
        return cls(net, (model.image_height, model.image_width), model.device, model.dtype,
                   model.cuda_graphs, model.feature_pool)

    @property
    def clip_dim(self) -> int:
        head = self.net.cfg.feature_head('clip')
        return head.out_dim if head is not None else 0

    def _encode_eager(self, img: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net.encode(img).tokens,)

    def _capture(self) -> None:
        H, W = self.input_size
        with torch.inference_mode():
            img = torch.zeros(1, 3, H, W, device=self.device)
            self._encode_fn = _CudaGraphStage(self._encode_eager, (img,))
            self._example_tokens = self._encode_fn(img)[0]
            self._graphs = {}
            # the pipeline's three requests; view 2 alone is captured when first asked for
            for request in (FULL_DECODE, GEOMETRY_ONLY, VIEW1_FEATURES):
                self._graph_for(request)
        log.info('%s: encoder and decoder captured as CUDA graphs', self.name)

    def _graph_for(self, request: DecodeRequest) -> tuple[_CudaGraphStage, tuple[str, ...]]:
        assert self._graphs is not None
        if request.features not in self._graphs:
            graph = DecoderGraph(self.net, self.input_size, features=request.features)
            t = self._example_tokens
            self._graphs[request.features] = (_CudaGraphStage(graph, (t, t)),
                                               graph.output_names)
        return self._graphs[request.features]

    def _decode_eager(self, tokens1: torch.Tensor, tokens2: torch.Tensor,
                      request: DecodeRequest) -> dict[str, torch.Tensor]:
        """Runs the decoders once per ordered pair and each head at most once: a second request
        for the pair just decoded (a tracked frame that turned out to be a keyframe now wants
        view 1's features) reuses the decoder tokens and the heads already run."""
        last = self._last
        if last is None or last.tokens1 is not tokens1 or last.tokens2 is not tokens2:
            self._last = None  # free the previous pair's tokens before decoding the next
            size = self.input_size
            p = self.net.cfg.patch_size
            grid = (size[0] // p, size[1] // p)
            views = self.net.decode_tokens(EncodedImage(tokens1, grid, size),
                                           EncodedImage(tokens2, grid, size))
            last = self._last = _DecodedPair(tokens1, tokens2, views, {})
        heads = [h.name for h in self.net.cfg.feature_heads]
        for v, tokens in zip(VIEWS, last.views):
            if output_name('pts3d', v) not in last.outputs:
                geometry = self.net.run_geometry(tokens, v)
                last.outputs.update(zip((output_name(f, v) for f in GEOMETRY_FIELDS), geometry))
            if heads and request.wants_features(v) and output_name(heads[0], v) not in \
                    last.outputs:
                last.outputs.update((output_name(k, v), t)
                                    for k, t in self.net.run_features(tokens, v).items())
        names = output_names(heads, request.features)
        return {n: last.outputs[n] for n in names}

    def encode_tensor(self, img: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] -> (1, N, enc_dim) tokens on the device."""
        with torch.inference_mode():
            return self._encode_fn(img.to(self.device))[0]

    def decode_tensors(self, tokens1: torch.Tensor, tokens2: torch.Tensor,
                       request: DecodeRequest = FULL_DECODE) -> dict[str, torch.Tensor]:
        """Raw decoder + head outputs by official name (batch first, float32): the geometry of
        both views and the feature heads of the views ``request`` names."""
        with torch.inference_mode():
            if self._graphs is None:
                return self._decode_eager(tokens1, tokens2, request)
            graph, names = self._graph_for(request)
            return dict(zip(names, graph(tokens1, tokens2)))

    def encode_array(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] -> tokens kept on the device (FrameTokens.tokens)."""
        return self.encode_tensor(torch.from_numpy(image))

    def decode_arrays(self, tokens1: torch.Tensor, tokens2: torch.Tensor,
                      request: DecodeRequest = FULL_DECODE) -> dict[str, np.ndarray]:
        """Outputs by official name on the host, float32; feature maps pooled by
        ``feature_pool`` first (on a GPU, n^2 fewer bytes cross to the host: 512-d CLIP at
        384x512 is 400 MB a view)."""
        out = {}
        for k, v in self.decode_tensors(tokens1, tokens2, request).items():
            v = v.detach()
            if self.feature_pool > 1 and is_feature_output(k):  # (1, h, w, F)
                r = pool_factor(tuple(v.shape[1:3]), self.input_size, self.feature_pool)
                if r > 1:
                    v = torch.nn.functional.avg_pool2d(v.permute(0, 3, 1, 2), r).permute(
                        0, 2, 3, 1)
            out[k] = v.to('cpu', torch.float32).contiguous().numpy()
        return out

    def forget_pair(self) -> None:
        """Drop the last pair's decoder tokens and head outputs: the next decode runs the
        decoders even for the same pair (benchmarks timing repeated decodes)."""
        self._last = None

    def close(self) -> None:
        """Drop the last pair's decoder tokens (the network itself goes with the backend)."""
        self.forget_pair()
