"""`make demo`: start the perception node, stream camera images into it, ask it where things are.

The node runs as its own process (as `ros2 run ros2_sab3r perception_node` would start it) with
config/perception.yaml; this script plays the camera and the manipulator asking Locate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

from ros2_sab3r.msg import LocatedObject, PerceptionStatus
from ros2_sab3r.ros import qos
from ros2_sab3r.ros.conversions import rgb_to_image_fields
from ros2_sab3r.srv import Locate

ROOT = Path(__file__).resolve().parents[2]
_STATUS_NAMES = {LocatedObject.STATUS_FOUND: 'FOUND', LocatedObject.STATUS_NOT_FOUND: 'NOT_FOUND',
                 LocatedObject.STATUS_AMBIGUOUS: 'AMBIGUOUS'}


def _params_file() -> Path:
    for candidate in (ROOT / 'config' / 'perception.yaml',):
        if candidate.is_file():
            return candidate
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory('ros2_sab3r')) / 'config' / 'perception.yaml'


def _test_pattern(t: int, width: int = 512, height: int = 384) -> np.ndarray:
    """A moving colour pattern standing in for a camera (no scene generator is wired in yet)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127.5 * (1 + np.sin((x + 7 * t) / 23.0))
    g = 127.5 * (1 + np.sin((y - 5 * t) / 17.0))
    b = 127.5 * (1 + np.cos((x + y) / 31.0))
    return np.stack([r, g, b], axis=-1).astype(np.uint8)  # (H, W, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--frames', type=int, default=10, help='camera frames to publish')
    parser.add_argument('--queries', nargs='+', default=['dresser', 'chair', 'a unicorn'])
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error('--frames must be at least 1')

    print('ros2_sab3r demo: no checkpoint is configured and the mapping pipeline is not wired '
          'into the node yet, so this run exercises the node and its interfaces; it builds no '
          'map and every Locate answer says so.', flush=True)
    ns = f'/sab3r_demo_{os.getpid()}'
    log_dir = Path(tempfile.mkdtemp(prefix='sab3r-demo-'))
    node_log = log_dir / 'perception_node.log'
    with open(node_log, 'w', encoding='utf-8') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'ros2_sab3r.ros.perception_node', '--ros-args',
             '--params-file', str(_params_file()), '-r', f'__ns:={ns}',
             '-p', f'camera.image_topics:=[{ns}/camera/image_raw]',
             '-p', f'camera.camera_info_topics:=[{ns}/camera/camera_info]'],
            stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    node = rclpy.create_node('sab3r_demo_client')
    try:
        return _drive(node, ns, args, proc, node_log)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f'node log: {node_log}')


def _drive(node, ns: str, args, proc: subprocess.Popen, node_log: Path) -> int:
    image_pub = node.create_publisher(Image, f'{ns}/camera/image_raw', qos_profile_sensor_data)
    info_pub = node.create_publisher(CameraInfo, f'{ns}/camera/camera_info',
                                     qos_profile_sensor_data)
    status: list[PerceptionStatus] = []
    node.create_subscription(PerceptionStatus, f'{ns}/perception_node/status', status.append,
                             qos.STATUS)
    locate = node.create_client(Locate, f'{ns}/perception_node/locate')
    print('starting the perception node ...', flush=True)
    if not locate.wait_for_service(timeout_sec=60.0):
        print(f'the node did not come up; see {node_log}', file=sys.stderr)
        return 1
    deadline = time.monotonic() + 10.0
    while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)

    for t in range(args.frames):
        stamp = node.get_clock().now().to_msg()
        img = Image()
        img.header.stamp, img.header.frame_id = stamp, 'camera_optical_frame'
        img.height, img.width, img.step, data = rgb_to_image_fields(_test_pattern(t))
        img.encoding, img.data = 'rgb8', data
        info = CameraInfo(width=img.width, height=img.height)
        info.header = img.header
        info.k = [400.0, 0.0, img.width / 2, 0.0, 400.0, img.height / 2, 0.0, 0.0, 1.0]
        image_pub.publish(img)
        info_pub.publish(info)
        rclpy.spin_once(node, timeout_sec=0.1)
    print(f'published {args.frames} frames of {img.width}x{img.height} rgb8', flush=True)

    future = locate.call_async(Locate.Request(queries=args.queries, target_frame='base_link'))
    rclpy.spin_until_future_complete(node, future, timeout_sec=30.0)
    res = future.result()
    if res is None:
        print('Locate did not answer within 30 s', file=sys.stderr)
        return 1
    print(f'Locate {args.queries}: success={res.success} message="{res.message}"')
    for obj in res.objects:
        c = obj.centroid
        print(f'  {obj.query!r}: {_STATUS_NAMES.get(obj.status, obj.status)} score={obj.score:.2f}'
              f' at ({c.x:.2f}, {c.y:.2f}, {c.z:.2f}) m in {obj.header.frame_id}')
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not status:
        rclpy.spin_once(node, timeout_sec=0.1)
    if status:
        s = status[-1]
        print(f'status: state={s.state} frames received={s.frames_received} '
              f'processed={s.frames_processed} dropped={s.frames_dropped} voxels={s.voxels}')
    return 0 if proc.poll() is None else 1


if __name__ == '__main__':
    raise SystemExit(main())
