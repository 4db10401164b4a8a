"""ONNX Runtime backend: the exported graphs on CPU (the best CPU path) or CUDA / TensorRT EPs.

No torch at run time: preprocessing is PIL + numpy, outputs come back as numpy.

ONNX Runtime's rotary-embedding fusion assumes 1D positions; applied to our 2D RoPE (rows on the
first half of each head, columns on the second) it would compute the wrong rotation. The core
session optimisers of current releases do not include it, but the fusions named in
:data:`DISABLED_OPTIMIZERS` are switched off whatever the release, and the export parity check runs
with exactly these session options (:func:`ort_session`, so a fusion that corrupts outputs fails
the export).

``model.dtype: int8`` loads the export's dynamically quantised pair (``sab3r-export --int8``):
every matmul with constant weights runs on int8 weights (per output channel) and uint8 activations
quantised per run, on ONNX Runtime's integer kernels (VNNI/AMX where the CPU has them);
convolutions stay fp32. Its parity with torch is checked at export against looser tolerances.

Heads on demand: with an export of manifest format 2, fp32 decodes run the split graphs (geometry
graph once per ordered pair, each view's feature graph only when asked for); format 1 exports and
the int8 pair run the full decoder graph for every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import logging
from pathlib import Path

import numpy as np

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.common import ArrayGraphBackend, SplitDecoder
from ros2_sab3r.inference.manifest import (
    ExportError,
    ExportManifest,
    GraphPair,
    SplitGraphs,
    read_manifest,
    verify_files,
)
from ros2_sab3r.model.outputs import DECODER_INPUTS, ENCODER_INPUT
from ros2_sab3r.types import FULL_DECODE, DecodeRequest

log = logging.getLogger(__name__)

DISABLED_OPTIMIZERS = ['RotaryEmbeddingFusion', 'GroupQueryAttentionFusion',
                       'GroupQueryAttentionPreNormFusion', 'AttentionFusion']


def ort_session_options(level: str = 'all', threads: int = 0):
    """Session options shared by the export check and the ONNX Runtime backend."""
    import onnxruntime as ort

    levels = {'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def ort_session(path: Path, options, providers: list):
    """An InferenceSession on ``path`` with :data:`DISABLED_OPTIMIZERS` switched off (the backend
    and the export's parity check open every graph this way)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=providers,
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def _runner(session) -> Callable[[dict], dict]:
    """feeds -> every output of the session by name."""
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


@dataclass(frozen=True)
class OrtOptions:
    device: str = 'cpu'  # 'cpu' or 'cuda'
    dtype: str = 'fp32'  # 'int8': the export's quantised CPU graphs; 'fp16'/'bf16': TensorRT EP
    threads: int = 0  # intra-op threads; 0: ONNX Runtime's default
    optimization: str = 'all'  # 'disable', 'basic', 'extended', 'all'
    trt_cache_dir: str = ''  # TensorRT EP engine/timing cache; '' : <export>/ort_trt_cache


def _providers(opts: OrtOptions, export_dir: Path) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if opts.device == 'cpu':
        if opts.dtype not in ('fp32', 'int8'):
            raise BackendUnavailable(
                f'onnxruntime on CPU runs fp32 or int8 graphs; model.dtype={opts.dtype!r} is not '
                "available there: set model.dtype to 'fp32' or 'int8' (or use the torch backend "
                'for bf16)')
        return ['CPUExecutionProvider']
    if opts.dtype == 'int8':
        raise BackendUnavailable(
            "onnxruntime int8 graphs are dynamically quantised for the CPU (their integer matmul "
            "kernels are CPU ones); set model.device 'cpu', or use fp16/bf16 on the GPU")
    providers: list = []
    if 'TensorrtExecutionProvider' in available:
        cache = Path(opts.trt_cache_dir or export_dir / 'ort_trt_cache')
        cache.mkdir(parents=True, exist_ok=True)
        providers.append(('TensorrtExecutionProvider', {
            'trt_fp16_enable': opts.dtype == 'fp16', 'trt_bf16_enable': opts.dtype == 'bf16',
            'trt_engine_cache_enable': True, 'trt_engine_cache_path': str(cache),
            'trt_timing_cache_enable': True, 'trt_timing_cache_path': str(cache)}))
    elif opts.dtype != 'fp32':
        raise BackendUnavailable(
            f'onnxruntime model.dtype={opts.dtype!r} needs the TensorRT execution provider, not '
            f'in this onnxruntime ({", ".join(available)}); install onnxruntime-gpu with '
            "TensorRT, set model.dtype 'fp32', or use model.backend 'tensorrt'")
    if 'CUDAExecutionProvider' in available:
        providers.append('CUDAExecutionProvider')
    if not providers:
        raise BackendUnavailable(
            f'onnxruntime has no CUDA execution provider here ({", ".join(available)}); install '
            "onnxruntime-gpu matching your CUDA, or set model.device 'cpu'")
    return providers + ['CPUExecutionProvider']


class OnnxRuntimeBackend(ArrayGraphBackend):
    """Backend protocol on the graphs of an sab3r-export directory."""

    def __init__(self, export_dir: str | Path, input_size: tuple[int, int],
                 options: OrtOptions = OrtOptions(), verify: bool = True) -> None:
        try:
            import onnxruntime  # noqa: F401 - here only to say what to install
        except ImportError as exc:
            raise BackendUnavailable(
                f'onnxruntime is not installed ({exc}); pip install onnxruntime (CPU) or '
                'onnxruntime-gpu') from None
        self.export_dir = Path(export_dir).expanduser()
        try:
            self.manifest: ExportManifest = read_manifest(self.export_dir)
            precision = 'int8' if options.dtype == 'int8' else 'fp32'
            self.graph: GraphPair = self.manifest.graph_for(input_size, precision)
            enc_path, dec_path = (verify_files(self.export_dir, self.graph) if verify else
                                  (self.export_dir / self.graph.encoder,
                                   self.export_dir / self.graph.decoder))
            self.split: SplitGraphs | None = self.graph.split
        except ExportError as exc:
            raise BackendUnavailable(f'onnxruntime: {exc}') from None
        self.options = options
        self.input_size = tuple(input_size)
        self.providers = _providers(options, self.export_dir)
        sess_opts = ort_session_options(options.optimization, options.threads)
        self._decoder = None
        self._split_decoder: SplitDecoder | None = None
        try:
            self._encoder = ort_session(enc_path, sess_opts, self.providers)
            if self.split is None:
                self._decoder = ort_session(dec_path, sess_opts, self.providers)
            else:
                # Heads on demand: the split graphs serve every request (the full graph is not
                # loaded), so all requests give the same numbers.
                self._features = {
                    int(v): ort_session(self.export_dir / f, sess_opts, self.providers)
                    for v, f in self.split.features.items()}
                self._split_decoder = SplitDecoder(
                    _runner(ort_session(self.export_dir / self.split.geometry, sess_opts,
                                        self.providers)),
                    {v: (_runner(sess), [i.name for i in sess.get_inputs()])
                     for v, sess in self._features.items()})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types; report the file
            raise BackendUnavailable(
                f'onnxruntime cannot load {self.export_dir} ({type(exc).__name__}: {exc}); '
                're-export with this onnxruntime') from None
        used = self._encoder.get_providers()[0]
        self.device = 'cpu' if used == 'CPUExecutionProvider' else options.device
        if options.device == 'cuda' and used == 'CPUExecutionProvider':
            raise BackendUnavailable(
                "onnxruntime fell back to the CPU although model.device is 'cuda'; check the "
                'CUDA/cuDNN libraries onnxruntime-gpu needs')
        provider = used.replace('ExecutionProvider', '')
        self.name = f'onnxruntime {self.manifest.config_name} {provider} {options.dtype}'

        self._outputs = list(self.graph.output_names)
        if self.split is None:
            log.info('%s: %s and %s at %dx%d (no split graphs: every decode runs every head; '
                     're-export with this version for heads on demand)', self.name,
                     enc_path.name, dec_path.name, *self.input_size)
        else:
            log.info('%s: %s, %s and feature graphs at %dx%d', self.name, enc_path.name,
                     self.split.geometry, *self.input_size)

    @classmethod
    def from_config(cls, model: ModelConfig) -> OnnxRuntimeBackend:
        """The graphs of the sab3r-export directory ``model.checkpoint`` for the image size."""
        opts = OrtOptions(device=model.device, dtype=model.dtype, threads=model.cpu_threads,
                          optimization=model.ort_optimization)
        return cls(model.checkpoint, (model.image_height, model.image_width), opts)

    @property
    def clip_dim(self) -> int:
        return self.manifest.clip_dim

    def encode_array(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) float32 in [-1, 1] -> (1, N, enc_dim) tokens."""
        return self._encoder.run(None, {ENCODER_INPUT: image})[0]

    def decode_arrays(self, tokens1: np.ndarray, tokens2: np.ndarray,
                      request: DecodeRequest = FULL_DECODE) -> dict[str, np.ndarray]:
        """Raw decoder outputs by official name (batch first). With split graphs: the geometry
        graph once per ordered pair and each view's feature graph at most once (a second
        request for the pair just decoded runs only what is missing); else the full graph."""
        if self._split_decoder is not None:
            return self._split_decoder.decode(tokens1, tokens2, request)
        feeds = dict(zip(DECODER_INPUTS, (tokens1, tokens2)))
        return dict(zip(self._outputs, self._decoder.run(self._outputs, feeds)))

    def forget_pair(self) -> None:
        """Drop the last pair's geometry outputs and token layers (benchmarks)."""
        if self._split_decoder is not None:
            self._split_decoder.forget()

    def close(self) -> None:
        self.forget_pair()
