"""Pipeline values <-> ROS messages, without a ROS graph."""

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from std_msgs.msg import Header

from ros2_sab3r import types
from ros2_sab3r.msg import LocatedObject
from ros2_sab3r.ros import messages

from .clouds import cloud_to_arrays

pytestmark = pytest.mark.ros


def test_cloud_round_trip():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    score = rng.random(50).astype(np.float32)
    msg = messages.arrays_to_cloud(Header(frame_id='map'), X, rgb, {'score': score})
    assert [f.name for f in msg.fields] == ['x', 'y', 'z', 'rgb', 'score']
    assert msg.point_step == 20 and msg.row_step == 20 * 50 and len(msg.data) == 1000
    out = cloud_to_arrays(msg)
    np.testing.assert_array_equal(np.stack([out['x'], out['y'], out['z']], 1), X)
    np.testing.assert_array_equal(out['rgb'], rgb)
    np.testing.assert_array_equal(out['score'], score)


def test_rgb_packing_matches_pcl_layout():
    packed = messages.pack_rgb(np.array([[255, 128, 1]], np.uint8))
    assert packed.view(np.uint32)[0] == 0xFF8001


def test_empty_cloud_and_bad_field_length():
    msg = messages.arrays_to_cloud(Header(), np.zeros((0, 3)))
    assert msg.width == 0 and len(msg.data) == 0
    with pytest.raises(ValueError, match='has 2 values for 3 points'):
        messages.arrays_to_cloud(Header(), np.zeros((3, 3)), extra={'score': [1, 2]})


def _found(query='dresser'):
    box = types.OrientedBox(center=np.array([1.0, 2.0, 0.5]),
                            quat_xyzw=Rotation.from_euler('z', 30, degrees=True).as_quat(),
                            size=np.array([0.8, 0.4, 1.0]))
    return types.LocatedObject(
        query=query, label=query, status=types.LocateStatus.FOUND, score=0.83,
        centroid=np.array([1.0, 2.0, 0.5]), box=box,
        points=np.array([[1.0, 2.0, 0.5], [1.1, 2.0, 0.4]], np.float32),
        colors=np.array([[10, 20, 30], [40, 50, 60]], np.uint8), last_seen_ns=3_500_000_000)


def test_located_object_message():
    header = Header(frame_id='map')
    msg = messages.located_to_msg(_found(), header, include_points=True)
    assert msg.status == LocatedObject.STATUS_FOUND and msg.point_count == 2
    assert (msg.centroid.x, msg.centroid.y, msg.centroid.z) == (1.0, 2.0, 0.5)
    q = msg.box_center.orientation
    angle = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_euler('xyz', degrees=True)
    np.testing.assert_allclose(angle, [0, 0, 30], atol=1e-9)
    assert (msg.last_seen.sec, msg.last_seen.nanosec) == (3, 500_000_000)
    assert msg.points.header.frame_id == 'map' and msg.points.width == 2
    # Locate's default (include_points false): the count stays, the cloud is empty
    slim = messages.located_to_msg(_found(), header)
    assert slim.point_count == 2 and slim.points.width == 0 and len(slim.points.data) == 0
    not_found = types.LocatedObject(query='unicorn', label='unicorn',
                                    status=types.LocateStatus.NOT_FOUND, score=0.0)
    msg = messages.located_to_msg(not_found, header)
    assert msg.status == LocatedObject.STATUS_NOT_FOUND and msg.point_count == 0


def test_markers_skip_not_found_and_label_found():
    header = Header(frame_id='map')
    objs = [messages.located_to_msg(_found(), header),
            messages.located_to_msg(types.LocatedObject(
                query='unicorn', label='unicorn', status=types.LocateStatus.NOT_FOUND, score=0.0),
                header)]
    markers = messages.located_markers(objs).markers
    assert markers[0].action == markers[0].DELETEALL
    assert len(markers) == 3
    assert markers[2].text == 'dresser 0.83'


def test_pose_matrix_round_trip():
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', [10, -20, 30], degrees=True).as_matrix()
    T[:3, 3] = [1, 2, 3]
    arr, path = messages.poses_to_msgs(Header(frame_id='map'), [T, np.eye(4)])
    p = arr.poses[0]
    R = Rotation.from_quat([p.orientation.x, p.orientation.y, p.orientation.z,
                            p.orientation.w]).as_matrix()
    np.testing.assert_allclose(R, T[:3, :3], atol=1e-12)
    assert len(path.poses) == 2 and path.poses[0].header.frame_id == 'map'


def test_transform_round_trip():
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', [5, 40, -70], degrees=True).as_matrix()
    T[:3, 3] = [-1, 0.5, 2]
    tf = messages.transform_from_matrix(Header(frame_id='map'), 'cam', T)
    assert tf.child_frame_id == 'cam'
    np.testing.assert_allclose(messages.matrix_from_transform(tf), T, atol=1e-12)


def test_locate_request_becomes_a_locate_query():
    from ros2_sab3r.srv import Locate

    request = Locate.Request(queries=['red mug', 'dresser'], negatives=['floor'], top_k=3,
                             min_score=0.5, target_frame='base_link', relevancy_mode='official')
    q = messages.locate_query_from_request(request)
    assert q == types.LocateQuery(queries=('red mug', 'dresser'), negatives=('floor',), top_k=3,
                                  min_score=0.5, relevancy_mode='official')
    assert messages.locate_query_from_request(Locate.Request()).relevancy_mode == ''


@pytest.mark.parametrize(('path', 'interface'), [('srv/Locate.srv', 'Locate'),
                                                 ('msg/PerceptionStatus.msg', 'PerceptionStatus')])
def test_interface_version_constant_matches_its_file_and_the_readme(path, interface):
    """One version per interface: the generated constant, the file's header and the README."""
    import re

    from ros2_sab3r.msg import PerceptionStatus
    from ros2_sab3r.srv import Locate

    root = Path(__file__).resolve().parents[2]
    version = {'Locate': Locate.Request, 'PerceptionStatus': PerceptionStatus}[
        interface].INTERFACE_VERSION
    header = (root / path).read_text(encoding='utf-8').splitlines()[:2]
    assert re.search(rf'Interface version {version}\b', ' '.join(header)), header
    readme = (root / 'README.md').read_text(encoding='utf-8')
    assert f'`{path}` (version {version})' in readme or (
        f'`{path}` on `~/status` (version {version})' in readme), (path, version)
