"""`make demo`: replay a synthetic scene through the perception node and ask it where things are.

The node runs as its own process (as `ros2 run ros2_sab3r perception_node` would start it) with
config/perception.yaml; this script plays the camera and the manipulator asking Locate, then saves
the map and draws the published one (~/semantic_map, upright) from above with the answers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import numpy as np
import rclpy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from ros2_sab3r.frames.decode import rgb_to_image_fields
from ros2_sab3r.msg import LocatedObject, PerceptionStatus
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.ros.process import params_file, stop_process
from ros2_sab3r.srv import Locate

_STATUS_NAMES = {LocatedObject.STATUS_FOUND: 'FOUND', LocatedObject.STATUS_NOT_FOUND: 'NOT_FOUND',
                 LocatedObject.STATUS_AMBIGUOUS: 'AMBIGUOUS'}


STANDIN = 'ros2_sab3r.sim.standin:SyntheticSceneBackend'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--checkpoint', default='',
                        help='SAB3R checkpoint for the real network; empty: the stand-in backend')
    parser.add_argument('--backend', default='torch', help='backend used with --checkpoint')
    parser.add_argument('--scene', default='seed=0,frames=40,width=256,height=192',
                        help='synthetic scene replayed as the camera (as model.standin_scene)')
    parser.add_argument('--queries', nargs='+', default=None,
                        help='Locate queries (default: two objects in the scene, one absent)')
    parser.add_argument('--text-encoder', default='',
                        help='model.text_encoder for --checkpoint (default: beside it)')
    parser.add_argument('--param', action='append', default=[], metavar='NAME:=VALUE',
                        help='extra node parameter, e.g. --param model.image_width:=512')
    parser.add_argument('--out', default='', help='folder for the saved map and the picture')
    args = parser.parse_args(argv)
    for item in args.param:
        if ':=' not in item:
            parser.error(f'--param {item!r}: write NAME:=VALUE, e.g. model.dtype:=bf16')
    from ros2_sab3r.sim.standin import SceneSpec

    try:
        spec = SceneSpec.parse(args.scene)
    except ValueError as err:
        parser.error(str(err))
    if args.checkpoint:
        model_params = [f'model.backend:={args.backend}', f'model.checkpoint:={args.checkpoint}']
        print(f'ros2_sab3r demo: the {args.backend} backend runs {args.checkpoint} on a '
              'synthetic scene.')
    else:
        model_params = [f'model.backend:={STANDIN}', f'model.standin_scene:={spec.text()}']
        print('ros2_sab3r demo: NO CHECKPOINT CONFIGURED, so the node runs the ground-truth '
              "STAND-IN backend (answers come from the synthetic scene's ground truth, not "
              'from SAB3R); pass --checkpoint FILE to run the real network.', flush=True)
    out = Path(args.out or tempfile.mkdtemp(prefix='sab3r-demo-'))
    out.mkdir(parents=True, exist_ok=True)
    ns = f'/sab3r_demo_{os.getpid()}'
    node_log = out / 'perception_node.log'
    cmd = [sys.executable, '-m', 'ros2_sab3r.ros.perception_node', '--ros-args',
           '--params-file', str(params_file()), '-r', f'__ns:={ns}',
           '-p', f'camera.image_topics:=[{ns}/camera/image_raw]',
           '-p', f'camera.camera_info_topics:=[{ns}/camera/camera_info]',
           '-p', 'camera.queue_size:=10']
    for item in model_params:
        cmd += ['-p', item]
    if args.text_encoder:
        cmd += ['-p', f'model.text_encoder:={args.text_encoder}']
    for item in args.param:
        cmd += ['-p', item]
    with open(node_log, 'w', encoding='utf-8') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    node = rclpy.create_node('sab3r_demo_client')
    try:
        return _drive(node, ns, spec, args.queries, out, proc, node_log)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_process(proc)
        print(f'node log: {node_log}')


def _call(node, client, request, timeout: float = 60.0):
    future = client.call_async(request)
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    return future.result()


def _drive(node, ns: str, spec, queries, out: Path, proc, node_log: Path) -> int:
    from ros2_sab3r.srv import SaveMap

    scene, frames = spec.render()
    present = scene.labels
    queries = queries or [present[0], present[len(present) // 2], 'refrigerator']
    image_pub = node.create_publisher(Image, f'{ns}/camera/image_raw', 10)
    info_pub = node.create_publisher(CameraInfo, f'{ns}/camera/camera_info', 10)
    status: list[PerceptionStatus] = []
    node.create_subscription(PerceptionStatus, f'{ns}/perception_node/status', status.append,
                             qos.STATUS)
    clouds: list[PointCloud2] = []
    node.create_subscription(PointCloud2, f'{ns}/perception_node/semantic_map', clouds.append,
                             qos.LATCHED)
    locate = node.create_client(Locate, f'{ns}/perception_node/locate')
    save = node.create_client(SaveMap, f'{ns}/perception_node/save_map')
    print('starting the perception node ...', flush=True)
    if not locate.wait_for_service(timeout_sec=60.0):
        print(f'the node did not come up; see {node_log}', file=sys.stderr)
        return 1
    deadline = time.monotonic() + 10.0
    while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)

    for i, f in enumerate(frames):
        img = Image()
        img.header.stamp = messages.stamp_from_ns(f.stamp_ns)
        img.header.frame_id = 'camera_optical_frame'
        img.height, img.width, img.step, data = rgb_to_image_fields(f.rgb)
        img.encoding, img.data = 'rgb8', data
        info = CameraInfo(header=img.header, width=img.width, height=img.height)
        info.k = [float(v) for v in f.K.ravel()]
        info_pub.publish(info)
        image_pub.publish(img)
        # pace the camera to what the node digests (a real camera would just drop frames)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
            s = status[-1] if status else None
            if s is not None and s.frames_processed + s.frames_dropped >= i + 1:
                break
        if (i + 1) % 10 == 0 or i + 1 == len(frames):
            print(f'replayed {i + 1}/{len(frames)} frames', flush=True)
    s = status[-1] if status else None
    if s is not None:
        print(f'status: frames processed={s.frames_processed} dropped={s.frames_dropped} '
              f'keyframes={s.keyframes_total} voxels={s.voxels} backend="{s.backend}"')

    res = _call(node, locate, Locate.Request(queries=queries))
    if res is None:
        print('Locate did not answer', file=sys.stderr)
        return 1
    print(f'Locate {queries}: success={res.success} "{res.message}"')
    for obj in res.objects:
        c = obj.centroid
        line = (f'  {obj.query!r}: {_STATUS_NAMES.get(obj.status, obj.status)} '
                f'score={obj.score:.2f}')
        if obj.status != LocatedObject.STATUS_NOT_FOUND:
            line += f' at ({c.x:+.2f}, {c.y:+.2f}, {c.z:+.2f}) m in {obj.header.frame_id}'
        print(line)
    map_path = out / 'semantic_map.npz'
    saved = _call(node, save, SaveMap.Request(path=str(map_path)))
    if saved is not None:
        print(f'save_map: success={saved.success} "{saved.message}" ({saved.bytes} bytes)')
    picture = out / 'semantic_map_top.png'
    deadline = time.monotonic() + 10.0  # the map topic's next publication
    while not clouds and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    try:
        if not clouds:
            raise ValueError('no map received on ~/semantic_map')
        _render_top_down(clouds[-1], res.objects, picture)
        print(f'top-down picture of the map: {picture}')
    except (OSError, ValueError, KeyError) as err:
        print(f'no picture: {err}')
    return 0 if proc.poll() is None and res.success else 1


def _cloud_xy_rgb(cloud: PointCloud2) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) x, y and (N, 3) colours in [0, 1] of a ~/semantic_map cloud (x y z rgb ...)."""
    offsets = {f.name: f.offset for f in cloud.fields}
    n = cloud.width * cloud.height
    row = np.frombuffer(bytes(cloud.data), np.uint8).reshape(n, cloud.point_step)

    def field(name: str, dtype) -> np.ndarray:
        o = offsets[name]
        return np.ascontiguousarray(row[:, o:o + 4]).view(dtype).reshape(n)

    xy = np.stack([field('x', np.float32), field('y', np.float32)], 1)
    packed = field('rgb', np.uint32)
    rgb = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], 1) / 255.0
    return xy, rgb


def _render_top_down(cloud: PointCloud2, objects, picture: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    xy, rgb = _cloud_xy_rgb(cloud)
    fig, ax = plt.subplots(figsize=(7, 7))
    # the published map frame is upright (z against gravity): top-down = x-y
    ax.scatter(xy[:, 0], xy[:, 1], s=1, c=rgb)
    for obj in objects:
        if obj.status == LocatedObject.STATUS_NOT_FOUND:
            continue
        ax.plot(obj.centroid.x, obj.centroid.y, 'r+', ms=14, mew=2)
        ax.annotate(f'{obj.query} {obj.score:.2f}', (obj.centroid.x, obj.centroid.y),
                    color='red')
    ax.set_xlabel('x (m)')
    ax.set_ylabel('y (m)')
    ax.set_aspect('equal')
    ax.set_title('semantic map, top-down, with Locate answers')
    fig.savefig(picture, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    raise SystemExit(main())
