"""Unposed mode publishes TF the REP-105 way (issue 13, finding 9), in an upright map frame.

With the robot's TF giving the camera in `odom`, the node publishes map -> odom (the camera
keeps its one parent) and Locate answers in the camera's frame through the tree; without it,
map -> frames.estimate_frame. Never map -> the camera's own frame. The published map frame is
upright (z against gravity): gravity from odom when TF has it (map -> odom then turns about z
only), else from the map's floor plane (frames/upright.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import Locate

from . import test_node_robustness as robust
from .clouds import cloud_to_arrays
from .rosgraph import NodeProcess, call, publish_until, spin_until
from .test_node_parameters import param_set

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=12,width=160,height=120'


@pytest.mark.parametrize('robot_tf', [True, False], ids=['odom_to_camera', 'no_robot_tf'])
def test_unposed_tf_never_gives_the_camera_a_second_parent(ros_node, tmp_path, robot_tf):
    node_proc = NodeProcess(tmp_path, robust._overlay(SCENE, queue_size=10))
    seen: list[tuple[str, str, np.ndarray]] = []
    stamps: list[int] = []
    clouds: list[PointCloud2] = []

    def on_tf(msg: TFMessage) -> None:
        for tf in msg.transforms:
            seen.append((tf.header.frame_id, tf.child_frame_id,
                         messages.matrix_from_transform(tf)))
            stamps.append(messages.ns_from_stamp(tf.header.stamp))

    tf_sub = ros_node.create_subscription(TFMessage, '/tf', on_tf, 100)
    map_sub = ros_node.create_subscription(PointCloud2, f'{node_proc.name}/semantic_map',
                                           clouds.append, qos.LATCHED)
    static_pub = ros_node.create_publisher(TFMessage, '/tf_static', qos.LATCHED_TF)
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        T_OC = np.eye(4)
        T_OC[:3, 3] = (0.5, -0.2, 1.0)  # the robot's odom -> camera, fixed for the test
        if robot_tf:
            header = Header(frame_id='odom')
            static_pub.publish(TFMessage(transforms=[
                messages.transform_from_matrix(header, 'cam_optical', T_OC)]))
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])
        robust._feed(ros_node, node_proc, pub, [robust._image(f) for f in frames], status)
        assert spin_until(ros_node, lambda: status[-1].keyframes_total >= 2 and seen,
                          timeout=30), node_proc.log()
        children = {child for parent, child, _ in seen if parent == 'map'}
        assert 'cam_optical' not in children, seen  # never a second parent
        assert children == ({'odom'} if robot_tf else {'sab3r_camera'}), children
        answer = call(ros_node, Locate, f'{node_proc.name}/locate',
                      Locate.Request(queries=['bed'], target_frame='cam_optical'))
        assert answer.success, answer.message
        if robot_tf:  # the tree map -> odom -> cam_optical answers in the camera's frame
            assert "in frame 'cam_optical'" in answer.message, answer.message
        # upright: odom's z is the map's z (map -> odom turns about z only); without TF the
        # world's up (the scene's ground truth) is the map's z, from the floor estimate
        by_stamp = {f.stamp_ns: f for f in frames}
        for (_, child, T), stamp in zip(seen, stamps):
            if child == 'odom':
                np.testing.assert_allclose(T[:3, 2], [0, 0, 1], atol=1e-6)
            elif child == 'sab3r_camera':
                up_C = by_stamp[stamp].T_WC[:3, :3].T @ [0.0, 0.0, 1.0]
                tilt = np.degrees(np.arccos(np.clip((T[:3, :3] @ up_C)[2], -1, 1)))
                assert tilt < 2.0, tilt
        if not robot_tf:  # the floor (world z = 0) is flat in the published cloud
            assert spin_until(ros_node, lambda: bool(clouds), timeout=20)
            z = cloud_to_arrays(clouds[-1])['z']
            floor_z = np.percentile(z, 2)  # the floor is the lowest large surface
            assert np.mean(np.abs(z - floor_z) < 0.03) > 0.2, np.percentile(z, [1, 5, 50])
        ros_node.destroy_subscription(sub)
    finally:
        ros_node.destroy_subscription(tf_sub)
        ros_node.destroy_subscription(map_sub)
        ros_node.destroy_publisher(static_pub)
        assert node_proc.stop() == 0, node_proc.log()


def test_posed_mode_waits_frames_tf_timeout_s_for_a_late_transform(ros_node, tmp_path):
    """frames.tf_timeout_s is how long a frame waits for its TF (which often comes after the
    image): the transform comes 1 s late, so 0.3 s skips the frame and 5 s (set live) maps it.
    A value ignored, whatever it is replaced by, fails one of the two halves."""
    overlay = robust._overlay(SCENE, queue_size=10) + (
        "    frames:\n      pose_source: 'tf'\n      tf_timeout_s: 0.3\n")
    node_proc = NodeProcess(tmp_path, overlay)
    tf_pub = ros_node.create_publisher(TFMessage, '/tf', 100)
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])

        def send_then_tf(f) -> None:
            """The image until the node has it, its transform 1 s later."""
            received = status[-1].frames_received
            assert publish_until(
                ros_node, pub, lambda: robust._image(f),
                lambda: status[-1].frames_received > received, timeout=30,
                period=3.0), node_proc.log()
            spin_until(ros_node, lambda: False, timeout=1.0)
            header = Header(frame_id='map', stamp=messages.stamp_from_ns(f.stamp_ns))
            tf_pub.publish(TFMessage(transforms=[
                messages.transform_from_matrix(header, 'cam_optical', f.T_WC)]))

        send_then_tf(frames[0])
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=20)
        spin_until(ros_node, lambda: False, timeout=0.5)
        assert status[-1].keyframes_total == 0, status[-1]  # skipped after 0.3 s
        assert 'waited frames.tf_timeout_s = 0.3 s' in node_proc.log(), node_proc.log()

        assert param_set(ros_node, node_proc, 'frames.tf_timeout_s', 5.0) == (True, '')
        send_then_tf(frames[1])
        assert spin_until(ros_node, lambda: robust._settled(status)
                          and status[-1].keyframes_total == 1, timeout=20), (
            status[-1], node_proc.log())
        assert node_proc.log().count('waited frames.tf_timeout_s') == 1, node_proc.log()
        ros_node.destroy_subscription(sub)
    finally:
        ros_node.destroy_publisher(tf_pub)
        assert node_proc.stop() == 0, node_proc.log()
