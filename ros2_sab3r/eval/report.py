"""Evaluation output: ``results.json`` (every figure and the configuration) and ``report.md``
with PNG plots drawn by matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ros2_sab3r.eval.evaluate import EvalOutcome


def _plain(value):
    """JSON-ready copy: numpy scalars/arrays become Python, NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(_plain(results), indent=2, allow_nan=False) + '\n',
                   encoding='utf-8')
    tmp.replace(path)


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def plot_class_iou(per_class: dict[str, float], path: Path, title: str) -> None:
    plt = _pyplot()
    names = sorted(per_class, key=lambda n: -per_class[n])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    ax.bar(range(len(names)), [per_class[n] for n in names], color='tab:blue')
    ax.set_xticks(range(len(names)), names, rotation=60, ha='right')
    ax.set_ylabel('IoU (%)')
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trajectory(traj: dict, path: Path) -> None:
    plt = _pyplot()
    P, G = np.asarray(traj['pred']), np.asarray(traj['gt'])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(G[:, 0], G[:, 1], 'k-', lw=1.5, label='ground truth')
    ax.plot(P[:, 0], P[:, 1], '-', color='tab:orange', lw=1.2, label='estimated')
    kf = np.asarray(traj['keyframe'], bool)
    if kf.any():
        ax.plot(P[kf, 0], P[kf, 1], 'o', color='tab:orange', ms=4, label='keyframes')
    ax.set_aspect('equal')
    ax.set_xlabel('world x (m)')
    ax.set_ylabel('world y (m)')
    ax.set_title('camera trajectory, top-down (one-view alignment)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(total_ms: list[float], path: Path,
                 xlabel: str = 'Pipeline.step total latency (ms)') -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(total_ms, bins=min(40, max(5, len(total_ms) // 2)), color='tab:green')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('frames')
    ax.set_title('per-frame latency')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_map(map_plot: dict, path: Path) -> None:
    plt = _pyplot()
    P, labels, names = map_plot['points'], map_plot['labels'], map_plot['names']
    ids = [i for i in np.unique(labels) if i >= 0]
    cmap = plt.get_cmap('tab20')
    fig, ax = plt.subplots(figsize=(7, 7))
    order = np.argsort(P[:, 2])  # draw low points first, so tops of objects stay visible
    colour = np.full((len(P), 4), 0.8)
    for k, i in enumerate(ids):
        colour[labels == i] = cmap(k % 20)
    ax.scatter(P[order, 0], P[order, 1], s=1, c=colour[order])
    for k, i in enumerate(ids):
        ax.plot([], [], 's', color=cmap(k % 20), label=names.get(int(i), str(i)))
    ax.set_aspect('equal')
    ax.set_xlabel('world x (m)')
    ax.set_ylabel('world y (m)')
    ax.set_title('semantic map, top-down, coloured by predicted class')
    ax.legend(fontsize=7, markerscale=1.5, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(v, digits: int = 2) -> str:
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}'
    return str(v)


def write_report(outcome: EvalOutcome, out_dir: Path) -> dict[str, Path]:
    """results.json, report.md and the plots; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r, plots = outcome.results, outcome.plots
    files = {'json': out_dir / 'results.json', 'report': out_dir / 'report.md'}
    if 'ate_m' in plots:
        r.setdefault('pose', {})['ATE_rmse_m_sim3'] = plots['ate_m']
    write_json(r, files['json'])
    if r.get('sequence_map', {}).get('per_class_IoU'):
        files['class_iou'] = out_dir / 'class_iou.png'
        plot_class_iou(r['sequence_map']['per_class_IoU'], files['class_iou'],
                       'per-class IoU, whole-sequence map')
    if 'trajectory' in plots:
        files['trajectory'] = out_dir / 'trajectory.png'
        plot_trajectory(plots['trajectory'], files['trajectory'])
    if plots.get('latency_total_ms'):
        files['latency'] = out_dir / 'latency.png'
        plot_latency(plots['latency_total_ms'], files['latency'])
    if plots.get('map'):
        files['map'] = out_dir / 'semantic_map_top.png'
        plot_map(plots['map'], files['map'])
    files['report'].write_text(_markdown(r, {k: p.name for k, p in files.items()}),
                               encoding='utf-8')
    return files


def _markdown(r: dict, pics: dict[str, str]) -> str:
    cfg = r['configuration']
    lines = ['# ros2_sab3r rosbag evaluation', '',
             f"- bag: `{cfg['bag']['path']}` ({cfg['bag']['storage']}, "
             f"{cfg['bag']['frames']} frames)",
             f"- backend: {cfg['backend']}",
             f"- pose source: `{cfg['parameters']['frames.pose_source']}`",
             f"- evaluation took {_f(r.get('eval_seconds'), 1)} s; every figure and the full "
             'configuration are in `results.json`', '']
    if 'stand-in' in cfg['backend'] or 'STAND-IN' in cfg['backend'].upper():
        lines += ['**The backend is a stand-in that answers from ground truth: these figures '
                  'test the evaluation, they say nothing about SAB3R.**', '']
    if r.get('skipped'):
        lines += ['## Skipped', '']
        lines += [f'- **{k}**: {v}' for k, v in r['skipped'].items()] + ['']
    if r.get('notes'):
        lines += ['## Data notes', ''] + [f'- {n}' for n in r['notes']] + ['']
    groups = r.get('map_and_locate_groups')
    if groups:
        lines += ['## Map and Locate (SAB3R §4)', '', groups['protocol'], '',
                  '| views | groups | mIoU (%) | Acc (%) | Comp (m) | Median Comp (m) '
                  '| Time (s) |',
                  '|---|---|---|---|---|---|---|']
        for key, g in groups.items():
            if key.endswith('_views'):
                lines.append(f"| {key.split('_')[0]} | {len(g['groups'])} | {_f(g['mIoU'])} | "
                             f"{_f(g['Acc'])} | {_f(g['Comp'], 3)} | {_f(g['Median Comp'], 3)} "
                             f"| {_f(g['time_s'])} |")
        lines.append('')
    sm = r.get('sequence_map')
    if sm and 'mIoU' in sm:
        lines += ['## Whole-sequence map', '',
                  f"mIoU {_f(sm['mIoU'])} %, Acc {_f(sm['Acc'])} %, Comp {_f(sm['Comp'], 3)} m, "
                  f"Median Comp {_f(sm['Median Comp'], 3)} m ({sm['pred_points']} voxels vs "
                  f"{sm['gt_points']} ground-truth points; same definitions as above).", '']
        if sm.get('classes_without_prediction'):
            lines += ['Classes with no predicted point (no completeness): '
                      + ', '.join(sm['classes_without_prediction']), '']
        if 'class_iou' in pics:
            lines += [f"![per-class IoU]({pics['class_iou']})", '']
        if 'map' in pics:
            lines += [f"![semantic map]({pics['map']})", '']
    pose = r.get('pose')
    if pose and 'RRA@15' in pose:
        lines += ['## Pose (supplementary A.2)', '', pose['protocol'] + '.', '',
                  '| RRA@15 (%) | RTA@15 (%) | mAA(30) (%) | pairs | ATE (m, Sim(3), not a paper '
                  'metric) |', '|---|---|---|---|---|',
                  f"| {_f(pose['RRA@15'])} | {_f(pose['RTA@15'])} | {_f(pose['mAA(30)'])} | "
                  f"{pose['pairs']} | {_f(pose.get('ATE_rmse_m_sim3'), 3)} |", '']
    elif pose:
        lines += ['## Pose', '', pose.get('error', ''), '']
    if 'trajectory' in pics:
        lines += [f"![trajectory]({pics['trajectory']})", '']
    depth = r.get('depth')
    if depth and 'AbsRel' in depth:
        lines += ['## Depth (supplementary A.2)', '',
                  f"AbsRel {_f(depth['AbsRel'], 4)}, delta<1.25 {_f(depth['delta<1.25'])} % over "
                  f"{depth['images']} images.", '', f"Scale protocol: {depth['scale_protocol']}. "
                  f"{depth['protocol']}.", '']
    loc = r.get('locate')
    if loc and 'queries' in loc:
        lines += ['## Locate', '', loc['protocol'] + '.', '',
                  f"Success {_f(loc['success_rate'])} % (radius {loc['radius_m']} m), mean box "
                  f"IoU {_f(loc['mean_box_iou'])}, NOT_FOUND for absent classes "
                  f"{_f(loc['not_found_accuracy'])} %.", '',
                  '| query | present | status | score | success | distance (m) | box IoU |',
                  '|---|---|---|---|---|---|---|']
        for q in loc['queries']:
            ok = q.get('success') if q['present'] else q.get('correct')
            lines.append(f"| {q['query']} | {q['present']} | {q['status']} | {_f(q['score'])} | "
                         f"{ok} | {_f(q.get('distance_m'))} | {_f(q.get('box_iou'))} |")
        lines.append('')
    seq = r.get('sequence')
    if seq:
        lines += ['## Latency, keyframes, memory', '',
                  f"{seq['frames']} frames: {seq['keyframes']} keyframes (rate "
                  f"{_f(seq['keyframe_rate'])}), {seq['tracked']} tracked, {seq['skipped']} "
                  f"skipped; {_f(seq['frames_per_second'])} frames/s offline. Peak RSS "
                  f"{_f(seq['memory']['peak_rss_mib'], 0)} MiB; map {seq['memory']['map_voxels']} "
                  f"voxels ({_f(seq['memory']['map_feature_mib'])} MiB of features).", '',
                  '| stage | mean (ms) | median | p95 | max | frames |',
                  '|---|---|---|---|---|---|']
        for stage, v in seq['latency_ms'].items():
            lines.append(f"| {stage} | {_f(v['mean'])} | {_f(v['median'])} | {_f(v['p95'])} | "
                         f"{_f(v['max'])} | {v['frames']} |")
        lines.append('')
        if 'latency' in pics:
            lines += [f"![latency]({pics['latency']})", '']
    return '\n'.join(lines) + '\n'
