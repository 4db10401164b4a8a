"""The perception node in its own process, driven through a real rclpy graph.

The node is started as users start it (``--ros-args --params-file config/perception.yaml``, plus a
small overlay naming test topics) and talked to with the custom service types.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import uuid

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy wheels are installed by scripts/bootstrap.sh')

from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from ros2_sab3r.msg import LocatedObject, PerceptionStatus  # noqa: E402
from ros2_sab3r.ros import qos  # noqa: E402
from ros2_sab3r.srv import LoadMap, Locate, SaveMap  # noqa: E402

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / 'config' / 'perception.yaml'


class NodeProcess:
    """The node started as `python -m ros2_sab3r.ros.perception_node --ros-args ...`."""

    def __init__(self, tmp_path: Path, overlay: str, name: str = 'perception_node') -> None:
        self.ns = f'/t{uuid.uuid4().hex[:8]}'
        self.name = f'{self.ns}/{name}'
        overlay_file = tmp_path / 'overlay.yaml'
        overlay_file.write_text(overlay.replace('NS', self.ns), encoding='utf-8')
        self.log_path = tmp_path / 'node.log'
        self._log = open(self.log_path, 'w', encoding='utf-8')  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'ros2_sab3r.ros.perception_node', '--ros-args',
             '--params-file', str(PARAMS), '--params-file', str(overlay_file),
             '-r', f'__ns:={self.ns}'],
            stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=ROOT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding='utf-8')

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


OVERLAY = """/**:
  ros__parameters:
    camera:
      image_topics: ['NS/cam/image_raw']
      camera_info_topics: ['NS/cam/camera_info']
    publish:
      status_rate_hz: 10.0
"""


@pytest.fixture(scope='module')
def ros_node():
    rclpy.init()
    node = rclpy.create_node(f'test_client_{uuid.uuid4().hex[:6]}')
    yield node
    node.destroy_node()
    rclpy.shutdown()


def call(node, srv_type, name: str, request, timeout: float = 20.0):
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f'service {name} never appeared'
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        assert future.done(), f'{name} did not answer within {timeout} s'
        return future.result()
    finally:
        node.destroy_client(client)


def spin_until(node, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if predicate():
            return True
    return False


def publish_until(node, pub, make_msg: Callable[[], object], predicate: Callable[[], bool],
                  timeout: float = 20.0, period: float = 0.2) -> bool:
    """Best-effort topics lose messages sent before both ends matched: resend until seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(make_msg())
        if spin_until(node, predicate, timeout=period):
            return True
    return False


def make_image(node, encoding: str = 'rgb8', width: int = 64, height: int = 48,
               step: int | None = None, nbytes: int | None = None) -> Image:
    channels = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, 'yuv422': 2}[encoding]
    msg = Image()
    msg.header.stamp = node.get_clock().now().to_msg()
    msg.header.frame_id = 'camera_color_optical_frame'
    msg.encoding, msg.width, msg.height = encoding, width, height
    msg.step = width * channels if step is None else step
    msg.data = bytes(range(256)) * ((msg.step * height if nbytes is None else nbytes) // 256 + 1)
    msg.data = msg.data[:msg.step * height if nbytes is None else nbytes]
    return msg


@pytest.fixture(scope='module')
def running(ros_node, tmp_path_factory):
    node_proc = NodeProcess(tmp_path_factory.mktemp('node'), OVERLAY)
    yield node_proc
    rc = node_proc.stop()
    assert rc == 0, f'node exited with {rc} on SIGINT:\n{node_proc.log()}'
    assert 'Traceback' not in node_proc.log(), node_proc.log()


class StatusWatcher:
    def __init__(self, node, name: str) -> None:
        self.latest: PerceptionStatus | None = None
        self.sub = node.create_subscription(PerceptionStatus, f'{name}/status', self._cb,
                                            qos.STATUS)

    def _cb(self, msg: PerceptionStatus) -> None:
        self.latest = msg


def test_locate_says_truthfully_that_there_is_no_map(ros_node, running):
    pub = ros_node.create_publisher(Image, f'{running.ns}/cam/image_raw',
                                    qos_profile_sensor_data)
    status = StatusWatcher(ros_node, running.name)
    assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0), running.log()
    assert publish_until(ros_node, pub, lambda: make_image(ros_node),
                         lambda: status.latest is not None
                         and status.latest.frames_received >= 1), running.log()
    assert status.latest.state == 'active'

    res = call(ros_node, Locate, f'{running.name}/locate',
               Locate.Request(queries=['dresser'], target_frame='base_link'))
    assert res.success is False
    assert 'no map yet' in res.message
    assert list(res.objects) == []
    ros_node.destroy_publisher(pub)
    ros_node.destroy_subscription(status.sub)


@pytest.mark.parametrize('request_kwargs, expected', [
    ({'queries': []}, 'queries is empty'),
    ({'queries': ['  ']}, 'blank'),
    ({'queries': ['chair'], 'min_score': 1.5}, 'min_score'),
    ({'queries': ['chair'], 'top_k': -1}, 'top_k'),
    ({'queries': ['q'] * 65}, 'at most 64'),
])
def test_bad_locate_requests_get_a_reason(ros_node, running, request_kwargs, expected):
    res = call(ros_node, Locate, f'{running.name}/locate', Locate.Request(**request_kwargs))
    assert res.success is False
    assert res.message.startswith('bad request') and expected in res.message


def test_unicode_query_is_accepted_as_a_request(ros_node, running):
    res = call(ros_node, Locate, f'{running.name}/locate',
               Locate.Request(queries=['commode à tiroirs', '衣柜']))
    assert res.success is False and 'no map yet' in res.message


def test_bad_frames_are_dropped_counted_and_logged(ros_node, running):
    pub = ros_node.create_publisher(Image, f'{running.ns}/cam/image_raw',
                                    qos_profile_sensor_data)
    info_pub = ros_node.create_publisher(CameraInfo, f'{running.ns}/cam/camera_info',
                                         qos_profile_sensor_data)
    status = StatusWatcher(ros_node, running.name)
    assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0
                      and status.latest is not None)
    # Each kind of bad frame is resent until the node has logged it (best effort may drop some).
    bad = {
        "unsupported image encoding 'yuv422'": lambda: make_image(ros_node, 'yuv422'),
        'step 100 is smaller': lambda: make_image(ros_node, step=100),
        'data has 17 bytes': lambda: make_image(ros_node, nbytes=17),
        'empty image': lambda: make_image(ros_node, width=0, height=0),
    }
    for expected, make in bad.items():
        before = status.latest.frames_dropped
        assert publish_until(ros_node, pub, make,
                             lambda b=before: status.latest.frames_dropped > b), running.log()
        assert expected in running.log()
    info = CameraInfo(width=64, height=48)
    info.k = [float('nan')] * 9
    # still alive and serving
    res = call(ros_node, Locate, f'{running.name}/locate', Locate.Request(queries=['bed']))
    assert 'no map yet' in res.message
    assert publish_until(ros_node, info_pub, lambda: info,
                         lambda: 'CameraInfo' in running.log()
                         and 'non-finite' in running.log())
    assert running.proc.poll() is None


def test_save_load_reset_without_a_map(ros_node, running, tmp_path):
    target = tmp_path / 'map.npz'
    res = call(ros_node, SaveMap, f'{running.name}/save_map', SaveMap.Request(path=str(target)))
    assert res.success is False and res.bytes == 0 and 'no map yet' in res.message
    assert not target.exists()
    res = call(ros_node, LoadMap, f'{running.name}/load_map',
               LoadMap.Request(path=str(tmp_path / 'missing.npz')))
    assert res.success is False and 'does not exist' in res.message
    res = call(ros_node, Trigger, f'{running.name}/reset', Trigger.Request())
    assert res.success is True


def test_located_object_constants_and_fields():
    obj = LocatedObject()
    assert {obj.STATUS_FOUND, obj.STATUS_NOT_FOUND, obj.STATUS_AMBIGUOUS} == {0, 1, 2}
    for name in ('query', 'label', 'score', 'status', 'centroid', 'box_center', 'box_size',
                 'point_count', 'last_seen', 'points', 'header'):
        assert hasattr(obj, name), name


def test_invalid_parameters_fail_configure_but_keep_the_node_up(ros_node, tmp_path):
    bad = OVERLAY.replace("camera_info_topics: ['NS/cam/camera_info']",
                          "camera_info_topics: ['NS/a', 'NS/b']")
    node_proc = NodeProcess(tmp_path, bad)
    try:
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert spin_until(ros_node, lambda: 'invalid configuration' in node_proc.log())
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        assert 'one per image topic' in node_proc.log()
        assert node_proc.proc.poll() is None
    finally:
        assert node_proc.stop() == 0, node_proc.log()


def test_lifecycle_driven_by_a_manager(ros_node, tmp_path):
    overlay = OVERLAY + '    node:\n      autostart: false\n'
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            res = call(ros_node, ChangeState, f'{node_proc.name}/change_state',
                       ChangeState.Request(transition=Transition(id=transition)))
            assert res.success, node_proc.log()
        res = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=['x']))
        assert 'no map yet' in res.message
        for transition in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP):
            res = call(ros_node, ChangeState, f'{node_proc.name}/change_state',
                       ChangeState.Request(transition=Transition(id=transition)))
            assert res.success, node_proc.log()
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log()
