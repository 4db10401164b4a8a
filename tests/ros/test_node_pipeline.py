"""A synthetic scene replayed through the node running the ground-truth stand-in backend.

Checks what a robot integrator checks: Locate finds objects that are in the scene and answers
NOT_FOUND for one that is not, the semantic cloud and poses arrive in the map frame with the
frames' stamps, and a saved map answers the same after reset + load.
"""

from __future__ import annotations

from geometry_msgs.msg import PoseArray
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ros2_sab3r.config import PerceptionConfig
from ros2_sab3r.frames.decode import rgb_to_image_fields
from ros2_sab3r.msg import LocatedObject, PerceptionStatus
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import LoadMap, Locate, SaveMap

from .clouds import cloud_to_arrays
from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=40,width=256,height=192'
OVERLAY = f"""/**:
  ros__parameters:
    camera:
      image_topics: ['NS/cam/image_raw']
      camera_info_topics: ['NS/cam/camera_info']
      queue_size: 10
    model:
      backend: 'ros2_sab3r.sim.standin:SyntheticSceneBackend'
      standin_scene: '{SCENE}'
    publish:
      status_rate_hz: 10.0
      map_rate_hz: 5.0
"""


@pytest.fixture(scope='module')
def replayed(ros_node, tmp_path_factory):
    node_proc = NodeProcess(tmp_path_factory.mktemp('pipeline'), OVERLAY)
    scene, frames = SceneSpec.parse(SCENE).render()
    status: list[PerceptionStatus] = []
    clouds: list[PointCloud2] = []
    poses: list[PoseArray] = []
    subs = [
        ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status',
                                     status.append, qos.STATUS),
        ros_node.create_subscription(PointCloud2, f'{node_proc.name}/semantic_map',
                                     clouds.append, qos.LATCHED),
        ros_node.create_subscription(PoseArray, f'{node_proc.name}/keyframe_poses',
                                     poses.append, qos.LATCHED),
    ]
    image_pub = ros_node.create_publisher(Image, f'{node_proc.ns}/cam/image_raw', 10)
    info_pub = ros_node.create_publisher(CameraInfo, f'{node_proc.ns}/cam/camera_info', 10)
    assert spin_until(ros_node, lambda: image_pub.get_subscription_count() > 0
                      and status and status[-1].backend, timeout=60), node_proc.log()
    for i, f in enumerate(frames):
        img = Image(encoding='rgb8')
        img.header.stamp = messages.stamp_from_ns(f.stamp_ns)
        img.header.frame_id = 'cam_optical'
        img.height, img.width, img.step, img.data = rgb_to_image_fields(f.rgb)
        info = CameraInfo(header=img.header, width=img.width, height=img.height)
        info.k = [float(v) for v in f.K.ravel()]
        info_pub.publish(info)
        image_pub.publish(img)
        assert spin_until(ros_node, lambda i=i: status[-1].frames_processed
                          + status[-1].frames_dropped >= i + 1, timeout=60), node_proc.log()
    assert spin_until(ros_node, lambda: bool(clouds) and bool(poses), timeout=30)
    yield node_proc, scene, frames, status, clouds, poses
    for sub in subs:
        ros_node.destroy_subscription(sub)
    assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log(), node_proc.log()


def _answers(res) -> dict[str, list[LocatedObject]]:
    out: dict[str, list[LocatedObject]] = {}
    for obj in res.objects:
        out.setdefault(obj.query, []).append(obj)
    return out


def test_map_is_built_and_published(ros_node, replayed):
    node_proc, _, frames, status, clouds, poses = replayed
    s = status[-1]
    assert s.frames_processed == len(frames) and s.frames_dropped == 0
    assert s.map_ready and s.voxels > 1000 and s.keyframes_total >= 3
    assert s.backend.startswith('groundtruth (stand-in')
    cloud = clouds[-1]
    assert cloud.header.frame_id == 'map' and cloud.width > 1000
    stamps = {f.stamp_ns for f in frames}
    assert messages.ns_from_stamp(cloud.header.stamp) in stamps
    assert poses[-1].header.frame_id == 'map' and len(poses[-1].poses) >= 2
    xyz = cloud_to_arrays(cloud)
    assert np.isfinite(xyz['x']).all() and xyz['rgb'].shape == (cloud.width, 3)
    # publish.map_labels: a closed-set label and its score per voxel; the scene's walls and
    # floor are most of what the camera saw
    labels = list(PerceptionConfig().publish.map_labels)
    label, score = xyz['label'].astype(int), xyz['score']
    assert set(np.unique(label)) <= set(range(-1, len(labels)))
    assert ((score >= 0) & (score <= 1)).all()
    counts = np.bincount(label[label >= 0], minlength=len(labels))
    assert counts[labels.index('wall')] + counts[labels.index('floor')] > 0.3 * cloud.width


def test_locate_present_and_absent(ros_node, replayed):
    node_proc, scene, *_ = replayed
    present = scene.labels[:2]
    res = call(ros_node, Locate, f'{node_proc.name}/locate',
               Locate.Request(queries=[*present, 'refrigerator']))
    assert res.success, res.message
    answers = _answers(res)
    for label in present:
        best = answers[label][0]
        assert best.status != LocatedObject.STATUS_NOT_FOUND, (label, res.message)
        assert best.point_count > 10 and best.header.frame_id == 'map'
        assert min(best.box_size.x, best.box_size.y, best.box_size.z) > 0
    assert [(o.status, o.score) for o in answers['refrigerator']] == [
        (LocatedObject.STATUS_NOT_FOUND, 0.0)], res.message


def test_locate_points_only_on_request(ros_node, replayed):
    """Locate.srv version 4: objects carry their voxel centres only with include_points; the
    default reply has the same boxes and counts and is a fraction of the bytes."""
    node_proc, scene, *_ = replayed
    assert Locate.Request.INTERFACE_VERSION == 4
    queries = list(scene.labels[:2])
    slim = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=queries))
    full = call(ros_node, Locate, f'{node_proc.name}/locate',
                Locate.Request(queries=queries, include_points=True))
    assert slim.success and full.success, (slim.message, full.message)
    found = [o for o in full.objects if o.status != LocatedObject.STATUS_NOT_FOUND]
    assert found and all(o.points.width == o.point_count > 0 for o in found)
    assert all(o.points.width == 0 and not o.points.data for o in slim.objects)
    assert [(o.query, o.point_count, o.box_size) for o in slim.objects] == [
        (o.query, o.point_count, o.box_size) for o in full.objects]
    slim_bytes = sum(len(o.points.data) for o in slim.objects)
    full_bytes = sum(len(o.points.data) for o in full.objects)
    assert slim_bytes == 0 and full_bytes >= 16 * sum(o.point_count for o in found)


def test_locate_relevancy_mode_per_request(ros_node, replayed):
    node_proc, scene, *_ = replayed
    label = scene.labels[0]
    res = call(ros_node, Locate, f'{node_proc.name}/locate',
               Locate.Request(queries=[label], relevancy_mode='official'))
    assert res.success and 'official relevancy' in res.message, res.message
    assert res.objects[0].status != LocatedObject.STATUS_NOT_FOUND, res.message
    calibrated = call(ros_node, Locate, f'{node_proc.name}/locate',
                      Locate.Request(queries=[label, 'refrigerator']))
    assert 'calibrated relevancy' in calibrated.message
    # one reason per object, in words, for the found object and for the absent class alike
    assert len(calibrated.reasons) == len(calibrated.objects) >= 2
    assert all(calibrated.reasons), calibrated.reasons
    assert 'lerf relevancy' in call(ros_node, Locate, f'{node_proc.name}/locate',
                                    Locate.Request(queries=[label], relevancy_mode='lerf')).message
    bad = call(ros_node, Locate, f'{node_proc.name}/locate',
               Locate.Request(queries=[label], relevancy_mode='clip'))
    assert not bad.success and "relevancy_mode='clip' is not one of" in bad.message


def test_locate_publishes_markers_and_relevancy(ros_node, replayed):
    node_proc, scene, _, status, *_ = replayed
    markers: list[MarkerArray] = []
    relevancy: list[PointCloud2] = []
    subs = [ros_node.create_subscription(MarkerArray, f'{node_proc.name}/located_objects',
                                         markers.append, qos.LATCHED),
            ros_node.create_subscription(PointCloud2, f'{node_proc.name}/relevancy',
                                         relevancy.append, qos.LATCHED)]
    label = scene.labels[0]
    res = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=[label]))
    assert res.success, res.message
    best = res.objects[0]
    # published before the response: they may be here already, after a latched older answer
    assert spin_until(ros_node, lambda: markers and relevancy, timeout=20)
    spin_until(ros_node, lambda: False, timeout=1.0)
    for sub in subs:
        ros_node.destroy_subscription(sub)
    boxes = [m for m in markers[-1].markers if m.action == m.ADD]
    assert boxes and all(m.header.frame_id == 'map' for m in boxes)
    assert all(m.header.stamp == best.header.stamp for m in boxes)
    cloud = relevancy[-1]
    assert cloud.header.frame_id == 'map' and cloud.header.stamp == best.header.stamp
    assert cloud.width == status[-1].voxels
    fields = cloud_to_arrays(cloud)
    r = fields['relevancy']
    assert ((r >= 0) & (r <= 1)).all() and r.max() >= best.score - 1e-6
    # the located object's voxels are the relevant ones: those near its centroid score higher
    # than the map as a whole
    xyz = np.stack([fields['x'], fields['y'], fields['z']], 1)
    c = np.array([best.centroid.x, best.centroid.y, best.centroid.z])
    near = np.linalg.norm(xyz - c, axis=1) < 0.3
    assert near.any() and r[near].mean() > r.mean() + 0.2


def test_target_frame_without_tf_says_which_frame(ros_node, replayed):
    node_proc, scene, *_ = replayed
    res = call(ros_node, Locate, f'{node_proc.name}/locate',
               Locate.Request(queries=[scene.labels[0]], target_frame='base_link'))
    assert res.success
    assert "answered in 'map', not 'base_link'" in res.message
    assert res.objects[0].header.frame_id == 'map'


def test_save_reset_load_answers_the_same(ros_node, replayed, tmp_path):
    node_proc, scene, *_ = replayed
    name = node_proc.name
    query = Locate.Request(queries=[scene.labels[0]])
    before = call(ros_node, Locate, f'{name}/locate', query)
    path = tmp_path / 'map.npz'
    saved = call(ros_node, SaveMap, f'{name}/save_map', SaveMap.Request(path=str(path)))
    assert saved.success and saved.bytes == path.stat().st_size > 0, saved.message
    assert call(ros_node, Trigger, f'{name}/reset', Trigger.Request()).success
    empty = call(ros_node, Locate, f'{name}/locate', query)
    assert not empty.success and 'no map yet' in empty.message
    bad = tmp_path / 'corrupt.npz'
    bad.write_bytes(b'not a map')
    res = call(ros_node, LoadMap, f'{name}/load_map', LoadMap.Request(path=str(bad)))
    assert not res.success and 'current map kept' in res.message
    res = call(ros_node, LoadMap, f'{name}/load_map', LoadMap.Request(path=str(path)))
    assert res.success and res.bytes == saved.bytes, res.message
    after = call(ros_node, Locate, f'{name}/locate', query)
    assert after.success
    b, a = before.objects[0], after.objects[0]
    assert (a.status, a.point_count) == (b.status, b.point_count)
    assert a.score == pytest.approx(b.score, abs=1e-4)
    assert (a.centroid.x, a.centroid.y, a.centroid.z) == pytest.approx(
        (b.centroid.x, b.centroid.y, b.centroid.z), abs=1e-4)


POSED_OVERLAY = OVERLAY.replace('    publish:', """    frames:
      pose_source: 'tf'
    publish:""")


def test_posed_mode_maps_in_the_tf_world_frame(ros_node, tmp_path):
    """Camera poses from /tf at the image stamps: answers come back in world coordinates."""
    from std_msgs.msg import Header
    from tf2_msgs.msg import TFMessage

    node_proc = NodeProcess(tmp_path, POSED_OVERLAY)
    try:
        scene, frames = SceneSpec.parse(SCENE).render()
        status: list[PerceptionStatus] = []
        sub = ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status',
                                           status.append, qos.STATUS)
        image_pub = ros_node.create_publisher(Image, f'{node_proc.ns}/cam/image_raw', 10)
        tf_pub = ros_node.create_publisher(TFMessage, '/tf', 100)
        assert spin_until(ros_node, lambda: image_pub.get_subscription_count() > 0
                          and tf_pub.get_subscription_count() > 0
                          and status and status[-1].backend, timeout=60), node_proc.log()
        for i, f in enumerate(frames):
            header = Header(stamp=messages.stamp_from_ns(f.stamp_ns), frame_id='map')
            tf_pub.publish(TFMessage(transforms=[
                messages.transform_from_matrix(header, 'cam_optical', f.T_WC)]))
            spin_until(ros_node, lambda: False, timeout=0.02)
            img = Image(encoding='rgb8')
            img.header = Header(stamp=header.stamp, frame_id='cam_optical')
            img.height, img.width, img.step, img.data = rgb_to_image_fields(f.rgb)
            image_pub.publish(img)
            assert spin_until(ros_node, lambda i=i: status[-1].frames_processed
                              + status[-1].frames_dropped >= i + 1, timeout=60), node_proc.log()
        assert status[-1].map_ready, node_proc.log()
        truth = {o.label: o for o in scene.objects}
        label = scene.labels[0]
        res = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=[label]))
        assert res.success, res.message
        best = res.objects[0]
        assert best.status != LocatedObject.STATUS_NOT_FOUND
        c = np.array([best.centroid.x, best.centroid.y, best.centroid.z])
        # the map can only hold the observed surface; the box centre of the object is within
        # half its size of it
        assert np.linalg.norm(c - truth[label].centroid) < 0.5 * np.linalg.norm(
            truth[label].box.size), (c, truth[label].centroid)
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log()
