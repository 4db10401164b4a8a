"""``sab3r-build-engine``: TensorRT engines from the graphs of an ``sab3r-export`` directory.

One engine per ONNX file (encoder; decoder + heads) and image size. Precision:

- ``fp32``: as exported;
- ``fp16``: the backbone in fp16, with every normalisation (LayerNorm), softmax, reduction,
  power/exp and every layer of the heads pinned to fp32: fp16
  LayerNorm statistics of ViT-L activations overflow, and the heads' ``exp``/``expm1``
  post-processing overflows fp16 for depths and confidences that fp32 holds
  (``PREFER_PRECISION_CONSTRAINTS``: TensorRT warns where it cannot honour a pin);
- ``bf16``: the backbone in bf16 (fp32 range, so no pinning needed; TensorRT >= 9, Ampere+).
  INT8 is left for later (it needs a calibration set).

Engines are cached under a key of GPU name and compute capability, TensorRT version, ONNX file
hash and precision, so a changed export, GPU or TensorRT rebuilds and an unchanged one loads in
seconds. A timing cache per GPU and TensorRT version speeds up rebuilds.

tensorrt and pycuda are imported only here and in the TensorRT backend (``pip install
'ros2_sab3r[tensorrt]'``); without them every entry point raises :class:`BackendUnavailable`
with that advice.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import hashlib
import json
import logging
from pathlib import Path
import re
import sys
import threading
import time

from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.common import parse_size
from ros2_sab3r.inference.manifest import ExportError, GraphPair, read_manifest, verify_files

log = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'fp16', 'bf16')
DEFAULT_WORKSPACE_GIB = 8.0
# Layers of the heads (module names in the ONNX node names) stay fp32 under fp16.
FP32_NAME_PARTS = ('downstream_head', 'clip_head', 'dino_head')


def import_tensorrt():
    """(tensorrt, pycuda.driver), or BackendUnavailable with the install advice."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f'the tensorrt backend needs the tensorrt and pycuda packages ({exc}); install them '
            "with pip install 'ros2_sab3r[tensorrt]' (NVIDIA driver and CUDA required), or set "
            "model.backend to 'onnxruntime' or 'torch'") from None
    major = int(trt.__version__.split('.')[0])
    if major < 10:
        raise BackendUnavailable(
            f'TensorRT {trt.__version__} is too old: the tensorrt backend uses the TensorRT 10 '
            'API (named I/O tensors, execute_async_v3); pip install "tensorrt>=10"')
    return trt, cuda


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]

    @property
    def slug(self) -> str:
        return re.sub(r'[^A-Za-z0-9]+', '-', self.name).strip('-').lower()


def gpu_info(cuda, index: int = 0) -> GpuInfo:
    cuda.init()
    if index >= cuda.Device.count():
        raise BackendUnavailable(f'CUDA device {index} does not exist ({cuda.Device.count()} '
                                 'found); check the driver and CUDA_VISIBLE_DEVICES')
    dev = cuda.Device(index)
    return GpuInfo(index, dev.name(), tuple(dev.compute_capability()))


def engine_key(gpu: GpuInfo, trt_version: str, onnx_sha256: str, precision: str,
               workspace_gib: float) -> str:
    """Hex key of an engine: anything that changes the built engine is in it."""
    text = json.dumps({'gpu': gpu.name, 'cc': list(gpu.compute_capability),
                       'tensorrt': trt_version, 'onnx': onnx_sha256, 'precision': precision,
                       'workspace_gib': workspace_gib}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def engine_path(cache_dir: Path, onnx_name: str, key: str, precision: str) -> Path:
    return cache_dir / f'{Path(onnx_name).stem}_{precision}_{key}.engine'


def _progress_monitor(trt):
    """A TensorRT progress monitor logging phases (TensorRT calls it from its threads)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._steps[phase_name] = num_steps
                if parent_phase is None:
                    log.info('TensorRT: %s (%d steps)', phase_name, num_steps)

        def step_complete(self, phase_name, step):
            with self._lock:
                now = time.monotonic()
                if now - self._last > 5.0:  # at most one line every 5 s
                    self._last = now
                    log.info('TensorRT: %s %d/%d', phase_name, step + 1,
                             self._steps.get(phase_name, 0))
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                self._steps.pop(phase_name, None)

    return _Monitor()


def _pin_fp32(trt, network) -> int:
    """Keep numerically fragile layers and the heads in fp32; returns how many were pinned."""
    fragile = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    pow_like = {trt.ElementWiseOperation.POW}
    exp_like = {trt.UnaryOperation.EXP, trt.UnaryOperation.SQRT, trt.UnaryOperation.LOG}
    floats = {trt.float32, trt.float16, trt.bfloat16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        keep = (layer.type in fragile or any(p in layer.name for p in FP32_NAME_PARTS)
                or (layer.type == trt.LayerType.ELEMENTWISE and _op(trt, layer) in pow_like)
                or (layer.type == trt.LayerType.UNARY and _op(trt, layer) in exp_like))
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not keep or not outputs or any(o.dtype not in floats for o in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _op(trt, layer):
    # network.get_layer returns ILayer; the op lives on the concrete class (Polygraphy's idiom).
    if layer.type == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
    elif layer.type == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
    return layer.op


def build_engine(onnx_path: Path, out_path: Path, precision: str, timing_cache: Path,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB) -> Path:
    """Parse ``onnx_path``, build, serialise to ``out_path`` (atomically); update the cache."""
    trt, _ = import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is not one of {", ".join(PRECISIONS)}')
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight data next to the file (> 2 GB graphs).
    if not parser.parse_from_file(str(onnx_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f'TensorRT cannot parse {onnx_path.name}: {errors}')
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == 'fp16':
        if not builder.platform_has_fast_fp16:
            log.warning('this GPU has no fast fp16; the fp16 engine may be slow')
        config.set_flag(trt.BuilderFlag.FP16)
        # PREFER, not OBEY: a pinned layer without an fp32 kernel falls back with a warning
        # instead of failing the whole build.
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info('%s: %d layers pinned to fp32 (norms, softmax, reductions, exp, heads)',
                 onnx_path.name, _pin_fp32(trt, network))
    elif precision == 'bf16':
        config.set_flag(trt.BuilderFlag.BF16)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b''
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = _progress_monitor(trt)
    log.info('building %s (%s); this takes minutes on a large model', out_path.name, precision)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f'TensorRT failed to build {onnx_path.name} ({precision}); see the '
                          'TensorRT log above (workspace too small? --workspace-gib)')
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix('.tmp')
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info('built %s in %.0f s', out_path.name, time.perf_counter() - t)
    return out_path


def ensure_engines(export_dir: str | Path, graph: GraphPair, precision: str,
                   cache_dir: str | Path = '', device_index: int = 0,
                   workspace_gib: float = DEFAULT_WORKSPACE_GIB, verify: bool = True
                   ) -> tuple[Path, Path]:
    """(encoder engine, decoder engine) for ``graph``: from the cache, else built now."""
    enc, dec = _ensure(export_dir, graph, [(graph.encoder, graph.encoder_sha256),
                                           (graph.decoder, graph.decoder_sha256)],
                       precision, cache_dir, device_index, workspace_gib, verify)
    return enc, dec


def ensure_split_engines(export_dir: str | Path, graph: GraphPair, precision: str,
                         cache_dir: str | Path = '', device_index: int = 0,
                         workspace_gib: float = DEFAULT_WORKSPACE_GIB
                         ) -> dict[str, Path] | None:
    """Engines of the split decoder (export format 2; heads on demand): {'geometry': engine,
    '1': view 1's feature engine, '2': ...}; None when the export has no split graphs."""
    if graph.split is None:
        return None
    keys = ['geometry', *sorted(graph.split.features)]
    paths = _ensure(export_dir, graph, graph.split.files(), precision, cache_dir, device_index,
                    workspace_gib, verify=False)  # ensure_engines verified every file
    return dict(zip(keys, paths))


def _ensure(export_dir: str | Path, graph: GraphPair, files: list[tuple[str, str]],
            precision: str, cache_dir: str | Path, device_index: int, workspace_gib: float,
            verify: bool) -> list[Path]:
    trt, cuda = import_tensorrt()
    export_dir = Path(export_dir).expanduser()
    if verify:
        verify_files(export_dir, graph)
    gpu = gpu_info(cuda, device_index)
    cache = Path(cache_dir).expanduser() if cache_dir else export_dir / 'engines'
    cache.mkdir(parents=True, exist_ok=True)
    timing = cache / f'timing_{gpu.slug}_trt{trt.__version__}.cache'
    out = []
    for onnx_name, digest in files:
        key = engine_key(gpu, trt.__version__, digest, precision, workspace_gib)
        path = engine_path(cache, onnx_name, key, precision)
        if path.is_file():
            log.info('engine cache hit: %s', path.name)
        else:
            build_engine(export_dir / onnx_name, path, precision, timing, workspace_gib)
            path.with_suffix('.json').write_text(json.dumps({
                'onnx': onnx_name, 'onnx_sha256': digest, 'gpu': gpu.name,
                'compute_capability': list(gpu.compute_capability),
                'tensorrt': trt.__version__, 'precision': precision,
                'workspace_gib': workspace_gib}, indent=2) + '\n', encoding='utf-8')
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='sab3r-build-engine',
        description='Build (or find in the cache) TensorRT engines for an sab3r-export '
                    'directory: one for the encoder, one for the decoder + heads, and for a '
                    'format-2 export the split decoder (geometry; feature heads per view), '
                    'per size.')
    parser.add_argument('export_dir', help='directory written by sab3r-export')
    parser.add_argument('--size', action='append', metavar='HxW',
                        help='image size to build (repeatable; default: every exported size)')
    parser.add_argument('--precision', default='fp16', choices=PRECISIONS)
    parser.add_argument('--cache-dir', default='',
                        help='engine and timing cache directory (default: <export_dir>/engines)')
    parser.add_argument('--device', type=int, default=0, help='CUDA device index')
    parser.add_argument('--workspace-gib', type=float, default=DEFAULT_WORKSPACE_GIB)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        manifest = read_manifest(args.export_dir)
        sizes = [parse_size(s) for s in args.size] if args.size else manifest.image_sizes
        for size in sizes:
            enc, dec = ensure_engines(args.export_dir, manifest.graph_for(size), args.precision,
                                      args.cache_dir, args.device, args.workspace_gib)
            print(f'{size[0]}x{size[1]} {args.precision}: {enc}\n{" " * 12}{dec}')
            split = ensure_split_engines(args.export_dir, manifest.graph_for(size),
                                         args.precision, args.cache_dir, args.device,
                                         args.workspace_gib)
            for path in (split or {}).values():
                print(f'{" " * 12}{path}')
    except (BackendUnavailable, ExportError, ValueError) as exc:
        print(f'sab3r-build-engine: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
