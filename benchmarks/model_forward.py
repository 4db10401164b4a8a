"""Time one pair forward of the SAB3R/MASt3R network on CPU (random weights) and its peak memory.

    python benchmarks/model_forward.py                 # mast3r_vitl_512 at 512x384, fp32
    python benchmarks/model_forward.py --small         # tiny config, a few seconds
    python benchmarks/model_forward.py --config sab3r_cd --size 512x336 --dtype bf16

Reference: the official code takes about 12 s per 512x384 pair in fp32 on the 2-core
development machine. Peak memory is the process high-water mark (weights included), reset after
the weights are built so the forward's own peak is visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ros2_sab3r.model.network import BACKBONE_DTYPES, create_network  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _timed(fn, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='mast3r_vitl_512')
    parser.add_argument('--small', action='store_true', help='tiny_cd config at 64x48')
    parser.add_argument('--size', default='512x384', help='WxH of both images')
    parser.add_argument('--dtype', default='fp32', choices=tuple(BACKBONE_DTYPES))
    parser.add_argument('--threads', type=int, default=0, help='0: torch default')
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=1)
    args = parser.parse_args(argv)
    if args.small:
        args.config, args.size = 'tiny_cd', '64x48'
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split('x'))

    torch.manual_seed(0)
    start = time.perf_counter()
    net = create_network(args.config)
    if args.dtype != 'fp32':
        net.set_backbone_dtype(BACKBONE_DTYPES[args.dtype])
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    img1 = torch.rand(1, 3, height, width, generator=gen) * 2 - 1
    img2 = torch.rand(1, 3, height, width, generator=gen) * 2 - 1
    rss_weights = _status_kb('VmRSS')
    peak_reset = _reset_peak()

    with torch.inference_mode():
        pair = _timed(lambda: net(img1, img2), args.repeat, args.warmup)
        peak_pair = _status_kb('VmHWM')
        enc = _timed(lambda: net.encode(img1), args.repeat, 0)
        a, b = net.encode(img1), net.encode(img2)
        dec = _timed(lambda: net.decode(a, b), args.repeat, 0)

    unique = sum({id(p): p.numel() for p in net.parameters()}.values())
    rows = [
        ('config', f'{args.config} ({unique / 1e6:.1f}M params, built in {build_s:.1f} s)'),
        ('input', f'2 x {width}x{height}, {args.dtype} backbone, fp32 heads'),
        ('machine', f'{platform.processor() or platform.machine()}, '
                    f'{torch.get_num_threads()} torch threads, torch {torch.__version__}'),
        ('pair forward (s)', _fmt(pair)),
        ('encode one image (s)', _fmt(enc)),
        ('decode + heads, one pair (s)', _fmt(dec)),
        ('RSS with weights (GiB)', f'{rss_weights / 2**20:.2f}'),
        ('peak RSS in forward (GiB)', f'{peak_pair / 2**20:.2f}'
                                      + ('' if peak_reset else ' (process peak, not reset)')),
        ('forward working memory (GiB)', f'{(peak_pair - rss_weights) / 2**20:.2f}'),
    ]
    width_col = max(len(k) for k, _ in rows)
    print('-' * (width_col + 50))
    for key, value in rows:
        print(f'{key:<{width_col}} | {value}')
    print('-' * (width_col + 50))
    return 0


def _fmt(times: list[float]) -> str:
    if len(times) == 1:
        return f'{times[0]:.3f}'
    return (f'{statistics.median(times):.3f} median, {min(times):.3f} min, '
            f'{max(times):.3f} max over {len(times)}')


if __name__ == '__main__':
    sys.exit(main())
