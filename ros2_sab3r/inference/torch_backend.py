"""PyTorch backend: the network itself, on CPU or CUDA, in fp32, fp16 or bf16.

fp16/bf16 apply to the backbone (encoder and decoders); the heads and their post-processing run
in fp32 (``Sab3rNet.run_heads``), because ``expm1``/``exp`` of the depth and confidence overflow
in fp16. All calls run under ``torch.inference_mode``. On CUDA, ``cuda_graphs`` captures the
encoder and the decoder + heads as CUDA graphs for the static input size: one launch per stage
instead of hundreds of kernels, with static input/output buffers that are copied in and out.
"""

from __future__ import annotations

from collections.abc import Callable
import logging

import numpy as np
import torch

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.common import ArrayGraphBackend
from ros2_sab3r.model.network import BACKBONE_DTYPES, DecoderGraph, Sab3rNet
from ros2_sab3r.model.preprocess import check_patch_multiple

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


class TorchBackend(ArrayGraphBackend):
    """Backend protocol on a :class:`Sab3rNet` (checkpoint or random weights)."""

    def __init__(self, net: Sab3rNet, input_size: tuple[int, int], device: str = 'cpu',
                 dtype: str = 'fp32', cuda_graphs: bool = False) -> None:
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
        # The heads are convolution stacks up to full resolution, which oneDNN (CPU) and cuDNN
        # run fastest channels-last (sab3r_cd decode on 2 CPU threads: 8.9 s -> 7.5 s). Only the
        # weights' memory layout changes, not their values or the outputs.
        for head in self.net.heads():
            head.to(memory_format=torch.channels_last)
        self.input_size = tuple(input_size)
        self.device = device
        self.dtype = dtype
        self.name = f'torch {net.cfg.name} {device} {dtype}' + (' cuda-graphs' if cuda_graphs
                                                                else '')
        self._decoder = DecoderGraph(self.net, self.input_size)
        self._outputs = self._decoder.output_names
        self._encode_fn: Callable = self._encode_eager
        self._decode_fn: Callable = self._decoder
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
                   model.cuda_graphs)

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
            tokens = self._encode_fn(img)[0]
            self._decode_fn = _CudaGraphStage(self._decoder, (tokens, tokens))
        log.info('%s: encoder and decoder captured as CUDA graphs', self.name)

    def encode_tensor(self, img: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] -> (1, N, enc_dim) tokens on the device."""
        with torch.inference_mode():
            return self._encode_fn(img.to(self.device))[0]

    def decode_tensors(self, tokens1: torch.Tensor, tokens2: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Raw decoder + head outputs by official name (batch first, float32)."""
        with torch.inference_mode():
            return dict(zip(self._outputs, self._decode_fn(tokens1, tokens2)))

    def encode_array(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] -> tokens kept on the device (FrameTokens.tokens)."""
        return self.encode_tensor(torch.from_numpy(image))

    def decode_arrays(self, tokens1: torch.Tensor, tokens2: torch.Tensor
                      ) -> dict[str, np.ndarray]:
        return {k: v.detach().to('cpu', torch.float32).numpy()
                for k, v in self.decode_tensors(tokens1, tokens2).items()}
