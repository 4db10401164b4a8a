"""`sab3r-eval`: evaluate a backend, checkpoint or parameter set on a recorded rosbag2.

Offline (default): the bag's frames go through the node's Pipeline in this process, as fast as
the backend allows, and every metric the bag's ground truth allows is computed
(:mod:`ros2_sab3r.eval.evaluate`). Live (``--mode live``): the bag is played with its original
timing into a running perception node by the ROS player ``python -m ros2_sab3r.ros.replay``
(started as its own program, since only ros2_sab3r.ros may use rclpy), which measures end-to-end
latency and dropped frames.

Writes OUT/results.json (every figure and the configuration) and OUT/report.md with plots.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
import subprocess
import sys

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.eval.bag import BagError, BagTopics, read_bag
from ros2_sab3r.eval.evaluate import EvalOptions, Evaluator
from ros2_sab3r.eval.oracle import build_oracle
from ros2_sab3r.inference.factory import BackendUnavailable, LoadedModel, load_model
from ros2_sab3r.sim.oracle import OracleNoise

STANDIN = 'ros2_sab3r.sim.standin:SyntheticSceneBackend'
ORACLE = 'ros2_sab3r.eval.oracle:BagOracleBackend'
log = logging.getLogger('sab3r-eval')


def _param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f'--param {text!r}: expected NAME=VALUE, e.g. '
                                         'keyframes.min_overlap=0.3')
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sab3r-eval', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('bag', help='rosbag2 folder (sqlite3 or mcap)')
    p.add_argument('--out', default='', help='output folder (default: <bag>-eval next to it)')
    p.add_argument('--mode', choices=('offline', 'live'), default='offline')
    m = p.add_argument_group('model (as the node parameters model.*)')
    m.add_argument('--backend', default='', help="'torch', 'onnxruntime', 'tensorrt' or "
                   "'module:Class'")
    m.add_argument('--checkpoint', default='')
    m.add_argument('--device', default='', choices=('', 'cpu', 'cuda'))
    m.add_argument('--standin', action='store_true',
                   help='the ground-truth stand-in backend on the synthetic scene recorded in '
                   'the bag, as model.standin_scene (tests the tooling; says nothing about '
                   'SAB3R)')
    m.add_argument('--oracle', action='store_true',
                   help="the ORACLE backend: the bag's own depth, poses and label images in "
                   "place of the network (evaluates the pipeline alone; says nothing about "
                   'SAB3R)')
    m.add_argument('--oracle-noise', default='', metavar='NAME=VALUE,...',
                   help='oracle options, e.g. regime=cliplike,clip_noise=0.5 (fields of '
                   'ros2_sab3r.sim.oracle.OracleNoise)')
    m.add_argument('--pose-source', choices=('none', 'tf'), default='',
                   help="frames.pose_source; 'tf' takes camera poses from the bag's /tf")
    m.add_argument('--param', action='append', type=_param, default=[], metavar='NAME=VALUE',
                   help='any node parameter, e.g. --param keyframes.min_overlap=0.3 (repeat)')
    t = p.add_argument_group('topics')
    defaults = BagTopics()
    for field_name in BagTopics.__dataclass_fields__:
        t.add_argument(f'--{field_name.replace("_", "-")}-topic', dest=f'topic_{field_name}',
                       default=getattr(defaults, field_name), metavar='TOPIC')
    t.add_argument('--stride', type=int, default=1, help='use every n-th image')
    t.add_argument('--max-frames', type=int, default=0, help='0: all')
    t.add_argument('--sync-tolerance-ms', type=float, default=20.0,
                   help='ground truth is matched to images by header stamp within this')
    e = p.add_argument_group('protocol')
    d = EvalOptions()
    e.add_argument('--group-sizes', type=int, nargs='+', default=list(d.group_sizes))
    e.add_argument('--groups-per-size', type=int, default=d.groups_per_size)
    e.add_argument('--group-gap', type=int, default=d.group_gap)
    e.add_argument('--depth-frames', type=int, default=d.depth_frames)
    e.add_argument('--depth-scale', choices=('median', 'none'), default=d.depth_scale)
    e.add_argument('--locate-radius', type=float, default=d.locate_radius_m, metavar='M')
    e.add_argument('--absent-queries', type=int, default=d.absent_queries)
    e.add_argument('--gt-pixel-stride', type=int, default=d.gt_pixel_stride)
    e.add_argument('--no-progress', action='store_true')
    live = p.add_argument_group('live mode')
    live.add_argument('--node', default='/perception_node',
                      help='full name of the running perception node')
    live.add_argument('--start-node', action='store_true',
                      help='start a perception node for the replay (with the model options)')
    live.add_argument('--rate', type=float, default=1.0, help='playback speed factor')
    live.add_argument('--timeout', type=float, default=120.0,
                      help='seconds to wait for the node to catch up after playback')
    return p


def topics_from_args(args) -> BagTopics:
    return BagTopics(**{f: getattr(args, f'topic_{f}') for f in BagTopics.__dataclass_fields__})


def config_from_args(args, bag_info: dict):
    flat = dict(args.param)
    if args.standin:
        scene = bag_info.get('synthetic_scene')
        if not scene:
            raise BagError('--standin needs a synthetic bag (written by `sab3r-convert '
                           'synthetic`); this bag records no synthetic scene')
        flat.setdefault('model.backend', STANDIN)
        flat.setdefault('model.standin_scene', scene)
    if args.oracle:
        if args.standin or args.checkpoint:
            raise ValueError('--oracle replaces the network: drop --standin / --checkpoint')
        flat.setdefault('model.backend', ORACLE)
        flat.setdefault('model.oracle', f'{args.bag};{args.oracle_noise}'.rstrip(';'))
    for key, value in (('model.backend', args.backend), ('model.checkpoint', args.checkpoint),
                       ('model.device', args.device), ('frames.pose_source', args.pose_source)):
        if value:
            flat[key] = value
    return config_from_flat(flat)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')
    if args.mode == 'live':
        # The ROS player is a program of the ROS layer; run it rather than import it.
        return subprocess.call([sys.executable, '-m', 'ros2_sab3r.ros.replay', *argv])
    out = Path(args.out) if args.out else Path(str(Path(args.bag).resolve()) + '-eval')
    try:
        options = EvalOptions(
            group_sizes=tuple(args.group_sizes), groups_per_size=args.groups_per_size,
            group_gap=args.group_gap, depth_frames=args.depth_frames,
            depth_scale=args.depth_scale, locate_radius_m=args.locate_radius,
            absent_queries=args.absent_queries, gt_pixel_stride=args.gt_pixel_stride,
            progress=not args.no_progress).validate()
        posed = args.pose_source == 'tf' or ('frames.pose_source', 'tf') in args.param
        bag = read_bag(args.bag, topics_from_args(args), stride=args.stride,
                       max_frames=args.max_frames,
                       sync_tolerance_ns=int(args.sync_tolerance_ms * 1e6),
                       tf_map_frame=_map_frame(args) if posed else '',
                       progress=not args.no_progress)
        cfg = config_from_args(args, bag.info)
        if args.oracle and cfg.model.backend == ORACLE:
            # The bag is in memory already: build the oracle from it rather than re-read it.
            noise = OracleNoise.parse(args.oracle_noise)
            backend = build_oracle(bag, noise)
            model = LoadedModel(backend, backend.text_encoder,
                                f'{backend.name} [{noise.text()}]')
        else:
            model = load_model(cfg.model)
    except (BagError, BackendUnavailable, ValueError) as err:
        hint = ''
        if isinstance(err, BackendUnavailable) and not args.checkpoint:
            hint = ('; give --checkpoint, or --standin for a synthetic bag')
        print(f'sab3r-eval: error: {err}{hint}', file=sys.stderr)
        return 1
    if 'oracle' in model.description.lower():
        log.warning("backend %s is an ORACLE answering from the bag's ground truth: the "
                    'figures measure the pipeline alone and say nothing about SAB3R',
                    model.description)
    elif 'stand-in' in model.description.lower():
        log.warning('backend %s is a STAND-IN answering from ground truth: the figures test the '
                    'tooling and say nothing about SAB3R', model.description)
    from ros2_sab3r.eval.report import write_report

    outcome = Evaluator(cfg, model, options).evaluate(bag)
    outcome.results['configuration']['command'] = ['sab3r-eval', *argv]
    files = write_report(outcome, out)
    _summary(outcome.results, files['report'])
    return 0


def _map_frame(args) -> str:
    return str(dict(args.param).get('frames.map_frame', 'map'))


def _summary(r: dict, report: Path) -> None:
    seq = r['sequence']
    log.info('%d frames, %d keyframes, %d skipped; %.1f frames/s', seq['frames'],
             seq['keyframes'], seq['skipped'], seq['frames_per_second'] or 0.0)
    for key in ('pose', 'depth', 'sequence_map', 'locate'):
        if key in r:
            figures = {k: round(v, 4) for k, v in r[key].items()
                       if isinstance(v, float) and k != 'radius_m'}
            log.info('%s: %s', key, figures)
    for key, why in r.get('skipped', {}).items():
        log.info('skipped %s: %s', key, why)
    log.info('report: %s', report)


if __name__ == '__main__':
    raise SystemExit(main())
