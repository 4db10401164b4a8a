"""The prepared check for a lent GPU: network stages and the pipeline, one command, JSON out.

    python benchmarks/device_check.py                    # on the GPU machine (under 8 minutes)
    python benchmarks/device_check.py --smoke            # here on the CPU: tiny model, seconds

What it measures, with the release architecture (``sab3r_cd``: 769.7 M parameters) and random
weights (the timings do not depend on the values), for each backbone dtype (fp16, bf16) with CUDA
graphs off and on:

- ``encode``: one image through the encoder;
- ``decode_geometry``: both decoders and the geometry heads of both views (pointmaps,
  confidences, descriptors): what a tracked frame needs;
- ``feature_heads_view``: the CLIP and DINO heads of one view on already decoded tokens: what a
  new keyframe adds for its own view;
- ``decode_full``: decoders and every head of both views (what every decode runs today);
- ``tracked_frame``: encode + decode_geometry (the target of issue #16: at most 8 ms);
- ``full_pair``: both images encoded as one batch + decode_full (target: at most 15 ms);

each as the median of CUDA-event timings after warm-up, with the peak memory allocated; then the
pipeline's frames per second on a rendered synthetic sequence through the torch backend, in posed
and unposed mode (with random weights registration often fails: the status counts say how many
frames were skipped, and those frames cost less, so the rate is an upper bound of the real one),
once per ``--feature-pools`` value (model.feature_pool), with where one decode's time goes: the
network on the device, the copy to the host, the wrap into a PairPrediction.
``--sections network`` or ``pipeline`` and ``--modes posed`` cut a run short.

It needs only torch and numpy (and scipy/pillow for the pipeline part): no ROS, no open_clip, no
network. What is missing is reported as skipped with the reason and the rest still runs. A
deadline (``--deadline-s``) stops starting new measurements so the run ends in time. The JSON goes
to ``--out`` (default ``$OUT/device_check.json`` when ``OUT`` is set, else ``device_check.json``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
import json
import os
from pathlib import Path
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ros2_sab3r.model.network import BACKBONE_DTYPES, Sab3rNet, create_network  # noqa: E402

TARGETS_MS = {'full_pair': 15.0, 'tracked_frame': 8.0}  # bf16 with CUDA graphs, H100/H200


class Clock:
    """Median wall time of a stage in ms: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, warmup: int, repeat: int) -> None:
        self.cuda = device == 'cuda'
        self.warmup, self.repeat = warmup, repeat

    def median_ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` (no arguments, static tensors) captured once as a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture wants a warmed-up side stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def stage_functions(net: Sab3rNet, size: tuple[int, int], device: str
                    ) -> dict[str, Callable[[], object]]:
    """The measured stages as argument-free functions of static inputs (graph-capturable)."""
    H, W = size
    gen = torch.Generator(device=device).manual_seed(0)
    img1 = torch.rand(1, 3, H, W, device=device, generator=gen) * 2 - 1
    img2 = torch.rand(1, 3, H, W, device=device, generator=gen) * 2 - 1
    both = torch.cat([img1, img2])
    a, b = net.encode(img1), net.encode(img2)
    t1, _ = net.decode_tokens(a, b)
    layers1 = tuple(t.float() for t in t1.layers)
    head1, head2 = net.heads()
    names = [fh.name for fh in net.cfg.feature_heads]

    def decode_geometry():
        u1, u2 = net.decode_tokens(a, b)
        return (head1.geometry(tuple(t.float() for t in u1.layers), u1.grid),
                head2.geometry(tuple(t.float() for t in u2.layers), u2.grid))

    def feature_heads_view():
        return [head1.feature(n, layers1, t1.grid) for n in names]

    def tracked_frame():
        net.encode(img2)
        return decode_geometry()

    def full_pair():
        e = net.encode(both)
        ea = type(e)(e.tokens[:1], e.grid, e.image_size)
        eb = type(e)(e.tokens[1:], e.grid, e.image_size)
        return net.decode(ea, eb)

    return {'encode': lambda: net.encode(img1), 'decode_geometry': decode_geometry,
            'feature_heads_view': feature_heads_view, 'decode_full': lambda: net.decode(a, b),
            'tracked_frame': tracked_frame, 'full_pair': full_pair}


VARIANTS = {  # what each changes against the backend's settings (measured, not used by it)
    'cudnn_benchmark': 'torch.backends.cudnn.benchmark = True (convolution autotuning)',
    'no_tf32': "full fp32 matmuls in the heads (the backend's rows use TF32 with fp16/bf16)",
    'heads_bf16': 'the fp32 heads run under torch.autocast(bfloat16) (precision not checked)',
}


def measure_network(net: Sab3rNet, size, device: str, dtype: str, graphs: bool, clock: Clock,
                    variant: str = '') -> dict:
    net.set_backbone_dtype(BACKBONE_DTYPES[dtype])
    row: dict = {'dtype': dtype, 'cuda_graphs': graphs, 'ms': {}, 'peak_mib': {}}
    if variant:
        row['variant'] = variant
    torch.backends.cudnn.benchmark = variant == 'cudnn_benchmark'
    # as TorchBackend does: TF32 for the fp32 heads' matmuls when the backbone is fp16/bf16
    tf32 = device == 'cuda' and dtype != 'fp32' and variant != 'no_tf32'
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    with torch.inference_mode():
        for name, fn in stage_functions(net, size, device).items():
            if variant == 'heads_bf16':
                fn = _autocast(fn)
            if device == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            run = captured(fn) if graphs else fn
            row['ms'][name] = round(clock.median_ms(run), 3)
            if device == 'cuda':
                row['peak_mib'][name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            del run
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision('highest')
    return row


def _autocast(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            return fn()
    return run


def _median_stages(results) -> dict[str, dict[str, float]]:
    """Per status, the median ms of each stage that ran (where a frame's time goes)."""
    by_status: dict[str, dict[str, list[float]]] = {}
    for r in results:
        stages = by_status.setdefault(str(getattr(r.status, 'value', r.status)), {})
        for name, ms in r.latency.ran().items():
            stages.setdefault(name, []).append(ms)
    return {status: {k: round(statistics.median(v), 2) for k, v in stages.items()}
            for status, stages in by_status.items()}


def measure_decode_breakdown(backend, size, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Where a decode's time goes, per request the pipeline makes (median ms): the network on
    the device (decode_tensors, synchronised), the copy to the host (decode_arrays minus that,
    feature pooling included) and the wrap into a PairPrediction (decode minus decode_arrays)."""
    import numpy as np

    from ros2_sab3r.types import GEOMETRY_ONLY, VIEW1_FEATURES, CameraFrame

    rng = np.random.default_rng(0)
    frames = [CameraFrame(stamp_ns=i, frame_id='cam',
                          image=rng.integers(0, 255, (*size, 3), dtype=np.uint8))
              for i in range(2)]
    a, b = (backend.encode(f) for f in frames)
    cuda = backend.device == 'cuda'

    def timed(fn, *args) -> float:
        backend.forget_pair()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t)

    out = {}
    for name, request in (('geometry_only', GEOMETRY_ONLY), ('view1_features', VIEW1_FEATURES)):
        runs = {'device': [], 'to_host': [], 'decode': []}
        for _ in range(repeat + 1):  # the first is a warm-up
            runs['device'].append(timed(backend.decode_tensors, a.tokens, b.tokens, request))
            runs['to_host'].append(timed(backend.decode_arrays, a.tokens, b.tokens, request))
            runs['decode'].append(timed(backend.decode, a, b, request))
        med = {k: statistics.median(v[1:]) for k, v in runs.items()}
        out[name] = {'device': round(med['device'], 2),
                     'to_host': round(med['to_host'] - med['device'], 2),
                     'wrap': round(med['decode'] - med['to_host'], 2),
                     'decode': round(med['decode'], 2)}
    return out


def measure_pipeline(net: Sab3rNet, size, device: str, dtype: str, graphs: bool, frames: int,
                     modes: tuple[str, ...] = ('posed', 'unposed'), feature_pool: int = 1
                     ) -> dict:
    """Frames per second of Pipeline.step over a rendered synthetic sequence, posed and unposed,
    with model.feature_pool; and where a decode's time goes."""
    from ros2_sab3r.config import config_from_flat
    from ros2_sab3r.inference.torch_backend import TorchBackend
    from ros2_sab3r.pipeline import Pipeline
    from ros2_sab3r.sim.standin import HashTextEncoderStandIn
    from ros2_sab3r.sim.synthetic import make_scene

    H, W = size
    clip = net.cfg.feature_head('clip')
    text = HashTextEncoderStandIn(clip.out_dim if clip is not None else 512)
    sequence = make_scene(seed=0).sequence(frames, W, H)
    backend = TorchBackend(net, size, device=device, dtype=dtype, cuda_graphs=graphs,
                           feature_pool=feature_pool)
    out = {'feature_pool': feature_pool,
           'decode_breakdown_ms': measure_decode_breakdown(backend, size)}
    for mode in modes:
        posed = mode == 'posed'
        flat = {'frames.pose_source': 'tf' if posed else 'none', 'model.image_height': H,
                'model.image_width': W, 'model.feature_pool': feature_pool}
        pipeline = Pipeline(config_from_flat(flat), backend, text)
        camera_frames = [f.camera_frame(posed=posed) for f in sequence]
        pipeline.step(camera_frames[0])  # warm-up outside the timing
        pipeline.reset()
        t = time.perf_counter()
        results = [pipeline.step(f) for f in camera_frames]
        if device == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        out[mode] = {
            'fps': round(len(results) / seconds, 2), 'frames': len(results),
            'statuses': dict(Counter(str(getattr(r.status, 'value', r.status))
                                     for r in results)),
            'voxels': results[-1].voxels,
            'median_ms_by_stage': _median_stages(results)}
    return out


def _failure(exc: BaseException) -> str:
    """An exception as one line with where it was raised: the report says why, not only that."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = ' <- '.join(f'{Path(f.filename).name}:{f.lineno} {f.name}' for f in reversed(frames))
    return f'{type(exc).__name__}: {exc} [{where}]'


def _save(report: dict, path: Path) -> None:
    """Written after every section, so a run stopped by its time limit still reports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + '\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smoke', action='store_true',
                        help='tiny_cd at 48x64 (HxW) on the CPU, fp32: checks the script')
    parser.add_argument('--architecture', default=None, help='default: sab3r_cd (tiny_cd with '
                        '--smoke)')
    parser.add_argument('--size', default=None, help='HxW of the network input (default 384x512)')
    parser.add_argument('--frames', type=int, default=None, help='pipeline frames per mode')
    parser.add_argument('--repeat', type=int, default=None, help='timed runs per stage')
    parser.add_argument('--deadline-s', type=float, default=420.0,
                        help='start no new measurement after this many seconds')
    parser.add_argument('--out', type=Path, default=None)
    parser.add_argument('--dtypes', default='fp16,bf16', help='backbone dtypes on the GPU')
    parser.add_argument('--sections', default='network,pipeline',
                        help='what to measure: network, pipeline (comma-separated)')
    parser.add_argument('--modes', default='posed,unposed', help='pipeline modes')
    parser.add_argument('--feature-pools', default='1',
                        help='model.feature_pool values the pipeline runs with, e.g. 1,2')
    parser.add_argument('--variants', action='store_true',
                        help='also bf16 + graphs with: ' + '; '.join(VARIANTS.values()))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    sections = set(args.sections.split(','))
    modes = tuple(args.modes.split(','))
    pools = [int(v) for v in args.feature_pools.split(',')]
    device = 'cuda' if torch.cuda.is_available() and not args.smoke else 'cpu'
    arch = args.architecture or ('tiny_cd' if args.smoke else 'sab3r_cd')
    size = tuple(int(v) for v in (args.size or ('48x64' if args.smoke else '384x512')).split('x'))
    frames = args.frames or (6 if args.smoke else 60)
    repeat = args.repeat or (3 if args.smoke else 20)
    out_path = args.out or Path(os.environ.get('OUT', '.')) / 'device_check.json'
    report: dict = {
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'architecture': arch, 'size_hw': size,
        'torch': torch.__version__, 'python': platform.python_version(), 'device': device,
        'gpu': torch.cuda.get_device_name(0) if device == 'cuda' else None,
        'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
        'load_average': os.getloadavg(), 'targets_ms': TARGETS_MS, 'network': [],
        'pipeline': {}, 'skipped': []}
    if device == 'cpu' and not args.smoke:
        report['skipped'].append('no CUDA device: run with --smoke for the CPU check')
        dtypes, graph_settings = ['fp32'], [False]
    elif device == 'cpu':
        dtypes, graph_settings = ['fp32'], [False]
        report['skipped'].append('CUDA graphs and fp16/bf16: CPU smoke run')
    else:
        dtypes, graph_settings = args.dtypes.split(','), [False, True]

    torch.manual_seed(0)
    net = create_network(arch, device).eval()
    for head in net.heads():  # as the torch backend runs them
        head.to(memory_format=torch.channels_last)
    report['parameters'] = sum(p.numel() for p in net.parameters())
    clock = Clock(device, warmup=2 if args.smoke else 5, repeat=repeat)
    for dtype in dtypes if 'network' in sections else ():
        for graphs in graph_settings:
            if time.perf_counter() - started > args.deadline_s:
                report['skipped'].append(f'network {dtype} graphs={graphs}: deadline')
                continue
            try:
                row = measure_network(net, size, device, dtype, graphs, clock)
            except Exception as exc:  # noqa: BLE001 - reported; the other settings still run
                report['skipped'].append(f'network {dtype} graphs={graphs}: {_failure(exc)}')
                _save(report, out_path)
                continue
            report['network'].append(row)
            _save(report, out_path)
            print(f"{dtype:5s} graphs={'on ' if graphs else 'off'} "
                  + '  '.join(f'{k} {v:.2f} ms' for k, v in row['ms'].items()), flush=True)
    if device == 'cuda' and args.variants and 'network' in sections:
        for variant in VARIANTS:
            if time.perf_counter() - started > args.deadline_s:
                report['skipped'].append(f'variant {variant}: deadline')
                continue
            try:
                row = measure_network(net, size, device, 'bf16', True, clock, variant)
            except Exception as exc:  # noqa: BLE001 - reported; the rest still runs
                report['skipped'].append(f'variant {variant}: {_failure(exc)}')
                continue
            report['network'].append(row)
            _save(report, out_path)
            print(f'bf16  graphs=on  {variant}: '
                  + '  '.join(f'{k} {v:.2f} ms' for k, v in row['ms'].items()), flush=True)
    pipeline_dtype = 'bf16' if device == 'cuda' else 'fp32'
    report['pipeline'] = {'dtype': pipeline_dtype, 'cuda_graphs': device == 'cuda', 'runs': []}
    for pool in pools if 'pipeline' in sections else ():
        if time.perf_counter() - started > args.deadline_s:
            report['skipped'].append(f'pipeline feature_pool {pool}: deadline')
            continue
        try:
            run = measure_pipeline(net, size, device, pipeline_dtype, device == 'cuda', frames,
                                   modes, pool)
        except ImportError as exc:  # scipy/pillow missing on the machine
            report['skipped'].append(f'pipeline: {exc}')
            break
        except Exception as exc:  # noqa: BLE001 - reported with its traceback's last frames
            report['skipped'].append(f'pipeline feature_pool {pool}: {_failure(exc)}')
            continue
        report['pipeline']['runs'].append(run)
        _save(report, out_path)
        print('pipeline', json.dumps(run), flush=True)
    best = {k: min((r['ms'][k] for r in report['network']), default=None) for k in TARGETS_MS}
    for k, target in TARGETS_MS.items():
        print(f'{k}: best {best[k]} ms (target <= {target} ms on an H100/H200, bf16 + graphs)')
    report['seconds'] = round(time.perf_counter() - started, 1)
    _save(report, out_path)
    print(f'wrote {out_path} after {report["seconds"]} s; load average {os.getloadavg()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
