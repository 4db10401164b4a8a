"""Live-mode evaluation: play a rosbag2 into a running perception node with its original timing.

``sab3r-eval BAG --mode live`` runs this program (same arguments). The camera images, CameraInfo
and TF of the bag are published unchanged (the recorded bytes) at the times they were recorded
(scaled by ``--rate``), into the node named by ``--node``, or into one started here with
``--start-node`` and the model options. It measures:

- end-to-end latency: from publishing an image to the node's ``~/keyframe_poses`` carrying that
  image's stamp (the node publishes a per-frame output for keyframes only, so only keyframes are
  timed);
- frame accounting from the node's own ``~/status`` counters (relative to their values before
  playback): images it received, processed, dropped (drop-oldest buffers, bad input) and still
  queued, beside the images published here; published minus received were lost on the way;
- the node's reported stage latencies.

Writes OUT/live.json and OUT/live_report.md with a latency histogram.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import time

from geometry_msgs.msg import PoseArray
import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String
from tf2_msgs.msg import TFMessage

from ros2_sab3r.eval.bag import BagError, raw_messages
from ros2_sab3r.eval.cli import build_parser, config_from_args, topics_from_args
from ros2_sab3r.eval.report import plot_latency, write_json
from ros2_sab3r.msg import PerceptionStatus
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.ros.process import params_file, stop_process

_TYPES = {'sensor_msgs/msg/Image': Image, 'sensor_msgs/msg/CompressedImage': CompressedImage,
          'sensor_msgs/msg/CameraInfo': CameraInfo, 'tf2_msgs/msg/TFMessage': TFMessage}


def _bag_info(bag: str, label_topic: str) -> dict:
    for _, _, _, data in raw_messages(bag, [label_topic]):
        return json.loads(deserialize_message(data, String).data)
    return {}


def _start_node(args, cfg, image_topic: str, info_topic: str, log_path: Path):
    ns, _, name = args.node.rpartition('/')
    cmd = [sys.executable, '-m', 'ros2_sab3r.ros.perception_node', '--ros-args',
           '--params-file', str(params_file()), '-r', f'__ns:={ns or "/"}',
           '-r', f'__node:={name}',
           '-p', f'camera.image_topics:=[{image_topic}]',
           '-p', f'camera.camera_info_topics:=[{info_topic}]',
           '-p', f'model.backend:={cfg.model.backend}',
           '-p', f'model.device:={cfg.model.device}',
           '-p', f'frames.pose_source:={cfg.frames.pose_source}']
    # rcl cannot parse an empty '-p name:=' override; empty strings are the defaults anyway
    for name, value in (('checkpoint', cfg.model.checkpoint),
                        ('standin_scene', cfg.model.standin_scene)):
        if value:
            cmd += ['-p', f'model.{name}:={value}']
    log = open(log_path, 'w', encoding='utf-8')  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(str(Path(args.bag).resolve()) + '-live')
    out.mkdir(parents=True, exist_ok=True)
    topics = topics_from_args(args)
    try:
        cfg = config_from_args(args, _bag_info(args.bag, topics.label_map))
        plan = list(raw_messages(args.bag, [topics.image, topics.camera_info, topics.tf,
                                            topics.tf_static]))
    except (BagError, ValueError) as err:
        print(f'sab3r-eval live: error: {err}', file=sys.stderr)
        return 1
    plan = _select_images(plan, topics.image, args.stride, args.max_frames)
    if not plan:
        print(f'sab3r-eval live: error: no {topics.image} messages in {args.bag}',
              file=sys.stderr)
        return 1
    proc = log = None
    if args.start_node:
        proc, log = _start_node(args, cfg, topics.image, topics.camera_info,
                                out / 'perception_node.log')
    # An own context, so that a caller that already initialised rclpy is not disturbed.
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(f'sab3r_replay_{os.getpid()}', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        result = _play(node, executor, args, plan, topics)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        if proc is not None:
            stop_process(proc)
            log.close()
    if 'error' in result:
        print(f'sab3r-eval live: error: {result["error"]}', file=sys.stderr)
        return 1
    result['configuration'] = {'command': ['sab3r-eval', *argv], 'node': args.node,
                               'rate': args.rate, 'bag': str(args.bag),
                               'started_node': bool(args.start_node),
                               'backend': cfg.model.backend, 'checkpoint': cfg.model.checkpoint,
                               'standin_scene': cfg.model.standin_scene}
    write_json(result, out / 'live.json')
    _report(result, out)
    print(f"live replay: {result['frames_published']} frames published, "
          f"{result['frames_received']} received, {result['frames_processed']} processed, "
          f"{result['frames_dropped']} dropped; "
          f"keyframe end-to-end latency median {result['end_to_end_ms'].get('median', 'n/a')} "
          f'ms; report {out / "live_report.md"}')
    return 0


def _select_images(plan, image_topic: str, stride: int, max_frames: int):
    """Keep every `stride`-th image (at most `max_frames`) and all other messages."""
    kept, k, n = [], 0, 0
    for item in plan:
        if item[0] == image_topic:
            k += 1
            if (k - 1) % max(1, stride) or (max_frames and n >= max_frames):
                continue
            n += 1
        kept.append(item)
    return kept


def _play(node, executor, args, plan, topics) -> dict:
    pubs = {}
    for topic, msgtype, _, _ in plan:
        if topic not in pubs:
            if msgtype not in _TYPES:
                return {'error': f'{topic} is {msgtype}; cannot replay that type'}
            q = qos.LATCHED_TF if topic == topics.tf_static else 10
            pubs[topic] = node.create_publisher(_TYPES[msgtype], topic, q)
    status: list[PerceptionStatus] = []
    node.create_subscription(PerceptionStatus, f'{args.node}/status', status.append, qos.STATUS)
    outputs: dict[int, float] = {}

    def on_poses(msg: PoseArray) -> None:
        outputs.setdefault(messages.ns_from_stamp(msg.header.stamp), time.monotonic())

    node.create_subscription(PoseArray, f'{args.node}/keyframe_poses', on_poses, qos.LATCHED)
    image_pub = pubs[topics.image]
    deadline = time.monotonic() + 60.0
    while (image_pub.get_subscription_count() == 0 or not status) and \
            time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    if image_pub.get_subscription_count() == 0:
        return {'error': f'no node subscribes to {topics.image} within 60 s; is {args.node} '
                'running and active (or pass --start-node)?'}
    before = status[-1] if status else None
    outputs.clear()
    published: dict[int, float] = {}
    t_first = plan[0][2]
    t0 = time.monotonic()
    for topic, msgtype, log_t, data in plan:
        target = t0 + (log_t - t_first) / 1e9 / args.rate
        while (wait := target - time.monotonic()) > 0:
            executor.spin_once(timeout_sec=min(wait, 0.05))
        pubs[topic].publish(data)
        if topic == topics.image:
            stamp = messages.ns_from_stamp(deserialize_message(data, _TYPES[msgtype]).header.stamp)
            published[stamp] = time.monotonic()
    play_s = time.monotonic() - t0

    def counters():
        s = status[-1]
        base = (before.frames_received, before.frames_processed, before.frames_dropped) \
            if before else (0, 0, 0)
        return (s.frames_received - base[0], s.frames_processed - base[1],
                s.frames_dropped - base[2], s.frames_queued)

    # Done when the node accounted for every image it received, and either received them all
    # or a few seconds passed (images lost on the way never arrive).
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
        if status:
            received, processed, dropped, queued = counters()
            settled = queued == 0 and processed + dropped >= received
            if settled and (received >= len(published) or time.monotonic() > t0 + play_s + 5):
                break
    received, processed, dropped, queued = counters() if status else (0, 0, 0, 0)
    lat = np.array([1e3 * (outputs[s] - published[s]) for s in published if s in outputs])
    last = status[-1] if status else None
    return {
        # frames_* other than published are the node's own counters, not derived here
        'frames_published': len(published), 'frames_received': int(received),
        'frames_processed': int(processed), 'frames_dropped': int(dropped),
        'frames_queued': int(queued), 'frames_lost': int(len(published) - received),
        'playback_seconds': play_s,
        'keyframes_timed': int(len(lat)),
        'end_to_end_ms': ({'mean': float(lat.mean()), 'median': float(np.median(lat)),
                           'p95': float(np.percentile(lat, 95)), 'max': float(lat.max()),
                           'values': lat.tolist()} if len(lat) else {}),
        'node_latency_ms': ({
            'convert': float(last.latency_convert_ms), 'encode': float(last.latency_encode_ms),
            'decode': float(last.latency_decode_ms), 'pose': float(last.latency_pose_ms),
            'integrate': float(last.latency_integrate_ms),
            'total': float(last.latency_total_ms)} if last else {}),
        'node_backend': last.backend if last else '',
        'protocol': 'end-to-end latency = time from publishing an image to receiving '
                    '~/keyframe_poses with its stamp (keyframes only); received, processed, '
                    "dropped and queued = the node's ~/status counters; lost = published - "
                    'received',
    }


def _report(r: dict, out: Path) -> None:
    lines = ['# ros2_sab3r live replay', '', r['protocol'] + '.', '',
             f"- node {r['configuration']['node']} ({r['node_backend']}), rate "
             f"{r['configuration']['rate']}x, bag `{r['configuration']['bag']}`",
             f"- frames: {r['frames_published']} published, {r['frames_lost']} lost on the "
             f"way, {r['frames_received']} received by the node: {r['frames_processed']} "
             f"processed, {r['frames_dropped']} dropped (buffers or bad input), "
             f"{r['frames_queued']} still queued"]
    e2e = r['end_to_end_ms']
    if e2e:
        lines.append(f"- end-to-end latency over {r['keyframes_timed']} keyframes: mean "
                     f"{e2e['mean']:.1f} ms, median {e2e['median']:.1f}, p95 {e2e['p95']:.1f}, "
                     f"max {e2e['max']:.1f}")
        plot_latency(e2e['values'], out / 'live_latency.png',
                     'image published -> keyframe pose received (ms)')
        lines += ['', '![end-to-end latency](live_latency.png)']
    else:
        lines.append('- no keyframe output was received: end-to-end latency not measured')
    (out / 'live_report.md').write_text('\n'.join(lines) + '\n', encoding='utf-8')


if __name__ == '__main__':
    raise SystemExit(main())
