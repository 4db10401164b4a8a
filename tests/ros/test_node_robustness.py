"""The node under the abuse a robot gives it: compressed streams with a corrupt frame, bursts
from three cameras into a deliberately slow backend, Locate calls in parallel, and SIGINT while a
map is being saved.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
import signal
import time

from PIL import Image as PILImage
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ros2_sab3r.frames.decode import rgb_to_image_fields
from ros2_sab3r.mapping.blocks import BLOCK_SIZE, Block
from ros2_sab3r.mapping.persistence import MapFileError
from ros2_sab3r.msg import LocatedObject, PerceptionStatus
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import Locate, SaveMap

from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# PYTHONPATH entry whose sitecustomize.py makes the node's map writer stop half-way.
SAVE_FAULT_HOOK = Path(__file__).parent / 'save_fault'


def _overlay(scene: str, topics: int = 1, backend: str = 'ros2_sab3r.sim.standin:'
             'SyntheticSceneBackend', queue_size: int = 2, compressed: bool = False) -> str:
    images = ', '.join(f"'NS/cam{i}/image_raw'" for i in range(topics))
    return f"""/**:
  ros__parameters:
    camera:
      image_topics: [{images}]
      camera_info_topics: [{', '.join("''" for _ in range(topics))}]
      queue_size: {queue_size}
      compressed: {str(compressed).lower()}
    model:
      backend: '{backend}'
      standin_scene: '{scene}'
    publish:
      status_rate_hz: 20.0
"""


def _connect(ros_node, node_proc, topics: list[str], msg_type=Image):
    """(status list, its subscription, publishers on the node's `topics`), once the node is up
    and subscribed to them."""
    status: list[PerceptionStatus] = []
    sub = ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status',
                                       status.append, qos.STATUS)
    pubs = [ros_node.create_publisher(msg_type, f'{node_proc.ns}/{t}', 10) for t in topics]
    assert spin_until(ros_node, lambda: all(p.get_subscription_count() > 0 for p in pubs)
                      and status and status[-1].backend, timeout=90), node_proc.log()
    return status, sub, pubs


def _image(f, frame_id: str = 'cam_optical') -> Image:
    img = Image(encoding='rgb8')
    img.header.stamp = messages.stamp_from_ns(f.stamp_ns)
    img.header.frame_id = frame_id
    img.height, img.width, img.step, img.data = rgb_to_image_fields(f.rgb)
    return img


def _compressed(f, fmt: str) -> CompressedImage:
    buf = io.BytesIO()
    PILImage.fromarray(f.rgb).save(buf, format=fmt.upper(), quality=95)
    msg = CompressedImage(format=fmt)
    msg.header.stamp = messages.stamp_from_ns(f.stamp_ns)
    msg.header.frame_id = 'cam_optical'
    msg.data = buf.getvalue()
    return msg


def _feed(ros_node, node_proc, pub, msgs, status) -> None:
    """Publish one message at a time, each after the node has dealt with the previous one.

    Camera topics are best-effort: a message can be lost (most often the first, right after
    discovery), so one that shows no effect within 5 s is sent again.
    """
    for msg in msgs:
        done = status[-1].frames_processed + status[-1].frames_dropped
        for _ in range(12):
            pub.publish(msg)
            if spin_until(ros_node, lambda done=done: status[-1].frames_processed
                          + status[-1].frames_dropped > done, timeout=5):
                break
        else:
            pytest.fail(f'the node never dealt with a frame sent 12 times:\n{node_proc.log()}')


def _settled(status: list[PerceptionStatus]) -> bool:
    s = status[-1]
    return s.frames_queued == 0 and s.frames_received == s.frames_processed + s.frames_dropped


def test_compressed_jpeg_and_png_with_a_corrupt_frame(ros_node, tmp_path):
    scene_spec = 'seed=1,frames=10,width=160,height=120'
    node_proc = NodeProcess(tmp_path, _overlay(scene_spec, queue_size=10, compressed=True))
    try:
        _, frames = SceneSpec.parse(scene_spec).render()
        status, sub, (pub,) = _connect(ros_node, node_proc, ['cam0/image_raw/compressed'],
                                       CompressedImage)
        msgs = [_compressed(f, 'jpeg' if i % 2 else 'png') for i, f in enumerate(frames)]
        broken = _compressed(frames[4], 'jpeg')
        broken.data = b'\xff\xd8 not really a jpeg'
        _feed(ros_node, node_proc, pub, [*msgs[:5], broken, *msgs[5:]], status)
        assert spin_until(ros_node, lambda: _settled(status), timeout=60), node_proc.log()
        s = status[-1]
        # (a frame resent after a loss counts twice, which _feed makes rare)
        assert s.frames_dropped == 1 and s.frames_received >= len(frames) + 1, s
        assert s.frames_processed == s.frames_received - 1 and s.map_ready, node_proc.log()
        ros_node.destroy_subscription(sub)
        ros_node.destroy_publisher(pub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'compressed image could not be decoded' in log and 'Traceback' not in log, log


def test_burst_from_three_cameras_into_a_slow_backend(ros_node, tmp_path):
    """3 cameras x 30 Hz for 3 s into a backend that needs 0.3 s per pair: buffers stay at
    their capacity, everything received is either processed or counted as dropped, memory stays
    flat, and Locate calls made in parallel during the burst all answer (a query never waits
    for inference)."""
    scene_spec = 'seed=2,frames=90,width=320,height=240'
    # Coverage keyframes off: with them the map covers the whole room within the burst (~60 MB
    # of voxel features, measured), which is not the retention of frames this test bounds.
    overlay = _overlay(scene_spec, topics=3, backend='tests.ros.doubles:SlowBackendDouble') + (
        '    keyframes:\n      max_unmapped: 1.0\n')
    # One malloc arena: glibc gives each thread that allocates under contention an arena of its
    # own (up to 8 per core), each keeping what it freed. Which executor threads answer the
    # parallel Locate calls decides how many: RSS rose by 21 MB here and 56 MB in CI before a
    # plateau, which is not the retention of frames this test bounds (with one arena: flat
    # within +-20 MB).
    node_proc = NodeProcess(tmp_path, overlay, env={'SAB3R_TEST_DECODE_DELAY_S': '0.3',
                                                    'MALLOC_ARENA_MAX': '1'})
    try:
        _, frames = SceneSpec.parse(scene_spec).render()
        status, sub, pubs = _connect(ros_node, node_proc,
                                     [f'cam{c}/image_raw' for c in range(3)])
        images = [_image(f, f'cam{c}_optical') for f in frames for c in range(3)]
        # First keyframe in, so that Locate has a map to read during the burst.
        for c in range(3):
            pubs[c].publish(images[c])
        assert spin_until(ros_node, lambda: status[-1].map_ready, timeout=60), node_proc.log()
        # One query first: its lazy imports (torch for the similarity) are a one-off cost.
        warm = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=['bed']))
        assert warm.success, warm.message
        rss = [node_proc.rss_bytes()]
        voxels = [status[-1].voxels]
        max_queued = 0
        clients = [ros_node.create_client(Locate, f'{node_proc.name}/locate') for _ in range(3)]
        assert all(c.wait_for_service(timeout_sec=20) for c in clients)
        futures = []
        t_start = time.monotonic()
        for i in range(len(frames)):
            for c in range(3):
                pubs[c].publish(images[3 * i + c])
            if i % 30 == 15:  # three Locate calls at once, three times during the burst
                futures.extend(c.call_async(Locate.Request(queries=['chair', 'dresser']))
                               for c in clients)
            spin_until(ros_node, lambda: False, timeout=max(0.0, t_start + (i + 1) / 30.0
                                                             - time.monotonic()))
            max_queued = max(max_queued, status[-1].frames_queued)
            if i % 30 == 29:
                rss.append(node_proc.rss_bytes())
                voxels.append(status[-1].voxels)
        assert spin_until(ros_node, lambda: all(f.done() for f in futures), timeout=30)
        answers = [(f.result().success, f.result().message) for f in futures]
        assert spin_until(ros_node, lambda: _settled(status), timeout=60), node_proc.log()
        s = status[-1]
        settled_rss, settled_voxels = node_proc.rss_bytes(), s.voxels
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log(), node_proc.log()
    # The camera subscriptions keep only `queue_size` messages in DDS, so under load the
    # middleware itself drops some (uncounted, by design of sensor-data QoS); what reached the
    # node is all accounted for. How much DDS lets through depends on the machine's load (29
    # of 270 on a busy CI run), so the bound is the one that matters: more frames arrived than
    # the buffers (cameras x queue_size) and the backend together could take.
    assert 3 * 2 + s.frames_processed < s.frames_received <= len(images), s
    assert s.frames_received == s.frames_processed + s.frames_dropped
    assert s.frames_dropped > s.frames_received // 2, s  # the backend could not keep up
    assert s.frames_processed >= 3 and s.map_ready
    assert max_queued <= 3 * 2, max_queued  # cameras x queue_size
    # 270 frames of 230 KB would be 62 MB if they were kept anywhere: measured once the burst
    # has settled (whatever kept frames would still hold them). During the burst RSS also holds
    # the decode in flight (the stand-in's pair of views with their features: RSS samples rose
    # ~50 MB for a moment and fell back at the next, here and in CI). The map grows with the
    # keyframes that were processed (how many depends on the machine's load): its blocks are not
    # frames kept, so they are allowed for, one block rounded up; and so is an old copy of each
    # (the snapshot last handed to the Locate calls keeps the blocks the writer copied since,
    # mapping/semantic_map.py).
    slot = Block(512, 0).nbytes / BLOCK_SIZE  # the stand-in: 512-d CLIP, no DINO
    growth = (settled_voxels - voxels[0]) / BLOCK_SIZE + 1
    copies = -(-settled_voxels // BLOCK_SIZE)
    beyond_map = settled_rss - rss[0] - (growth + copies) * BLOCK_SIZE * slot
    assert beyond_map < 40 * 2**20, (
        [round(r / 2**20, 1) for r in (*rss, settled_rss)], (*voxels, settled_voxels),
        round(slot))
    assert len(answers) == 9 and all(ok for ok, _ in answers), answers


def test_concurrent_locate_calls_agree(ros_node, tmp_path):
    scene_spec = 'seed=0,frames=16,width=160,height=120'
    node_proc = NodeProcess(tmp_path, _overlay(scene_spec, queue_size=10))
    try:
        scene, frames = SceneSpec.parse(scene_spec).render()
        status, sub, (pub,) = _connect(ros_node, node_proc, ['cam0/image_raw'])
        _feed(ros_node, node_proc, pub, [_image(f) for f in frames], status)
        ros_node.destroy_subscription(sub)
        request = Locate.Request(queries=[scene.labels[0], 'refrigerator'])
        clients = [ros_node.create_client(Locate, f'{node_proc.name}/locate') for _ in range(8)]
        assert all(c.wait_for_service(timeout_sec=20) for c in clients)
        futures = [c.call_async(request) for c in clients]
        assert spin_until(ros_node, lambda: all(f.done() for f in futures), timeout=60)
        results = [f.result() for f in futures]
        for c in clients:
            ros_node.destroy_client(c)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert all(r.success for r in results), [r.message for r in results]

    def key(res):
        return [(o.query, o.status, round(o.score, 5), o.point_count) for o in res.objects]

    assert all(key(r) == key(results[0]) for r in results)
    by_query = {o.query: o for o in results[0].objects}
    assert by_query[scene.labels[0]].status != LocatedObject.STATUS_NOT_FOUND
    assert by_query['refrigerator'].status == LocatedObject.STATUS_NOT_FOUND


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGKILL], ids=['sigint', 'sigkill'])
def test_signal_during_save_map_keeps_the_previous_file(ros_node, tmp_path, sig):
    """The second save stops half-way (save_fault/sitecustomize.py) and the signal comes then."""
    from ros2_sab3r.config import MappingConfig
    from ros2_sab3r.mapping.persistence import read_map

    # The fault hook stops every save half-way whatever the map's size: a small map will do
    # (24 frames at 320x240 took 21 s, from when the signal had to race a long write).
    scene_spec = 'seed=3,frames=8,width=160,height=120'
    control = tmp_path / 'fault'
    control.mkdir()
    env = {'SAB3R_TEST_SAVE_FAULT': str(control),
           'PYTHONPATH': os.pathsep.join(filter(None, [str(SAVE_FAULT_HOOK),
                                                       os.environ.get('PYTHONPATH')]))}
    node_proc = NodeProcess(tmp_path, _overlay(scene_spec, queue_size=10), env=env)
    out = tmp_path / 'maps'
    out.mkdir()
    path = out / 'map.npz'
    try:
        _, frames = SceneSpec.parse(scene_spec).render()
        status, sub, (pub,) = _connect(ros_node, node_proc, ['cam0/image_raw'])
        _feed(ros_node, node_proc, pub, [_image(f) for f in frames], status)
        ros_node.destroy_subscription(sub)
        first = call(ros_node, SaveMap, f'{node_proc.name}/save_map',
                     SaveMap.Request(path=str(path)))
        assert first.success, first.message
        before = path.read_bytes()
        (control / 'armed').touch()
        client = ros_node.create_client(SaveMap, f'{node_proc.name}/save_map')
        assert client.wait_for_service(timeout_sec=10)
        client.call_async(SaveMap.Request(path=str(path)))
        assert spin_until(ros_node, lambda: (control / 'writing').exists(), timeout=30), (
            node_proc.log())
        partial = list(out.glob('.map.npz.*.tmp'))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before), partial
        node_proc.proc.send_signal(sig)
        node_proc.proc.wait(30)
        ros_node.destroy_client(client)
    finally:
        code = node_proc.stop()
    assert path.read_bytes() == before  # the interrupted save did not touch the map file
    try:
        read_map(path, MappingConfig(), 512)
    except MapFileError as err:  # pragma: no cover - the failure this test exists for
        pytest.fail(f'map file damaged by {sig.name}: {err}')
    if sig == signal.SIGINT:  # an orderly exit: status 0, the temporary file removed
        assert code == 0, node_proc.log()
        assert 'Traceback' not in node_proc.log(), node_proc.log()
        assert not list(out.glob('.map.npz.*.tmp')), (list(out.iterdir()), node_proc.log())
    else:  # nothing runs after SIGKILL: the half-written temporary file is all that is left
        assert list(out.glob('.map.npz.*.tmp')) == partial


def test_deactivate_activate_keeps_model_and_map_cleanup_frees_them(ros_node, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    scene_spec = 'seed=0,frames=8,width=160,height=120'
    node_proc = NodeProcess(tmp_path, _overlay(scene_spec, queue_size=10))
    try:
        scene, frames = SceneSpec.parse(scene_spec).render()
        status, sub, (pub,) = _connect(ros_node, node_proc, ['cam0/image_raw'])
        _feed(ros_node, node_proc, pub, [_image(f) for f in frames[:4]], status)
        query = Locate.Request(queries=[scene.labels[0]])
        before = call(ros_node, Locate, f'{node_proc.name}/locate', query)
        assert before.success, before.message

        def change(transition: int) -> None:
            res = call(ros_node, ChangeState, f'{node_proc.name}/change_state',
                       ChangeState.Request(transition=Transition(id=transition)))
            assert res.success, node_proc.log()

        change(Transition.TRANSITION_DEACTIVATE)
        change(Transition.TRANSITION_ACTIVATE)
        after = call(ros_node, Locate, f'{node_proc.name}/locate', query)
        assert after.success and [o.point_count for o in after.objects] == [
            o.point_count for o in before.objects], after.message
        # the worker runs again: more frames still reach the map
        _feed(ros_node, node_proc, pub, [_image(f) for f in frames[4:]], status)
        assert node_proc.log().count('backend: ') == 1  # loaded once
        change(Transition.TRANSITION_DEACTIVATE)
        change(Transition.TRANSITION_CLEANUP)  # frees model and map: a new start from zero
        change(Transition.TRANSITION_CONFIGURE)
        change(Transition.TRANSITION_ACTIVATE)
        gone = call(ros_node, Locate, f'{node_proc.name}/locate', query)
        assert not gone.success and 'no map yet' in gone.message
        assert node_proc.log().count('backend: ') == 2
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    assert 'Traceback' not in node_proc.log()


def test_a_bag_that_loops_resets_the_window_and_map(ros_node, tmp_path):
    scene_spec = 'seed=0,frames=12,width=160,height=120'
    node_proc = NodeProcess(tmp_path, _overlay(scene_spec, queue_size=10))
    try:
        _, frames = SceneSpec.parse(scene_spec).render()
        assert frames[-1].stamp_ns - frames[0].stamp_ns > 1_500_000_000
        status, sub, (pub,) = _connect(ros_node, node_proc, ['cam0/image_raw'])
        _feed(ros_node, node_proc, pub, [_image(f) for f in frames], status)
        assert spin_until(ros_node, lambda: status[-1].keyframes_total >= 2, timeout=10)
        # the bag starts over: a first old frame could be a stray one (dropped, out of order),
        # the second in order confirms the new timeline and the map is reset
        _feed(ros_node, node_proc, pub, [_image(frames[0]), _image(frames[1])], status)
        assert spin_until(ros_node, lambda: status[-1].keyframes_total == 1, timeout=10), (
            status[-1], node_proc.log())
        assert spin_until(ros_node, lambda: _settled(status), timeout=10)
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'jumped back by' in log and 'keyframe window and map reset' in log, log
