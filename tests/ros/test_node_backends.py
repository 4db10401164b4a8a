"""The node runs the real network path: a tiny random-weight SAB3R checkpoint on the torch
backend, loaded, warmed up and fed camera images through the same parameters a robot uses."""

from __future__ import annotations

import argparse
import time

from lifecycle_msgs.msg import State
from lifecycle_msgs.srv import GetState
import pytest
from sensor_msgs.msg import Image
import torch

from ros2_sab3r.frames.decode import rgb_to_image_fields
from ros2_sab3r.model.arch import load_config
from ros2_sab3r.model.checkpoint import save_network
from ros2_sab3r.model.network import create_network
from ros2_sab3r.msg import PerceptionStatus
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.sim.synthetic import make_scene
from ros2_sab3r.srv import Locate

from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.model, pytest.mark.slow]

OVERLAY = """/**:
  ros__parameters:
    camera:
      image_topics: ['NS/cam/image_raw']
      camera_info_topics: ['']
      queue_size: 10
    model:
      backend: 'torch'
      checkpoint: '{checkpoint}'
      architecture: '{architecture}'
      text_encoder: 'ros2_sab3r.sim.standin:HashTextEncoderStandIn'
      image_width: 64
      image_height: 48
      cpu_threads: 1
    mapping:
      voxel_size_m: 0.005
    geometry:
      max_registration_rmse: 10.0
    publish:
      status_rate_hz: 10.0
"""


# A tiny SAB3R as the official trainer writes its model string: head types, no desc_conf_mode.
TINY_SAB3R = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
    "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
    "clip_head_type='dpt', dino_head_type='linear', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, "
    "dec_embed_dim=24, dec_depth=10, dec_num_heads=2, two_confs=True)")


def _write_checkpoint(layout: str, tmp_path) -> tuple[str, str]:
    """(checkpoint path, architecture parameter) of a tiny random-weight SAB3R file."""
    torch.manual_seed(0)
    if layout == 'safetensors':
        net = create_network(load_config('tiny_cd'))
        return str(save_network(net, tmp_path / 'tiny_sab3r.safetensors')), ''
    if layout == 'training':
        from ros2_sab3r.model.checkpoint import config_from_official, parse_constructor_call

        net = create_network(config_from_official(*parse_constructor_call(TINY_SAB3R)))
        path = tmp_path / 'checkpoint-final.pth'
        torch.save({'model': net.state_dict(), 'epoch': 5,
                    'args': argparse.Namespace(model=TINY_SAB3R, lr=1e-4)}, path)
        return str(path), ''
    # The release layout (DeepSpeed model states, no architecture): named by the parameter.
    net = create_network(load_config('tiny_cd'))
    path = tmp_path / 'base.pt'
    torch.save({'module': net.state_dict(), 'global_steps': 10, 'optimizer': None,
                'sparse_tensor_module_names': set(), 'ds_version': '0.14.4'}, path)
    return str(path), 'tiny_cd'


@pytest.mark.parametrize('layout', ['safetensors', 'training', 'release'])
def test_torch_backend_with_a_checkpoint_file(ros_node, tmp_path, layout):
    ckpt, architecture = _write_checkpoint(layout, tmp_path)
    node_proc = NodeProcess(tmp_path, OVERLAY.format(checkpoint=ckpt, architecture=architecture))
    frames = make_scene(seed=0).sequence(6, 128, 96)
    try:
        status: list[PerceptionStatus] = []
        sub = ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status',
                                           status.append, qos.STATUS)
        pub = ros_node.create_publisher(Image, f'{node_proc.ns}/cam/image_raw', 10)
        assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0 and status
                          and status[-1].backend, timeout=90), node_proc.log()
        assert status[-1].backend.startswith('torch tiny') or (
            layout == 'training' and status[-1].backend.startswith('torch checkpoint-final')
        ), status[-1].backend
        for i, f in enumerate(frames):
            img = Image(encoding='rgb8')
            img.header.stamp = messages.stamp_from_ns(f.stamp_ns)
            img.header.frame_id = 'cam_optical'
            img.height, img.width, img.step, img.data = rgb_to_image_fields(f.rgb)
            pub.publish(img)
            assert spin_until(ros_node, lambda i=i: status[-1].frames_processed
                              + status[-1].frames_dropped >= i + 1, timeout=60), node_proc.log()
        s = status[-1]
        assert (s.frames_processed, s.frames_dropped) == (len(frames), 0), node_proc.log()
        assert s.map_ready and s.voxels > 0 and s.latency_decode_ms > 0, node_proc.log()
        # random weights: what Locate finds is meaningless, but it must answer from the map
        res = call(ros_node, Locate, f'{node_proc.name}/locate', Locate.Request(queries=['bed']))
        assert res.success and len(res.objects) >= 1, res.message
        ros_node.destroy_subscription(sub)
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'warm-up: one pair in' in log and 'Traceback' not in log, log


def test_a_checkpoint_that_cannot_load_leaves_the_node_up_and_unconfigured(ros_node, tmp_path):
    ckpt, _ = _write_checkpoint('release', tmp_path)
    data = open(ckpt, 'rb').read()
    open(ckpt, 'wb').write(data[:len(data) // 2])  # truncated download
    node_proc = NodeProcess(tmp_path, OVERLAY.format(checkpoint=ckpt, architecture='tiny_cd'))
    try:
        deadline = time.monotonic() + 60
        while 'activate failed' not in node_proc.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED, node_proc.log()
        assert node_proc.proc.poll() is None
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'corrupt or truncated' in log and ckpt in log, log
    assert 'returns to unconfigured' in log, log
