"""TensorRT backend: engines built from the exported ONNX graphs, executed with pycuda.

Per engine: one page-locked host buffer and one device buffer per I/O tensor, allocated once for
the static shapes, tensor addresses bound once, and one CUDA stream; a call is an async
host-to-device copy of the inputs, ``execute_async_v3``, async device-to-host copies of the
outputs and one synchronisation. Encoder tokens stay on the host between encode and decode (3 MB
for ViT-L at 512x384: a copy costs a fraction of a millisecond and keeps the window's tokens out
of GPU memory management across threads).

pycuda works in the device's primary context (shared with TensorRT's runtime and with torch);
it is pushed around every call because the pipeline worker thread differs from the thread that
loaded the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
import threading

import numpy as np

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.common import ArrayGraphBackend, SplitDecoder
from ros2_sab3r.inference.manifest import ExportError, ExportManifest, GraphPair, read_manifest
from ros2_sab3r.inference.trt_engine import (
    ensure_engines,
    ensure_split_engines,
    import_tensorrt,
)
from ros2_sab3r.model.outputs import DECODER_INPUTS, ENCODER_INPUT, ENCODER_OUTPUT
from ros2_sab3r.types import FULL_DECODE, DecodeRequest

log = logging.getLogger(__name__)


class EngineRunner:
    """One deserialised engine with static page-locked/device buffers and one stream."""

    def __init__(self, trt, cuda, runtime, path: Path) -> None:
        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(
                f'TensorRT cannot load {path.name} (built by another TensorRT or GPU?); delete '
                'it and run sab3r-build-engine again')
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self._cuda = cuda
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, object] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailable(f'{path.name}: tensor {name} has a dynamic shape '
                                         f'{shape}; re-export with static sizes')
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.host[name] = cuda.pagelocked_empty(shape, dtype)
            self.device[name] = cuda.mem_alloc(max(self.host[name].nbytes, 1))
            self.context.set_tensor_address(name, int(self.device[name]))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.host[name].shape

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        for name in self.inputs:
            value = feeds[name]
            if value.shape != self.host[name].shape:
                raise ValueError(f'{self.path.name}: input {name} is {value.shape}, the engine '
                                 f'takes {self.host[name].shape}')
            np.copyto(self.host[name], value, casting='same_kind')
            cuda.memcpy_htod_async(self.device[name], self.host[name], self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError(f'TensorRT failed to run {self.path.name}')
        for name in self.outputs:
            cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
        self.stream.synchronize()
        return {name: self.host[name].copy() for name in self.outputs}

    def free(self) -> None:
        for buf in self.device.values():
            buf.free()
        self.device.clear()


class TensorRTBackend(ArrayGraphBackend):
    """Backend protocol on TensorRT engines of an sab3r-export directory."""

    def __init__(self, encoder_engine: Path, decoder_engine: Path, manifest: ExportManifest,
                 graph: GraphPair, precision: str, device_index: int = 0,
                 split_engines: dict[str, Path] | None = None) -> None:
        """``split_engines`` (:func:`ensure_split_engines`): heads on demand on the split
        decoder; without them every request runs the full decoder engine."""
        trt, cuda = import_tensorrt()
        cuda.init()
        self._ctx = cuda.Device(device_index).retain_primary_context()
        self._lock = threading.Lock()  # one stream per engine: one call at a time
        self.manifest = manifest
        self.input_size = tuple(graph.image_size)
        self.device = f'cuda:{device_index}'
        self.name = f'tensorrt {manifest.config_name} {precision}'
        self._ctx.push()
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._encoder = EngineRunner(trt, cuda, runtime, Path(encoder_engine))
            self._decoder = EngineRunner(trt, cuda, runtime, Path(decoder_engine))
            self._split = {k: EngineRunner(trt, cuda, runtime, Path(p))
                           for k, p in (split_engines or {}).items()}
        finally:
            self._ctx.pop()
        self._split_decoder: SplitDecoder | None = None
        if self._split:
            geometry = self._split['geometry']
            self._split_decoder = SplitDecoder(
                lambda feeds: self._run(geometry, feeds),
                {int(v): (lambda feeds, r=r: self._run(r, feeds), r.inputs)
                 for v, r in self._split.items() if v != 'geometry'})
        expected = set(graph.output_names)
        if set(self._decoder.outputs) != expected:
            raise BackendUnavailable(
                f'{decoder_engine.name} outputs {sorted(self._decoder.outputs)} differ from the '
                f'export manifest {sorted(expected)}; delete the engine cache and rebuild')
        image_shape = self._encoder.shape(ENCODER_INPUT)
        if image_shape != (1, 3, *self.input_size):
            raise BackendUnavailable(f'{encoder_engine.name} takes {image_shape}, the manifest '
                                     f'says {(1, 3, *self.input_size)}; rebuild')
        log.info('%s: %s, %s', self.name, encoder_engine.name, decoder_engine.name)

    @classmethod
    def from_config(cls, model: ModelConfig) -> TensorRTBackend:
        if model.device != 'cuda':
            raise BackendUnavailable("model.backend 'tensorrt' needs model.device 'cuda'")
        if model.dtype == 'int8':
            raise BackendUnavailable(
                "model.dtype 'int8' is not built for TensorRT yet (it needs calibration); use "
                "'fp16' or 'bf16' on the GPU, or onnxruntime on the CPU for int8")
        try:
            manifest = read_manifest(model.checkpoint)
            graph = manifest.graph_for((model.image_height, model.image_width))
            enc, dec = ensure_engines(model.checkpoint, graph, model.dtype,
                                      model.engine_cache_dir)
            split = ensure_split_engines(model.checkpoint, graph, model.dtype,
                                         model.engine_cache_dir)
        except ExportError as exc:
            raise BackendUnavailable(f'tensorrt: {exc}') from None
        return cls(enc, dec, manifest, graph, model.dtype, split_engines=split)

    @property
    def clip_dim(self) -> int:
        return self.manifest.clip_dim

    def _run(self, runner: EngineRunner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._ctx.push()
            try:
                return runner.run(feeds)
            finally:
                self._ctx.pop()

    def encode_array(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) float32 in [-1, 1] -> (1, N, enc_dim) float32 tokens (host)."""
        return self._run(self._encoder, {ENCODER_INPUT: image})[ENCODER_OUTPUT]

    def decode_arrays(self, tokens1: np.ndarray, tokens2: np.ndarray,
                      request: DecodeRequest = FULL_DECODE) -> dict[str, np.ndarray]:
        if self._split_decoder is not None:
            return self._split_decoder.decode(tokens1, tokens2, request)
        return self._run(self._decoder, dict(zip(DECODER_INPUTS, (tokens1, tokens2))))

    def forget_pair(self) -> None:
        """Drop the last pair's geometry outputs and token layers (benchmarks)."""
        if self._split_decoder is not None:
            self._split_decoder.forget()

    def close(self) -> None:
        """Free the GPU buffers (the node's deactivate); the backend is unusable afterwards.

        Also run when the last reference goes: pycuda must free inside the context it allocated
        in, which a garbage-collecting thread does not have current."""
        if not hasattr(self, '_decoder'):
            return  # construction failed before the buffers existed
        with self._lock:
            self._ctx.push()
            try:
                self._encoder.free()
                self._decoder.free()
                for runner in getattr(self, '_split', {}).values():
                    runner.free()
                self._split_decoder = None
            finally:
                self._ctx.pop()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver may be gone
            pass
