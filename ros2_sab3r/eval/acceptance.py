"""Map-and-Locate acceptance table: the ORACLE on synthetic (and ScanNet-layout) bags.

``python -m ros2_sab3r.eval.acceptance --seeds 0 1 2 3 [--scannet] [--out DIR]`` writes the bags
(``sab3r-convert``), runs ``sab3r-eval BAG --oracle`` for each oracle regime and Locate
configuration and prints one markdown table: Locate success, mean box IoU, NOT_FOUND for absent
classes and one FOUND instance per object, averaged over the bags. Configurations:

- ``before``: the map and Locate of before issue 15 (keyframes by overlap alone, 'lerf', PCA
  boxes in unposed maps, no merging);
- ``lerf``, ``official``: those modes with gravity estimation and merging;
- ``calibrated``: the default.

Every figure comes from the oracle (recorded ground truth in place of the network): it measures
the pipeline alone and says nothing about SAB3R.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import tempfile

from ros2_sab3r.eval.cli import main as eval_main
from ros2_sab3r.eval.convert import convert_scannet, convert_synthetic, write_scannet_layout

CONFIGS = {
    'before': ['query.relevancy_mode=lerf', 'query.estimate_gravity=false',
               'query.merge_gap_m=0', 'keyframes.max_unmapped=1'],
    'lerf': ['query.relevancy_mode=lerf'],
    'official': ['query.relevancy_mode=official'],
    'calibrated': ['query.relevancy_mode=calibrated'],
}
FIGURES = ('success_rate', 'mean_box_iou', 'not_found_accuracy', 'one_found_per_object')
FAST = ['--group-sizes', '2', '--groups-per-size', '1', '--depth-frames', '3', '--no-progress']


def make_bags(out: Path, seeds: list[int], scannet: bool) -> list[Path]:
    bags = []
    for seed in seeds:
        bag = out / f'synthetic_seed{seed}'
        if not bag.exists():
            convert_synthetic(bag, seed=seed, progress=False)
        bags.append(bag)
    if scannet:
        seed = seeds[0] + 1 if seeds else 1
        scene, bag = out / f'scene_synthetic_scannet{seed}', out / f'scannet_layout_seed{seed}'
        if not scene.exists():
            write_scannet_layout(scene, seed=seed)
        if not bag.exists():
            convert_scannet(scene, bag, stride=1, labels='nyu40', progress=False)
        bags.append(bag)
    return bags


def evaluate(bag: Path, regime: str, config: str, absent: int, out: Path) -> dict:
    dest = out / f'{bag.name}-{regime}-{config}'
    args = [str(bag), '--oracle', '--oracle-noise', f'regime={regime}', '--out', str(dest),
            '--absent-queries', str(absent), *FAST]
    for p in CONFIGS[config]:
        args += ['--param', p]
    if eval_main(args) != 0:
        raise RuntimeError(f'sab3r-eval failed on {bag} ({regime}, {config})')
    return json.loads((dest / 'results.json').read_text())['locate']


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m ros2_sab3r.eval.acceptance', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--scannet', action='store_true',
                   help='also a ScanNet-layout scene written by the renderer and converted')
    p.add_argument('--regimes', nargs='+', default=['hash', 'cliplike'])
    p.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument('--absent-queries', type=int, default=20)
    p.add_argument('--out', default='', help='folder for bags and reports (default: a temp dir)')
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix='sab3r-acceptance-'))
    out.mkdir(parents=True, exist_ok=True)
    bags = make_bags(out, args.seeds, args.scannet)
    rows = []
    for regime in args.regimes:
        for config in args.configs:
            per_bag = [evaluate(b, regime, config, args.absent_queries, out) for b in bags]
            means = {}
            for key in FIGURES:
                vals = [r[key] for r in per_bag if r.get(key) is not None]
                means[key] = sum(vals) / len(vals) if vals else float('nan')
            worst = {key: min((r[key] for r in per_bag if r.get(key) is not None),
                              default=float('nan')) for key in FIGURES}
            rows.append((regime, config, means, worst))
    names = ', '.join(b.name for b in bags)
    print(f'ORACLE Map-and-Locate over {len(bags)} bags ({names}); mean (worst bag)\n')
    print('| oracle regime | Locate | success % | mean box IoU | NOT_FOUND % (absent) | '
          'one FOUND per object % |')
    print('|---|---|---|---|---|---|')
    for regime, config, m, w in rows:
        print(f'| {regime} | {config} | {m["success_rate"]:.1f} ({w["success_rate"]:.1f}) | '
              f'{m["mean_box_iou"]:.3f} ({w["mean_box_iou"]:.3f}) | '
              f'{m["not_found_accuracy"]:.1f} ({w["not_found_accuracy"]:.1f}) | '
              f'{m["one_found_per_object"]:.1f} ({w["one_found_per_object"]:.1f}) |')
    sys.stdout.flush()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
