"""Unposed mode publishes TF the REP-105 way (issue 13, finding 9).

With the robot's TF giving the camera in `odom`, the node publishes map -> odom (the camera
keeps its one parent) and Locate answers in the camera's frame through the tree; without it,
map -> frames.estimate_frame. Never map -> the camera's own frame.
"""

from __future__ import annotations

import numpy as np
import pytest
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import Locate

from . import test_node_robustness as robust
from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=12,width=160,height=120'


@pytest.mark.parametrize('robot_tf', [True, False], ids=['odom_to_camera', 'no_robot_tf'])
def test_unposed_tf_never_gives_the_camera_a_second_parent(ros_node, tmp_path, robot_tf):
    node_proc = NodeProcess(tmp_path, robust._overlay(SCENE, queue_size=10))
    seen: list[tuple[str, str, np.ndarray]] = []

    def on_tf(msg: TFMessage) -> None:
        for tf in msg.transforms:
            seen.append((tf.header.frame_id, tf.child_frame_id,
                         messages.matrix_from_transform(tf)))

    tf_sub = ros_node.create_subscription(TFMessage, '/tf', on_tf, 100)
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
        ros_node.destroy_subscription(sub)
    finally:
        ros_node.destroy_subscription(tf_sub)
        ros_node.destroy_publisher(static_pub)
        assert node_proc.stop() == 0, node_proc.log()
