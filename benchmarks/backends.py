"""Compare every available inference backend on the same network and inputs, side by side.

    python benchmarks/backends.py                    # tiny_cd at 512x384 (seconds)
    python benchmarks/backends.py --full             # the release architecture (sab3r_cd),
                                                     # random weights at 512x384 (heavy)
    python benchmarks/backends.py --full --config mast3r_vitl_512 --threads 2

Per backend: encode one image, decode + heads one pair, and a cold pair (two encodes and one
decode, what ``net(img1, img2)`` does), in ms (median); peak memory of the process running it
(each backend runs in its own process: weights and sessions included, nothing shared); speed-up
of the pair against torch fp32 on the CPU. The ONNX graphs are exported once into --export-dir and
reused while the random weights (fixed seed) are the same.

ONNX Runtime runs the fp32 graphs at each optimisation level asked for, and the dynamically
quantised int8 graphs (``sab3r-export --int8``, ``model.dtype: int8``) at opt=all; the int8 row
also prints how far its outputs are from torch fp32 (relative RMS error, worst output).

Target (issue 6): on this CPU, ONNX Runtime at least 1.4x faster than torch fp32 on the full-size
pair; the verdict is printed for fp32 and int8 separately. The machine may be shared: the load
average is printed before and after; figures taken under load are noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from pathlib import Path
import platform
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

TARGET_SPEEDUP = 1.4


def _vm_kb(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    return 0


def _images(size: tuple[int, int]):
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        low = rng.random((3, size[0] // 16, size[1] // 16)).astype(np.float32)
        img = np.kron(low, np.ones((16, 16), np.float32))  # blocky but not white noise
        out.append((img * 2 - 1)[None])  # (1, 3, H, W)
    return out


def _make_net(config: str, seed: int):
    import torch

    from ros2_sab3r.model.network import create_network

    torch.manual_seed(seed)
    return create_network(config)


def _worker(spec: dict, queue) -> None:
    """Build one backend, time it, report through ``queue`` (runs in a fresh process)."""
    try:
        queue.put(_measure(spec))
    except Exception as exc:  # noqa: BLE001 - a failing backend is a row, not a crash
        queue.put({'error': f'{type(exc).__name__}: {exc}'})


def _measure(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec['threads'])
    size = tuple(spec['size'])
    img1, img2 = _images(size)
    kind = spec['kind']
    cuda = spec.get('device') == 'cuda'
    if kind == 'torch':
        from ros2_sab3r.inference.torch_backend import TorchBackend

        be = TorchBackend(_make_net(spec['config'], spec['seed']), size, spec['device'],
                          spec['dtype'], spec.get('cuda_graphs', False))
        t1, t2 = torch.from_numpy(img1), torch.from_numpy(img2)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def encode(x):
            out = be.encode_tensor(x)
            sync()
            return out

        def decode(a, b):
            out = be.decode_tensors(a, b)
            sync()
            return out
    else:
        t1, t2 = img1, img2
        if kind == 'onnxruntime':
            from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions

            be = OnnxRuntimeBackend(spec['export_dir'], size, OrtOptions(
                device=spec['device'], dtype=spec.get('dtype', 'fp32'), threads=spec['threads'],
                optimization=spec['level']), verify=False)
        else:
            from ros2_sab3r.inference.manifest import read_manifest
            from ros2_sab3r.inference.trt_backend import TensorRTBackend
            from ros2_sab3r.inference.trt_engine import ensure_engines

            manifest = read_manifest(spec['export_dir'])
            graph = manifest.graph_for(size)
            enc, dec = ensure_engines(spec['export_dir'], graph, spec['dtype'])
            be = TensorRTBackend(enc, dec, manifest, graph, spec['dtype'])
        encode, decode = be.encode_array, be.decode_arrays
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Path('/proc/self/clear_refs').write_text('5')  # peak RSS from here (weights included)
    rep, warm = spec['repeat'], spec['warmup']
    for _ in range(warm):
        decode(encode(t1), encode(t2))
    enc_s, dec_s, pair_s = [], [], []
    for _ in range(rep):
        t = time.perf_counter()
        a = encode(t1)
        t_enc = time.perf_counter()
        b = encode(t2)
        t_b = time.perf_counter()
        decode(a, b)
        t_end = time.perf_counter()
        enc_s.append(t_enc - t)
        dec_s.append(t_end - t_b)
        pair_s.append(t_end - t)
    feature_s = _time_feature_heads(be, t1, t2, rep, sync) if kind == 'torch' else []
    out = {'name': be.name, 'encode_ms': 1e3 * statistics.median(enc_s),
           'decode_ms': 1e3 * statistics.median(dec_s),
           'pair_ms': 1e3 * statistics.median(pair_s),
           'pair_min_ms': 1e3 * min(pair_s), 'peak_rss_gib': _vm_kb('VmHWM') / 2**20}
    if feature_s:
        out['feature_ms'] = 1e3 * statistics.median(feature_s)
    if cuda:
        out['peak_gpu_gib'] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _time_feature_heads(be, t1, t2, repeat: int, sync) -> list[float]:
    """Seconds per pair spent in the CLIP/DINO heads of both views (torch backend): the
    full-resolution feature heads run alone on the pair's decoded tokens."""
    import torch

    net = be.net
    if not net.cfg.feature_heads:
        return []
    with torch.inference_mode():
        dev = be.device
        a, b = net.encode(t1.to(dev)), net.encode(t2.to(dev))
        views = net.decode_tokens(a, b)
        layers = [tuple(t.float() for t in v.layers) for v in views]
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            for head, tokens, view in zip(net.heads(), layers, views):
                for fh in net.cfg.feature_heads:
                    head.feature(fh.name, tokens, view.grid)
            sync()
            times.append(time.perf_counter() - start)
    return times


def _run(spec: dict, timeout: float) -> dict:
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(spec, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: the worker died or hung
        result = {'error': f'no result within {timeout:.0f} s (exit code {proc.exitcode})'}
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    return result


def _ensure_export(config: str, seed: int, size: tuple[int, int], export_dir: Path,
                   threads: int, int8: bool) -> bool:
    """Export once into ``export_dir``; returns whether int8 graphs are there (when asked)."""
    from ros2_sab3r.inference.export import export_network, model_code_sha256, weights_sha256
    from ros2_sab3r.inference.int8 import Int8ParityError
    from ros2_sab3r.inference.manifest import ExportError, read_manifest

    net = _make_net(config, seed)
    try:
        manifest = read_manifest(export_dir)
        if (manifest.weights_sha256 == weights_sha256(net)
                and manifest.versions.get('model_code') == model_code_sha256()
                and set(manifest.precisions(size)) >= ({'fp32', 'int8'} if int8 else {'fp32'})):
            return int8
    except ExportError:
        pass
    print(f'exporting {config} at {size[0]}x{size[1]} to {export_dir} (once)', flush=True)
    try:
        export_network(net, export_dir, [size], source=f'random weights {config} (seed {seed})',
                       threads=threads, int8=int8)
    except Int8ParityError as exc:
        print(f'no int8 row: {exc}', flush=True)
        return False
    return int8


def _int8_error(export_dir: Path, size: tuple[int, int]) -> str:
    """Worst output of the int8 graphs against torch, from the export's parity figures."""
    from ros2_sab3r.inference.manifest import read_manifest

    parity = read_manifest(export_dir).graph_for(size, 'int8').parity
    if not parity:
        return ''
    name, fig = max(parity.items(), key=lambda item: item[1]['rel'])
    return f'{100 * fig["rel"]:.1f}% rms ({name})'



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--full', action='store_true',
                        help='full-size network (--config, default sab3r_cd), random weights')
    parser.add_argument('--config', default=None, help='architecture (default tiny_cd, or '
                                                       'sab3r_cd with --full)')
    parser.add_argument('--size', default='384x512', help='HxW network input')
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--repeat', type=int, default=None, help='timed pairs per backend')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--ort-levels', default=None,
                        help='comma-separated ONNX Runtime optimisation levels (default: all '
                             'four small, all,basic full)')
    parser.add_argument('--no-bf16', action='store_true', help='skip torch bf16 on the CPU')
    parser.add_argument('--no-int8', action='store_true',
                        help='skip the int8 ONNX Runtime graphs (and their export)')
    parser.add_argument('--export-dir', default=None,
                        help='ONNX export cache (default ~/.cache/ros2_sab3r/bench/<config>)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    from ros2_sab3r.inference.common import parse_size

    size = parse_size(args.size)
    config = args.config or ('sab3r_cd' if args.full else 'tiny_cd')
    repeat = args.repeat or (3 if args.full else 10)
    levels = (args.ort_levels or ('all,basic' if args.full else 'all,extended,basic,disable')
              ).split(',')
    export_dir = Path(args.export_dir or Path.home() / '.cache' / 'ros2_sab3r' / 'bench' /
                      f'{config}_s{args.seed}').expanduser()
    timeout = 3600.0 if args.full else 300.0
    load_before = os.getloadavg()
    int8 = _ensure_export(config, args.seed, size, export_dir, args.threads, not args.no_int8)

    import torch

    base = {'config': config, 'seed': args.seed, 'size': size, 'threads': args.threads,
            'repeat': repeat, 'warmup': args.warmup, 'export_dir': str(export_dir)}
    specs = [dict(base, kind='torch', device='cpu', dtype='fp32')]
    if not args.no_bf16:
        specs.append(dict(base, kind='torch', device='cpu', dtype='bf16'))
    specs += [dict(base, kind='onnxruntime', device='cpu', level=lv) for lv in levels]
    if int8:
        specs.append(dict(base, kind='onnxruntime', device='cpu', level='all', dtype='int8'))
    if torch.cuda.is_available():
        specs += [dict(base, kind='torch', device='cuda', dtype=dt, cuda_graphs=g)
                  for dt in ('fp32', 'fp16', 'bf16') for g in (False, True)]
        import onnxruntime

        if 'CUDAExecutionProvider' in onnxruntime.get_available_providers():
            specs.append(dict(base, kind='onnxruntime', device='cuda', level='all'))
        try:
            import pycuda.driver  # noqa: F401
            import tensorrt  # noqa: F401
        except ImportError:
            pass
        else:
            specs += [dict(base, kind='tensorrt', device='cuda', dtype=dt)
                      for dt in ('fp32', 'fp16', 'bf16')]
    rows = []
    for spec in specs:
        label = spec['kind'] + ' ' + spec.get('dtype', spec.get('level', ''))
        print(f'measuring {label} ({spec["device"]}) ...', flush=True)
        rows.append((spec, _run(spec, timeout)))
    load_after = os.getloadavg()

    ref = rows[0][1].get('pair_ms')
    print()
    print(f'network {config} (random weights, seed {args.seed}), input {size[0]}x{size[1]}, '
          f'{args.threads} threads, median of {repeat} after {args.warmup} warm-up')
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
          f'load average before {load_before[0]:.2f} {load_before[1]:.2f}, after '
          f'{load_after[0]:.2f} {load_after[1]:.2f} (1 and 5 min)')
    head = (f'{"backend":<44s} {"encode ms":>10s} {"decode ms":>10s} {"pair ms":>10s} '
            f'{"speed-up":>8s} {"peak RSS GiB":>12s} {"peak GPU GiB":>12s}  vs torch fp32')
    print(head)
    print('-' * len(head))
    for spec, r in rows:
        label = r.get('name', spec['kind'])
        if spec['kind'] == 'onnxruntime':
            label += f' opt={spec["level"]}'
        if 'error' in r:
            print(f'{label:<44s} failed: {r["error"]}')
            continue
        speed = f'{ref / r["pair_ms"]:.2f}x' if ref else '-'
        gpu = f'{r["peak_gpu_gib"]:.2f}' if 'peak_gpu_gib' in r else '-'
        error = _int8_error(export_dir, size) if spec.get('dtype') == 'int8' else ''
        print(f'{label:<44s} {r["encode_ms"]:10.1f} {r["decode_ms"]:10.1f} '
              f'{r["pair_ms"]:10.1f} {speed:>8s} {r["peak_rss_gib"]:12.2f} {gpu:>12s}  {error}')
        if 'feature_ms' in r:
            share = r['feature_ms'] / r['pair_ms']
            print(f'{"":<4s}of which the feature heads (CLIP + DINO, both views, full '
                  f'resolution): {r["feature_ms"]:.1f} ms, {100 * share:.0f}% of the pair')
    scope = 'full-size' if args.full else 'small (the target is for the full-size pair)'
    for dtype in ('fp32', 'int8'):
        ort = [r['pair_ms'] for s, r in rows if s['kind'] == 'onnxruntime'
               and s['device'] == 'cpu' and s.get('dtype', 'fp32') == dtype and 'pair_ms' in r]
        if ref and ort:
            best = ref / min(ort)
            verdict = 'met' if best >= TARGET_SPEEDUP else 'NOT met'
            print(f'target: onnxruntime {dtype} >= {TARGET_SPEEDUP}x torch fp32 on the CPU pair; '
                  f'best {best:.2f}x ({scope}): {verdict}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
