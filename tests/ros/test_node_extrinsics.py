"""Several cameras in unposed mode, node side: with frames.base_frame the node hands each
camera's static TF base_frame -> camera to the pipeline as its extrinsics T_BC, so a back camera
whose view never overlaps the front one's is mapped; without the transform its frames are
counted as unplaced and the log says so (the placement itself is tested without ROS in
tests/pipeline/test_multicamera.py)."""

from __future__ import annotations

from geometry_msgs.msg import PoseArray
import numpy as np
import pytest
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec

from . import test_node_robustness as robust
from .rig import T_FRONT_BACK, render_rig
from .rosgraph import NodeProcess, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=8,width=160,height=120'
# The front camera's optical frame on the robot (x forward, z up), 0.2 m ahead, 0.5 m up.
T_B_FRONT = np.eye(4)
T_B_FRONT[:3, :3] = [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
T_B_FRONT[:3, 3] = (0.2, 0.0, 0.5)
T_B_BACK = T_B_FRONT @ T_FRONT_BACK


def _overlay() -> str:
    overlay = robust._overlay(SCENE, topics=2, queue_size=10,
                              backend='tests.ros.rig:FrontBackRigStandIn')
    return overlay + "    frames:\n      base_frame: 'base_link'\n"


def _optical_axes(msg: PoseArray) -> np.ndarray:
    """(N, 3) viewing directions (optical z) of the published keyframe poses."""
    q = np.array([[p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w]
                  for p in msg.poses])
    x, y, z, w = q.T
    return np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)


@pytest.mark.parametrize('static_tf', [True, False], ids=['static_tf', 'no_tf'])
def test_front_and_back_cameras_placed_by_static_tf(ros_node, tmp_path, static_tf):
    node_proc = NodeProcess(tmp_path, _overlay())
    static_pub = ros_node.create_publisher(TFMessage, '/tf_static', qos.LATCHED_TF)
    poses: list[PoseArray] = []
    poses_sub = None
    try:
        _, front, back = render_rig(SceneSpec.parse(SCENE))
        if static_tf:
            static_pub.publish(TFMessage(transforms=[
                messages.transform_from_matrix(Header(frame_id='base_link'), child, T)
                for child, T in (('front_optical', T_B_FRONT), ('back_optical', T_B_BACK))]))
        status, sub, (pub_front, pub_back) = robust._connect(
            ros_node, node_proc, ['cam0/image_raw', 'cam1/image_raw'])
        poses_sub = ros_node.create_subscription(
            PoseArray, f'{node_proc.name}/keyframe_poses', poses.append, qos.LATCHED)
        # the node's /tf_static subscription has the latched transforms before the 1st frame
        assert spin_until(ros_node, lambda: static_pub.get_subscription_count() > 0, 30)
        spin_until(ros_node, lambda: False, timeout=1.0)
        for f, b in zip(front, back):
            robust._feed(ros_node, node_proc, pub_front, [robust._image(f, 'front_optical')],
                         status)
            robust._feed(ros_node, node_proc, pub_back, [robust._image(b, 'back_optical')],
                         status)
        assert status[-1].frames_processed == 2 * len(front), node_proc.log()
        front_mapped = "camera 'front_optical', first keyframe: first keyframe"
        assert spin_until(ros_node, lambda: front_mapped in node_proc.log(), 10), node_proc.log()
        back_mapped = ("camera 'back_optical', first keyframe: camera 'back_optical' placed by "
                       'its extrinsics')
        unplaced = f"frames unplaced so far: 'back_optical' {len(back)} "
        if static_tf:
            for cam in ('front_optical', 'back_optical'):
                learned = f"camera '{cam}': extrinsics from TF base_link -> {cam}"
                assert node_proc.log().count(learned) == 1, node_proc.log()  # once per camera
            assert back_mapped in node_proc.log(), node_proc.log()
            assert 'frames unplaced' not in node_proc.log(), node_proc.log()
            assert status[-1].frames_unplaced == 0, status[-1]
        else:
            assert "camera 'back_optical' has no extrinsics yet (frames.base_frame " \
                "'base_link')" in node_proc.log(), node_proc.log()
            assert spin_until(ros_node, lambda: unplaced in node_proc.log(), 10), node_proc.log()
            assert 'publish the static TF base_link -> camera' in node_proc.log()
            assert spin_until(ros_node, lambda: status[-1].frames_unplaced == len(back), 10), (
                status[-1])
            assert back_mapped not in node_proc.log()
        # the keyframes of the window (published) look both ways only when the back camera was
        # mapped (front camera alone: 0.57 at most, seen)
        assert spin_until(ros_node, lambda: poses and len(poses[-1].poses)
                          == status[-1].keyframes_in_window, 10), node_proc.log()
        z = _optical_axes(poses[-1])
        opposite = float(-(z @ z.T).min())
        print(f'static_tf={static_tf}: {len(z)} keyframes, most opposite views {opposite:.3f}')
        assert (opposite > 0.97) == static_tf, opposite
        ros_node.destroy_subscription(sub)
    finally:
        if poses_sub is not None:
            ros_node.destroy_subscription(poses_sub)
        ros_node.destroy_publisher(static_pub)
        assert node_proc.stop() == 0, node_proc.log()
