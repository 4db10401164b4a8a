"""``sab3r-train RECIPE [--set key=value ...] [--out RUN_DIR] [--resume auto|PATH] [--nproc N]``.

RECIPE is a YAML file or a shipped recipe name (``toy_cpu``, ``sab3r_official``, ...). With
``--nproc N`` (N > 1) and not already under torchrun, the command starts
``torch.distributed.run --standalone --nproc_per_node N`` on itself; for several machines run
torchrun yourself with its rendezvous options. Bad input exits with status 2 and one line naming
the problem; nothing already saved is lost.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path
import subprocess
import sys

from ros2_sab3r.model.checkpoint import CheckpointError
from ros2_sab3r.train.checkpoint import TrainingCheckpointError
from ros2_sab3r.train.data import DataError
from ros2_sab3r.train.engine import TrainingError, close_distributed, run_training
from ros2_sab3r.train.recipe import RecipeError, load_recipe, shipped_recipes
from ros2_sab3r.train.teachers import TeacherWeightsError

logger = logging.getLogger('sab3r-train')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='sab3r-train', description='Train SAB3R (MASt3R distilled with CLIP/DINOv2 '
        'feature heads) from a recipe.')
    parser.add_argument('recipe', help='recipe YAML file or shipped name: '
                        + ', '.join(shipped_recipes()))
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override a recipe key (dotted, typed by the '
                        'field), e.g. --set run.steps=100 --set data.sources.0.path=/bags/lab')
    parser.add_argument('--out', type=Path, default=None,
                        help='run directory (default runs/NAME-YYYYmmdd-HHMMSS)')
    parser.add_argument('--resume', default=None, metavar='auto|PATH',
                        help="'auto': the run directory's latest checkpoint (a fresh start when "
                        'it has none); or a checkpoint folder')
    parser.add_argument('--nproc', type=int, default=1,
                        help='processes on this machine (starts torchrun itself when > 1)')
    parser.add_argument('--stop-at', type=int, default=None,
                        help='stop after this optimiser step (a resumable pause)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def _torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    rest, skip = [], False
    for item in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
            continue
        if item == '--nproc':
            skip = True
            continue
        if item.startswith('--nproc='):
            continue
        rest.append(item)
    if args.out is None:  # every rank must agree on the run directory
        rest += ['--out', str(_default_out(args))]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
           f'--nproc_per_node={args.nproc}', '-m', 'ros2_sab3r.train.cli', *rest]
    logger.info('starting %s', ' '.join(cmd))
    return subprocess.call(cmd)


def _default_out(args: argparse.Namespace) -> Path:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    name = Path(args.recipe).stem
    return Path('runs') / f'{name}-{stamp}'


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if args.nproc < 1:
        print('sab3r-train: --nproc must be >= 1', file=sys.stderr)
        return 2
    if args.nproc > 1 and 'LOCAL_RANK' not in os.environ:
        return _torchrun(args, argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.resume not in (None, 'auto') and not Path(args.resume).exists():
            raise TrainingCheckpointError(f'--resume {args.resume} does not exist')
        out = args.out or _default_out(args)
        completed = False
        try:
            trainer = run_training(recipe, out, resume=args.resume, stop_at=args.stop_at,
                                   progress=not args.no_progress)
            completed = True
        finally:
            close_distributed(completed=completed)
    except (RecipeError, DataError, TrainingError, TrainingCheckpointError, CheckpointError,
            TeacherWeightsError, FileNotFoundError) as exc:
        print(f'sab3r-train: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('sab3r-train: interrupted; resume with --resume auto (from the last checkpoint)',
              file=sys.stderr)
        return 130
    if trainer.info.main:
        done = trainer.step >= recipe.run.steps
        print(f'sab3r-train: {"finished" if done else "stopped"} at step {trainer.step} in '
              f'{out}' + (f' (exports in {out / "export"})' if done else
                          ' (resume with --resume auto)'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
