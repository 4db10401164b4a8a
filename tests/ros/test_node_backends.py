"""The node runs the real network path: a tiny random-weight SAB3R checkpoint on the torch
backend, loaded, warmed up and fed camera images through the same parameters a robot uses."""

from __future__ import annotations

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy wheels are installed by scripts/bootstrap.sh')
torch = pytest.importorskip('torch')

from sensor_msgs.msg import Image  # noqa: E402

from ros2_sab3r.eval.synthetic import make_scene  # noqa: E402
from ros2_sab3r.model.arch import load_config  # noqa: E402
from ros2_sab3r.model.checkpoint import save_network  # noqa: E402
from ros2_sab3r.model.network import create_network  # noqa: E402
from ros2_sab3r.msg import PerceptionStatus  # noqa: E402
from ros2_sab3r.ros import messages, qos  # noqa: E402
from ros2_sab3r.ros.conversions import rgb_to_image_fields  # noqa: E402
from ros2_sab3r.srv import Locate  # noqa: E402

from .rosgraph import NodeProcess, call, spin_until  # noqa: E402

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
      text_encoder: 'ros2_sab3r.eval.standin:HashTextEncoderStandIn'
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


def test_torch_backend_with_a_checkpoint_file(ros_node, tmp_path):
    torch.manual_seed(0)
    net = create_network(load_config('tiny_cd').with_feature_stride(1))
    ckpt = save_network(net, tmp_path / 'tiny_sab3r.safetensors')
    node_proc = NodeProcess(tmp_path, OVERLAY.format(checkpoint=ckpt))
    frames = make_scene(seed=0).sequence(6, 128, 96)
    try:
        status: list[PerceptionStatus] = []
        sub = ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status',
                                           status.append, qos.STATUS)
        pub = ros_node.create_publisher(Image, f'{node_proc.ns}/cam/image_raw', 10)
        assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0 and status
                          and status[-1].backend, timeout=90), node_proc.log()
        assert status[-1].backend.startswith('torch tiny'), status[-1].backend
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
