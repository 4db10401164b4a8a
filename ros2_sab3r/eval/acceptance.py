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
import re
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


def evaluate(bag: Path, regime: str, config: str, absent: int, out: Path,
             reuse: bool = False) -> dict:
    dest = out / f'{bag.name}-{regime}-{config}'
    if reuse and (dest / 'results.json').exists():
        return json.loads((dest / 'results.json').read_text())['locate']
    args = [str(bag), '--oracle', '--oracle-noise', f'regime={regime}', '--out', str(dest),
            '--absent-queries', str(absent), *FAST]
    for p in CONFIGS[config]:
        args += ['--param', p]
    if eval_main(args) != 0:
        raise RuntimeError(f'sab3r-eval failed on {bag} ({regime}, {config})')
    return json.loads((dest / 'results.json').read_text())['locate']


_FOUND = re.compile(r'by (-?[\d.]+) std; (-?[\d.]+) std above')
_LOW_Z = re.compile(r'only (-?[\d.]+) std above')


def margins(per_bag: list[dict]) -> dict:
    """The closest calls of 'calibrated' answers (parsed from their reasons): the smallest lead
    (std over the strongest competitor) and z (std above the vocabulary) of a present class's
    FOUND answer, and how near absent classes came (answers with a candidate instance: the
    largest z; 'more like' a vocabulary word counts as a negative lead)."""
    present, absent_z, absent_candidates, absent_n = [], [], 0, 0
    for r in per_bag:
        for q in r['queries']:
            m = _FOUND.search(q['reason'])
            if q['present']:
                if m:
                    present.append((float(m.group(1)), float(m.group(2))))
                continue
            absent_n += 1
            if q['status'] == 'FOUND' and m:
                absent_z.append(float(m.group(2)))
                absent_candidates += 1
            elif (low := _LOW_Z.search(q['reason'])) is not None:
                absent_z.append(float(low.group(1)))
                absent_candidates += 1
            elif 'more like' in q['reason']:
                absent_candidates += 1
    return {'present_min_lead': min((p[0] for p in present), default=float('nan')),
            'present_min_z': min((p[1] for p in present), default=float('nan')),
            'absent_max_z': max(absent_z, default=float('nan')),
            'absent_with_candidate': f'{absent_candidates}/{absent_n}'}


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
    p.add_argument('--reuse', action='store_true',
                   help='read the results.json of evaluations already in --out, do not rerun')
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix='sab3r-acceptance-'))
    out.mkdir(parents=True, exist_ok=True)
    bags = make_bags(out, args.seeds, args.scannet)
    rows, closest = [], []
    for regime in args.regimes:
        for config in args.configs:
            per_bag = [evaluate(b, regime, config, args.absent_queries, out, args.reuse)
                       for b in bags]
            if config == 'calibrated':
                closest.append((regime, margins(per_bag)))
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
    if closest:
        print('\nClosest calls of calibrated (FOUND needs lead >= 0.49 std, i.e. score 0.62, and '
              'z >= 2.0 at the defaults)\n')
        print('| oracle regime | present: min lead (std) | present: min z | absent: max z of a '
              'candidate | absent queries with a candidate |')
        print('|---|---|---|---|---|')
        def num(v: float) -> str:
            return '–' if v != v else f'{v:.1f}'  # NaN: no such answer

        for regime, c in closest:
            print(f'| {regime} | {num(c["present_min_lead"])} | {num(c["present_min_z"])} | '
                  f'{num(c["absent_max_z"])} | {c["absent_with_candidate"]} |')
    sys.stdout.flush()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
