"""The backends behind one protocol, and load_model building them from parameters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference import Backend, BackendUnavailable
from ros2_sab3r.inference.factory import load_model
from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions
from ros2_sab3r.inference.torch_backend import TorchBackend
from ros2_sab3r.model.checkpoint import save_network
from ros2_sab3r.sim.standin import HashTextEncoderStandIn, SyntheticSceneBackend
from ros2_sab3r.types import CameraFrame, PairPrediction

pytestmark = [pytest.mark.model, pytest.mark.export]

STANDIN_TEXT = 'ros2_sab3r.sim.standin:HashTextEncoderStandIn'
FIELDS = ('X', 'C', 'D', 'D_conf', 'S_clip', 'S_dino')


def _frame(stamp: int, hw=(120, 160)) -> CameraFrame:
    rng = np.random.default_rng(stamp)
    return CameraFrame(stamp, 'cam', rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _max_rel(a: PairPrediction, b: PairPrediction) -> dict[str, float]:
    out = {}
    for v in ('view1', 'view2'):
        for f in FIELDS:
            x, y = getattr(getattr(a, v), f), getattr(getattr(b, v), f)
            out[f'{v}.{f}'] = float(np.abs(x - y).max() / np.abs(y).max())
    return out


@pytest.fixture(scope='module')
def checkpoint(tiny_net, tmp_path_factory):
    path = save_network(tiny_net, tmp_path_factory.mktemp('ckpt') / 'tiny.safetensors')
    return path


def test_backends_share_the_protocol_and_agree(export_dir, tiny_net):
    out, _ = export_dir
    torch_be = TorchBackend(tiny_net, (48, 64))
    ort_be = OnnxRuntimeBackend(out, (48, 64), OrtOptions(threads=2))
    f1, f2 = _frame(1), _frame(2, (200, 150))  # a portrait frame is cropped to fit
    preds = []
    for be in (torch_be, ort_be):
        assert isinstance(be, Backend)
        assert be.input_size == (48, 64) and be.name and be.device == 'cpu'
        pred = be.decode(be.encode(f1), be.encode(f2))
        assert pred.image_size == (48, 64)
        assert pred.view1.X.shape == (48, 64, 3) and pred.view2.D.shape == (48, 64, 24)
        assert pred.view1.S_clip.shape == (48, 64, 16) and pred.view2.S_dino.shape == (48, 64, 8)
        assert all(getattr(pred.view1, f).dtype == np.float32 for f in FIELDS)
        preds.append(pred)
    for name, err in _max_rel(*preds).items():
        assert err < 1e-4, f'{name}: {err:.2e}'


def test_tokens_do_not_travel_between_backends(export_dir, tiny_net):
    out, _ = export_dir
    a = TorchBackend(tiny_net, (48, 64))
    b = OnnxRuntimeBackend(out, (48, 64))
    with pytest.raises(ValueError, match='not made by this backend'):
        b.decode(a.encode(_frame(1)), b.encode(_frame(2)))


def test_reduced_precision_keeps_heads_in_fp32(tiny_net):
    import copy

    ref = TorchBackend(copy.deepcopy(tiny_net), (48, 64))
    bf16 = TorchBackend(copy.deepcopy(tiny_net), (48, 64), dtype='bf16')
    assert bf16.net.downstream_head1.dpt.head[0].weight.dtype == torch.float32
    assert bf16.net.enc_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    f1, f2 = _frame(3), _frame(4)
    a, b = ref.decode(ref.encode(f1), ref.encode(f2)), bf16.decode(bf16.encode(f1),
                                                                    bf16.encode(f2))
    for name, err in _max_rel(b, a).items():
        assert np.isfinite(err) and err < 0.1, f'bf16 {name}: {err:.2e}'


def test_channels_last_heads_change_layout_only(tmp_path):
    """TorchBackend runs the heads channels-last: outputs, the weights' hash, saving and export
    of the same network object are unaffected."""
    from ros2_sab3r.inference.export import export_network, weights_sha256
    from ros2_sab3r.model.arch import load_config
    from ros2_sab3r.model.checkpoint import load_network
    from ros2_sab3r.model.network import DecoderGraph, create_network

    torch.manual_seed(1)
    net = create_network(load_config('tiny_cd'))
    img1, img2 = torch.rand(1, 3, 48, 64) * 2 - 1, torch.rand(1, 3, 48, 64) * 2 - 1
    with torch.inference_mode():
        ref = DecoderGraph(net, (48, 64))(net.encode(img1).tokens, net.encode(img2).tokens)
    digest = weights_sha256(net)
    backend = TorchBackend(net, (48, 64))
    conv = net.downstream_head1.clip_head.head[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    got = backend.decode_tensors(backend.encode_tensor(img1), backend.encode_tensor(img2))
    for want, (name, value) in zip(ref, got.items()):
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5, msg=name)
    assert weights_sha256(net) == digest
    path = save_network(net, tmp_path / 'net.safetensors')
    for a, b in zip(net.state_dict().values(), load_network(path).state_dict().values()):
        assert torch.equal(a, b)
    export_network(net, tmp_path / 'onnx', [(32, 32)], progress=False)  # checks parity


def test_unusable_settings_are_refused(tiny_net):
    with pytest.raises(BackendUnavailable, match='multiple of the patch size'):
        TorchBackend(tiny_net, (50, 64))
    with pytest.raises(BackendUnavailable, match="needs model.device 'cuda'"):
        TorchBackend(tiny_net, (48, 64), cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match='no CUDA device'):
            TorchBackend(tiny_net, (48, 64), device='cuda')


def _model(**kw) -> ModelConfig:
    base = dict(image_height=48, image_width=64, text_encoder=STANDIN_TEXT, cpu_threads=2)
    return dataclasses.replace(ModelConfig(), **{**base, **kw})


def test_load_model_builds_torch_and_onnxruntime_from_parameters(checkpoint, export_dir):
    out, _ = export_dir
    for model in (_model(backend='torch', checkpoint=str(checkpoint)),
                  _model(backend='onnxruntime', checkpoint=str(out))):
        loaded = load_model(model)
        assert isinstance(loaded.backend, Backend)
        assert loaded.backend.input_size == (48, 64)
        assert isinstance(loaded.text_encoder, HashTextEncoderStandIn)
        assert loaded.text_encoder.dim == 16  # the CLIP head's width
        assert model.backend in loaded.description
    with pytest.raises(BackendUnavailable, match='no graphs for image size 96x128'):
        load_model(_model(backend='onnxruntime', checkpoint=str(out), image_height=96,
                          image_width=128))


def test_load_model_explains_what_is_missing(checkpoint, export_dir, tmp_path):
    out, _ = export_dir
    with pytest.raises(BackendUnavailable, match='model.checkpoint is empty'):
        load_model(_model(backend='torch'))
    with pytest.raises(BackendUnavailable, match='does not exist'):
        load_model(_model(backend='torch', checkpoint=str(tmp_path / 'none.safetensors')))
    with pytest.raises(BackendUnavailable, match='multiple of the patch size 16'):
        load_model(_model(backend='torch', checkpoint=str(checkpoint), image_height=40))
    # No text weights beside the checkpoint and none configured: say what to download.
    with pytest.raises(BackendUnavailable, match=r'no CLIP text encoder.*open_clip'):
        load_model(_model(backend='torch', checkpoint=str(checkpoint), text_encoder=''))
    with pytest.raises(BackendUnavailable, match='not in the local Hugging Face cache'):
        load_model(_model(backend='onnxruntime', checkpoint=str(out), text_encoder='openai'))
    with pytest.raises(BackendUnavailable, match='no such file'):
        load_model(_model(backend='onnxruntime', checkpoint=str(out),
                          text_encoder=str(tmp_path / 'clip.bin')))


def test_tensorrt_without_its_packages_says_how_to_install(export_dir):
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip('tensorrt and pycuda are installed; tests/inference/test_gpu.py covers it')
    out, _ = export_dir
    with pytest.raises(BackendUnavailable, match=r"pip install 'ros2_sab3r\[tensorrt\]'"):
        load_model(_model(backend='tensorrt', checkpoint=str(out), device='cuda'))
    with pytest.raises(BackendUnavailable, match="needs model.device 'cuda'"):
        load_model(_model(backend='tensorrt', checkpoint=str(out), device='cpu'))


class NarrowClipBackendDouble(SyntheticSceneBackend):
    """The stand-in claiming a 16-wide CLIP head while it brings a 512-wide text encoder."""

    clip_dim = 16


def test_plugin_backends_are_built_and_checked_like_the_builtin_ones():
    standin = _model(backend='ros2_sab3r.sim.standin:SyntheticSceneBackend', checkpoint='',
                     text_encoder='')
    loaded = load_model(standin)
    assert isinstance(loaded.backend, Backend)  # the whole protocol, stand-in included
    assert loaded.text_encoder is loaded.backend.text_encoder
    assert loaded.backend.warm_up() >= 0.0
    loaded.backend.close()
    narrow = dataclasses.replace(standin, backend=f'{__name__}:NarrowClipBackendDouble')
    with pytest.raises(BackendUnavailable, match='embeds text in 512 dimensions.*16-dimensional'):
        load_model(narrow)
    with pytest.raises(BackendUnavailable, match='has no from_config'):
        load_model(dataclasses.replace(standin, backend='ros2_sab3r.types:CameraFrame'))
