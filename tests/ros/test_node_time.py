"""Time as robots have it (issue 13, finding 4): stray stamps, cameras on their own clocks.

The rules themselves are tested without ROS in tests/frames/test_scheduler.py; here the node in
its own process shows that they are the ones it runs: a frame stamped 0 or a second late is
dropped and counted and the map stays (4 s late: the unit tests), a second camera on another
clock resets nothing, the warning comes once per period, and every frame is accounted for
across a Reset.
"""

from __future__ import annotations

from dataclasses import replace
import re

import pytest
from std_srvs.srv import Trigger

from ros2_sab3r.sim.standin import SceneSpec

from . import test_node_robustness as robust
from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=12,width=160,height=120'
S = 1_000_000_000


def test_stray_stamps_and_a_second_clock_never_reset_the_map(ros_node, tmp_path):
    node_proc = NodeProcess(tmp_path, robust._overlay(SCENE, topics=2, queue_size=10))
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        status, sub, (pub0, pub1) = robust._connect(
            ros_node, node_proc, ['cam0/image_raw', 'cam1/image_raw'])
        robust._feed(ros_node, node_proc, pub0, [robust._image(f) for f in frames[:6]], status)
        assert spin_until(ros_node, lambda: robust._settled(status) and status[-1].map_ready,
                          timeout=30), node_proc.log()
        before = status[-1]
        assert before.keyframes_total >= 2, before

        # stray frames on camera 0, each older than the one before (so never a new timeline,
        # which two in order would be): 1.1 s late ... down to stamp 0
        strays = [replace(frames[3], stamp_ns=int(t * S)) for t in (0.9, 0.5, 0.3, 0.1, 0.0)]
        robust._feed(ros_node, node_proc, pub0, [robust._image(f) for f in strays], status)
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=30)
        after = status[-1]
        assert after.frames_dropped == before.frames_dropped + len(strays), after
        assert after.frames_out_of_order == before.frames_out_of_order + len(strays), after
        assert (after.keyframes_total, after.voxels) == (before.keyframes_total, before.voxels)

        # camera 1 runs 1000 s ahead of camera 0: neither resets the other
        ahead = [replace(f, stamp_ns=f.stamp_ns + 1000 * S) for f in frames[6:8]]
        robust._feed(ros_node, node_proc, pub1, [robust._image(f, 'cam1_optical')
                                                  for f in ahead], status)
        robust._feed(ros_node, node_proc, pub0, [robust._image(f) for f in frames[6:9]], status)
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=30)
        assert status[-1].keyframes_total >= before.keyframes_total, status[-1]
        # frames 9 and 10 of camera 0 never arrive (0.6 s gap at 5 fps): two missing
        assert status[-1].frames_missing == 0, status[-1]
        robust._feed(ros_node, node_proc, pub0, [robust._image(frames[11])], status)
        assert spin_until(ros_node, lambda: status[-1].frames_missing == 2, timeout=10), (
            status[-1])

        answer = call(ros_node, Trigger, f'{node_proc.name}/reset', Trigger.Request())
        assert answer.success and 'dropped and counted' in answer.message, answer.message
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=30)
        s = status[-1]
        assert s.frames_received == s.frames_processed + s.frames_dropped + s.frames_queued, s
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'never arrived' in log, log
    assert 'map reset' not in log, log
    assert log.count('out of order') == 1, log  # five strays, one throttled warning


def test_frames_dropped_by_reset_are_counted(ros_node, tmp_path):
    """~/status frames_dropped_by_reset: the frames still queued when ~/reset cleared the
    buffers (a slow backend keeps them queued), the number the Reset answer reports."""
    node_proc = NodeProcess(
        tmp_path, robust._overlay(SCENE, queue_size=10,
                                  backend='tests.ros.doubles:SlowBackendDouble'),
        env={'SAB3R_TEST_DECODE_DELAY_S': '1.0'})
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])
        robust._feed(ros_node, node_proc, pub, [robust._image(frames[0])], status)
        for f in frames[1:]:  # 11 frames at once; one decode takes 1 s
            pub.publish(robust._image(f))
        assert spin_until(ros_node, lambda: status[-1].frames_queued >= 3, timeout=20), (
            status[-1])
        answer = call(ros_node, Trigger, f'{node_proc.name}/reset', Trigger.Request())
        dropped = int(re.search(r'\((\d+) queued frame', answer.message).group(1))
        assert answer.success and dropped >= 3, answer.message
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=30)
        s = status[-1]
        assert s.frames_dropped_by_reset == dropped and s.frames_out_of_order == 0, s
        assert s.frames_received == s.frames_processed + s.frames_dropped, s
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
