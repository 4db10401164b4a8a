"""Unposed mode with frames.base_frame: the node hands each camera's static TF base_frame ->
camera to the pipeline as its extrinsics T_BC (issue 15, several cameras; the placement itself
is tested without ROS in tests/pipeline/test_multicamera.py)."""

from __future__ import annotations

import numpy as np
import pytest
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec

from . import test_node_robustness as robust
from .rosgraph import NodeProcess, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=6,width=160,height=120'


@pytest.mark.parametrize('static_tf', [True, False], ids=['base_to_camera', 'no_tf'])
def test_camera_extrinsics_come_from_static_tf(ros_node, tmp_path, static_tf):
    overlay = robust._overlay(SCENE, queue_size=10) + (
        "    frames:\n      base_frame: 'base_link'\n")
    node_proc = NodeProcess(tmp_path, overlay)
    static_pub = ros_node.create_publisher(TFMessage, '/tf_static', qos.LATCHED_TF)
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        if static_tf:
            T_BC = np.eye(4)
            T_BC[:3, 3] = (0.2, 0.0, 0.5)
            static_pub.publish(TFMessage(transforms=[messages.transform_from_matrix(
                Header(frame_id='base_link'), 'cam_optical', T_BC)]))
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])
        robust._feed(ros_node, node_proc, pub, [robust._image(f) for f in frames], status)
        assert spin_until(ros_node, lambda: status[-1].keyframes_total >= 1, timeout=30), \
            node_proc.log()
        learned = "camera 'cam_optical': extrinsics from TF base_link -> cam_optical"
        missing = "camera 'cam_optical' has no extrinsics yet (frames.base_frame 'base_link')"
        if static_tf:
            assert spin_until(ros_node, lambda: learned in node_proc.log(), timeout=10), \
                node_proc.log()
            assert node_proc.log().count(learned) == 1  # once per camera
        else:
            assert spin_until(ros_node, lambda: missing in node_proc.log(), timeout=10), \
                node_proc.log()
            assert learned not in node_proc.log()
        ros_node.destroy_subscription(sub)
    finally:
        ros_node.destroy_publisher(static_pub)
        assert node_proc.stop() == 0, node_proc.log()
