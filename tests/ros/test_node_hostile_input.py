"""Nothing a caller sends ends the node's process (issue 13, finding 2).

One node, in its own process, gets what a careless or hostile client can send: a Locate that
trips an error no check foresaw (fault injected by a test double), LoadMap of crafted map files
(wrong metadata types, a header declaring 10^12 elements, an extra array, special files), and
compressed frames whose headers declare 144 and 400 megapixels. After each it must still be
running, answer with an error, keep its map, and account for every frame.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage

from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import LoadMap, Locate, SaveMap

from . import test_node_robustness as robust
from .crafted import header_only, members, meta_member, meta_of, npy, png_declaring, with_meta
from .crafted import write as write_archive
from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

BACKEND = 'tests.ros.doubles:FaultInjectionBackendDouble'


def _crafted_maps(good, out) -> dict[str, str]:
    """name -> path of a map file LoadMap must refuse."""
    out.mkdir()
    paths = {}
    for name, change in [('voxel_size_list', {'voxel_size_m': [0.05]}),
                         ('n_voxels_null', {'n_voxels': None}),
                         ('gravity_2d', {'gravity': [0.0, -9.8]}),
                         ('clip_dim_text', {'clip_dim': '512'})]:
        with_meta(good, out / f'{name}.npz', **change)
        paths[name] = str(out / f'{name}.npz')
    meta = {**meta_of(good), 'n_voxels': 10 ** 12}
    write_archive(out / 'trillion.npz', {'meta.npy': meta_member(meta),
                                         'keys.npy': header_only('<i8', (10 ** 12,))})
    paths['trillion'] = str(out / 'trillion.npz')
    content = members(good)
    content['positions.npy'] = header_only('<f4', (10 ** 12, 3))
    write_archive(out / 'forged_shape.npz', content)
    paths['forged_shape'] = str(out / 'forged_shape.npz')
    content = members(good)
    content['payload.npy'] = npy(np.zeros(256 << 20, np.uint8))
    write_archive(out / 'extra.npz', content, zipfile.ZIP_DEFLATED)
    paths['extra_array'] = str(out / 'extra.npz')
    os.mkfifo(out / 'fifo.npz')
    paths['fifo'] = str(out / 'fifo.npz')
    paths['directory'] = str(out)
    return paths


def test_hostile_input_never_ends_the_process(ros_node, tmp_path):
    scene_spec = 'seed=1,frames=6,width=160,height=120'
    node_proc = NodeProcess(tmp_path, robust._overlay(scene_spec, queue_size=10, compressed=True,
                                                      backend=BACKEND))
    try:
        _, frames = SceneSpec.parse(scene_spec).render()
        status, sub, (pub,) = robust._connect(ros_node, node_proc,
                                              ['cam0/image_raw/compressed'], CompressedImage)
        robust._feed(ros_node, node_proc, pub, [robust._compressed(f, 'png') for f in frames],
                     status)
        assert spin_until(ros_node, lambda: status[-1].map_ready and robust._settled(status),
                          timeout=60), node_proc.log()
        locate = f'{node_proc.name}/locate'

        # an error in Locate that no check foresaw: answered, logged, the node lives on
        hurt = call(ros_node, Locate, locate, Locate.Request(queries=['inject-fault']))
        assert not hurt.success and 'internal error' in hurt.message, hurt.message
        assert node_proc.proc.poll() is None, node_proc.log()
        before = call(ros_node, Locate, locate, Locate.Request(queries=['bed', 'chair']))
        assert before.success, before.message
        voxels = status[-1].voxels
        good = tmp_path / 'good.npz'
        saved = call(ros_node, SaveMap, f'{node_proc.name}/save_map', SaveMap.Request(
            path=str(good)))
        assert saved.success, saved.message

        for name, path in _crafted_maps(good, tmp_path / 'crafted').items():
            rss = node_proc.rss_bytes()
            answer = call(ros_node, LoadMap, f'{node_proc.name}/load_map',
                          LoadMap.Request(path=path))
            assert not answer.success and answer.message, (name, answer.message)
            assert node_proc.proc.poll() is None, (name, node_proc.log())
            assert node_proc.rss_bytes() - rss < 100 << 20, name
        after = call(ros_node, Locate, locate, Locate.Request(queries=['bed', 'chair']))
        assert after.success, after.message
        assert status[-1].voxels == voxels  # the map was kept through every refusal

        def key(res):
            return [(o.query, o.status, round(o.score, 5), o.point_count) for o in res.objects]

        assert key(after) == key(before)

        # frames whose headers declare 400 and 144 megapixels (1.2 GB and 432 MB as RGB)
        rss = node_proc.rss_bytes()
        dropped = status[-1].frames_dropped
        bombs = [CompressedImage(format='png', data=png_declaring(*size))
                 for size in ((20000, 20000), (12000, 12000))]
        robust._feed(ros_node, node_proc, pub, bombs, status)
        assert spin_until(ros_node, lambda: robust._settled(status), timeout=30)
        assert status[-1].frames_dropped == dropped + 2, status[-1]
        assert node_proc.rss_bytes() - rss < 100 << 20
        ros_node.destroy_subscription(sub)
        ros_node.destroy_publisher(pub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'fault injected by FaultyTextEncoderDouble' in log and 'Traceback' in log, log
    assert 'camera.max_image_pixels' in log, log
