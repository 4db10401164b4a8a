"""The perception node in its own process, driven through a real rclpy graph.

The node is started as users start it (``--ros-args --params-file config/perception.yaml``, plus a
small overlay naming test topics and `model.backend: none`, the explicit way to run without a
network) and talked to with the custom service types.
"""

from __future__ import annotations

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger

from ros2_sab3r.msg import LocatedObject, PerceptionStatus
from ros2_sab3r.ros import qos
from ros2_sab3r.srv import LoadMap, Locate, SaveMap

from .rosgraph import NodeProcess, call, publish_until, spin_until

pytestmark = pytest.mark.ros

OVERLAY = """/**:
  ros__parameters:
    camera:
      image_topics: ['NS/cam/image_raw']
      camera_info_topics: ['NS/cam/camera_info']
    model:
      backend: 'none'
    publish:
      status_rate_hz: 10.0
"""


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
    ({'queries': []}, 'no queries given'),
    ({'queries': ['  ']}, 'queries[0] is empty'),
    ({'queries': ['chair'], 'min_score': 1.5}, 'min_score'),
    ({'queries': ['chair'], 'top_k': -1}, 'top_k'),
    ({'queries': ['q'] * 65}, 'more than query.max_queries=64'),
    ({'queries': ['chair'], 'negatives': ['']}, 'negatives[0] is empty'),
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
        # Wait for this kind's own log line: a late resend of the previous kind can raise the
        # dropped count first (seen on a loaded machine).
        assert publish_until(ros_node, pub, make,
                             lambda b=before, e=expected: status.latest.frames_dropped > b
                             and e in running.log()), running.log()
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


def test_out_of_range_parameter_keeps_the_node_up_and_names_it(ros_node, tmp_path):
    bad = OVERLAY.replace("camera_info_topics: ['NS/cam/camera_info']",
                          "camera_info_topics: ['NS/cam/camera_info']\n      queue_size: 500")
    assert 'queue_size: 500' in bad
    node_proc = NodeProcess(tmp_path, bad)
    try:
        assert spin_until(ros_node, lambda: 'invalid parameters' in node_proc.log()
                          or node_proc.proc.poll() is not None, timeout=60), node_proc.log()
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        assert 'camera.queue_size' in node_proc.log() and node_proc.proc.poll() is None
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log()


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
