"""Time and peak memory of one sab3r-train optimiser step, and the teachers' share of it.

    python benchmarks/train_step.py --smoke          # CPU, toy size: tiny network, 48x64, seconds
    python benchmarks/train_step.py                  # GPU: sab3r_cd, 384x512 pair, both teachers
    python benchmarks/train_step.py --out step.json  # figures as JSON too

One step = teachers (MaskCLIP + DINOv2, JBU upsampling, random weights) on both crops, the
student's forward and backward (micro-batch 1, no accumulation), clipping and AdamW, through the
real engine (ros2_sab3r.train.engine.Trainer) on a synthetic scene. Every combination of precision
(fp32, bf16) and activation checkpointing (off, on) is measured. The smoke run uses the tiny
architecture with 512/384-channel feature heads so the real teachers fit it, and bilinear
upsampling of their features (the JBU alone takes seconds per map on a CPU).

Reference (derived, not a target this machine can meet): the official run took about 3 days on 8
A40s for 13,360 steps of 64 pairs, i.e. about 2.4 s per pair per GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ros2_sab3r.model.arch import load_config  # noqa: E402
from ros2_sab3r.train.engine import Trainer  # noqa: E402
from ros2_sab3r.train.recipe import load_recipe  # noqa: E402
from ros2_sab3r.train.teachers import Teacher  # noqa: E402

OFFICIAL_S_PER_PAIR_PER_GPU = 3 * 86400 / 13360 / 8  # s per step / pairs per GPU per step


def _peak_kb() -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1])
    return 0


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_kb() / 1024


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def smoke_architecture(folder: Path) -> Path:
    """tiny_cd with the teachers' widths (CLIP 512, DINO 384), as a JSON architecture file."""
    data = load_config('tiny_cd').to_dict()
    for head in data['feature_heads']:
        head['out_dim'] = {'clip': 512, 'dino': 384}[head['name']]
    data['name'] = 'tiny_cd_teacher_widths'
    path = folder / 'tiny_cd_teacher_widths.json'
    path.write_text(json.dumps(data), encoding='utf-8')
    return path


def measure(architecture: str, size: tuple[int, int], precision: str, checkpointing: bool,
            device: str, repeat: int, run_dir: Path, upsampler: str = 'jbu') -> dict:
    recipe = load_recipe('toy_cpu', [
        f'model.architecture={architecture}', f'data.resolution={size[0]},{size[1]}',
        f'data.sources.0.render_size={size[0]},{size[1]}', 'data.held_out=0',
        'loss.clip=20', 'loss.dino=4', 'teachers.clip.weights=random',
        'teachers.clip.upsampler=none', 'teachers.dino.kind=dinov2',
        'teachers.dino.weights=random', 'teachers.dino.upsampler=none',
        f'precision={precision}', f'model.activation_checkpointing={str(checkpointing).lower()}',
        'batch.micro_batch=1', 'batch.accumulation=1', f'run.device={device}',
        f'run.steps={repeat + 1}', 'data.correspondences=1024',
        # the official optimiser settings: with random weights the toy recipe's lr
        # (1e-3, 2 warm-up steps) drives the full-size pointmaps to inf by step 3
        'optim.lr=1e-4', 'optim.warmup_steps=4000', 'optim.warmup_shape=log'])
    dev = torch.device('cuda' if device == 'cuda' else 'cpu')
    teachers = {'clip': Teacher('maskclip', upsampler), 'dino': Teacher('dinov2', upsampler)}
    trainer = Trainer(recipe, run_dir, teachers=teachers, progress=False)
    trainer.optimise(0)  # warm-up (allocator, kernels, lazy imports)
    step_s, teacher_s = [], []
    _reset_peak(dev)
    for step in range(1, repeat + 1):
        batch = trainer.batch(step, 0)
        _sync(dev)
        start = time.perf_counter()
        for teacher in trainer.teachers.values():
            teacher(batch.img1)
            teacher(batch.img2)
        _sync(dev)
        teacher_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.optimise(step)
        _sync(dev)
        step_s.append(time.perf_counter() - start)
    step = statistics.median(step_s)
    teach = statistics.median(teacher_s)
    return {'precision': precision, 'activation_checkpointing': checkpointing,
            'step_s': round(step, 4), 'teachers_s': round(teach, 4),
            'teachers_share': round(teach / step, 3), 'peak_mb': round(_peak_mb(dev), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smoke', action='store_true', help='CPU, tiny network, 48x64')
    parser.add_argument('--size', default=None, help='HxW of the crops (default 384x512)')
    parser.add_argument('--repeat', type=int, default=None)
    parser.add_argument('--out', type=Path, default=None, help='write the figures as JSON')
    parser.add_argument('--only', action='append', default=[], metavar='PRECISION:on|off',
                        help='measure only these settings (e.g. --only bf16:on); default all')
    args = parser.parse_args(argv)
    device = 'cuda' if torch.cuda.is_available() and not args.smoke else 'cpu'
    size = tuple(int(v) for v in (args.size or ('48x64' if args.smoke else '384x512')).split('x'))
    repeat = args.repeat or (1 if args.smoke else 3)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix='sab3r-train-step-') as tmp:
        architecture = str(smoke_architecture(Path(tmp))) if args.smoke else 'sab3r_cd'
        if device == 'cpu' and not args.smoke:
            print('no CUDA device: the full-size step on a CPU takes minutes per setting')
        settings = [(p, c) for p in ('fp32', 'bf16') for c in (False, True)
                    if not args.only or f'{p}:{"on" if c else "off"}' in args.only]
        if not settings:
            parser.error(f'--only {args.only}: settings are fp32|bf16 : on|off')
        for precision, checkpointing in settings:
            try:
                rows.append(measure(architecture, size, precision, checkpointing, device,
                                    repeat, Path(tmp) / f'{precision}-{checkpointing}',
                                    'bilinear' if args.smoke else 'jbu'))
            except Exception as exc:  # noqa: BLE001 - reported; the other settings still run
                where = traceback.extract_tb(exc.__traceback__)[-1]
                failures.append(f'{precision} checkpointing={checkpointing}: '
                                f'{type(exc).__name__}: {exc} '
                                f'[{Path(where.filename).name}:{where.lineno}]')
                print(failures[-1], flush=True)
                continue
            finally:
                gc.collect()
                if device == 'cuda':
                    torch.cuda.empty_cache()  # each setting starts from the same free memory
            r = rows[-1]
            print(f'{precision} checkpointing={str(checkpointing):5s} step {r["step_s"]:.3f} s'
                  f' (teachers {r["teachers_s"]:.3f} s, {100 * r["teachers_share"]:.0f} %)'
                  f'  peak {r["peak_mb"]:.0f} MB')
    report = {'architecture': 'tiny_cd (teacher widths)' if args.smoke else 'sab3r_cd',
              'upsampler': 'bilinear' if args.smoke else 'jbu',
              'size': list(size), 'device': device, 'repeat': repeat, 'rows': rows,
              'failures': failures, 'torch': torch.__version__,
              'gpu': torch.cuda.get_device_name(0) if device == 'cuda' else None,
              'reference_s_per_pair_per_gpu': round(OFFICIAL_S_PER_PAIR_PER_GPU, 2),
              'load_average': os.getloadavg()}
    print(f'reference: official run about {report["reference_s_per_pair_per_gpu"]} s per pair '
          f'per A40; load average {report["load_average"]}')
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + '\n', encoding='utf-8')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
