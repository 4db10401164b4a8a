"""The released SAB3R model: key list, both official file layouts, feature-head numerics, the
Hub path, and bad files (sab3r_spec sections 0-3). Synthetic weights only, no network."""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ros2_sab3r.model import checkpoint as ckpt_mod
from ros2_sab3r.model.arch import OutputMode, load_config
from ros2_sab3r.model.checkpoint import (
    RELEASE_ARCHITECTURE,
    CheckpointError,
    config_from_official,
    hub_path,
    load_network,
    parse_constructor_call,
    save_network,
)
from ros2_sab3r.model.heads import reg_dense_depth
from ros2_sab3r.model.network import create_network
from tests.model.helpers import random_images, read_key_list

pytestmark = pytest.mark.model

def tiny_sab3r_args(clip: str | None = 'dpt', dino: str | None = 'linear') -> str:
    """A tiny training-layout model string as SAB3R writes it: head types, no desc_conf_mode."""
    heads = ''.join(f', {name}_head_type={value!r}' for name, value in
                    (('clip', clip), ('dino', dino)))
    return ("AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
            "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
            "depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=32, "
            "enc_depth=2, enc_num_heads=2, dec_embed_dim=24, dec_depth=10, dec_num_heads=2, "
            f"two_confs=True{heads})")


def _random_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every tensor random (biases and LayerNorms too), so a swapped name or a
    wrong slice shows in the outputs."""
    torch.manual_seed(seed)
    net = create_network(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(max(p[0].numel(), 1))))
    return net.state_dict()


def _deepspeed_file(path: Path, state: dict, extra: dict | None = None) -> Path:
    """The release layout: DeepSpeed model states with plain bookkeeping, no 'args'."""
    shapes = collections.OrderedDict((k, v.shape) for k, v in state.items())
    torch.save({'module': state, 'buffer_names': [], 'param_shapes': [shapes],
                'frozen_param_shapes': None, 'shared_params': {}, 'frozen_param_fragments': None,
                'lr_scheduler': {'last_batch_iteration': 4000},
                'sparse_tensor_module_names': set(),
                'skipped_steps': 0, 'global_steps': 11_000, 'global_samples': 704_000,
                'dp_world_size': 8, 'mp_world_size': 1, 'ds_config': {'zero_optimization':
                                                                     {'stage': 2}},
                'ds_version': '0.14.4', 'optimizer': None, **(extra or {})}, path)
    return path


def _training_file(path: Path, state: dict, model_string: str) -> Path:
    args = argparse.Namespace(model=model_string, lr=1e-4, output_dir='/runs/x')
    torch.save({'model': state, 'args': args, 'epoch': 5}, path)
    return path


# ------------------------------------------------------------------------- architecture
def test_release_architecture_equals_the_official_key_list():
    net = create_network(RELEASE_ARCHITECTURE, 'meta')
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    ref = read_key_list('sab3r_state_dict_keys.tsv')
    assert len(ref) == 1289
    assert ours == ref  # names, shapes and registration order, aliases included
    unique = {id(p): p.numel() for p in net.parameters()}
    assert sum(unique.values()) == 769_674_632

    def count(module):
        return sum({id(p): p.numel() for p in module.parameters()}.values())

    assert count(net.downstream_head1.clip_head) == 20_267_200
    assert count(net.downstream_head2.dino_head) == 20_250_688
    sd = net.state_dict(keep_vars=True)
    for v in (1, 2):
        for h in ('clip', 'dino'):
            for k in range(1, 5):
                assert sd[f'downstream_head{v}.{h}_head.scratch.layer{k}_rn.weight'] is sd[
                    f'downstream_head{v}.{h}_head.scratch.layer_rn.{k - 1}.weight']


def test_release_architecture_is_the_official_constructor_call():
    release = ("AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='PatchEmbedDust3R', "
               "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
               "clip_head_type='dpt', dino_head_type='dpt', depth_mode=('exp', -inf, inf), "
               "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
               "dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True, "
               "landscape_only=False)")
    parsed = config_from_official(*parse_constructor_call(release), name=RELEASE_ARCHITECTURE)
    assert parsed == load_config(RELEASE_ARCHITECTURE)
    assert parsed.desc_conf_mode == OutputMode('exp', 1.0, math.inf)  # 1 + exp(x)


def test_linear_heads_at_release_width():
    cfg = config_from_official(*parse_constructor_call(
        "AsymmetricMASt3R(pos_embed='RoPE100', head_type='catmlp+dpt', "
        "output_mode='pts3d+desc24', clip_head_type='linear', dino_head_type='linear', "
        "enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, "
        "dec_num_heads=12, two_confs=True)"))
    net = create_network(cfg, 'meta')
    sd = net.state_dict()
    assert sd['downstream_head1.clip_head.fc1.weight'].shape == (1792, 1792)
    assert sd['downstream_head1.clip_head.fc2.weight'].shape == (131072, 1792)
    assert sd['downstream_head2.dino_head.fc2.bias'].shape == (98304,)
    assert sum(p.numel() for p in net.downstream_head1.clip_head.parameters()) == 238_225_152
    assert sum(p.numel() for p in net.downstream_head1.dino_head.parameters()) == 179_472_128
    keys = list(sd)
    # registration order inside a view's head: dpt, head_local_features, clip_head, dino_head
    order = [keys.index(k) for k in ('downstream_head1.dpt.head.4.bias',
                                     'downstream_head1.head_local_features.fc2.bias',
                                     'downstream_head1.clip_head.fc1.weight',
                                     'downstream_head1.dino_head.fc1.weight')]
    assert order == sorted(order)


@pytest.mark.parametrize('clip, dino', [(None, None), ('dpt', None), (None, 'linear'),
                                        ('linear', 'dpt')])
def test_model_string_head_types_build_the_heads(clip, dino):
    cfg = config_from_official(*parse_constructor_call(tiny_sab3r_args(clip, dino)))
    assert [(h.name, h.head_type) for h in cfg.feature_heads] == [
        (n, t) for n, t in (('clip', clip), ('dino', dino)) if t is not None]
    net = create_network(cfg, 'meta')
    for h in ('clip', 'dino'):
        present = any(k.startswith(f'downstream_head1.{h}_head.') for k in net.state_dict())
        assert present == (h == 'clip' and clip is not None or h == 'dino' and dino is not None)


def test_unknown_head_type_is_named():
    with pytest.raises(ValueError, match="clip_head_type='conv'"):
        config_from_official(*parse_constructor_call(tiny_sab3r_args('conv', None)))


# ------------------------------------------------------------------------- numerics
def test_norm_exp_mapping_formula_and_zero_norm():
    mode = OutputMode('exp')
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, 384, generator=gen, dtype=torch.float64) * 0.2
    d = f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(reg_dense_depth(f, mode), f / d * (torch.exp(d) - 1),
                               rtol=1e-12, atol=0)
    tiny = torch.full((1, 512), 1e-9, dtype=torch.float32)  # |f| ~ 2e-8: e^d - 1 ~ d
    out = reg_dense_depth(tiny, mode)
    torch.testing.assert_close(out, tiny, rtol=1e-6, atol=0)
    zero = reg_dense_depth(torch.zeros(2, 3, 512), mode)
    assert torch.isfinite(zero).all() and (zero == 0).all()  # max(d, 1e-8): no 0/0
    with torch.enable_grad():
        x = torch.zeros(1, 8, requires_grad=True)
        reg_dense_depth(x + 1e-12, mode).sum().backward()
        assert torch.isfinite(x.grad).all()


def _pixel_shuffle_reference(mlp_out: np.ndarray, grid, p: int) -> np.ndarray:
    """Spec: MLP output index c*p*p + dy*p + dx of token (y, x) -> channel c, pixel
    (p*y + dy, p*x + dx)."""
    b, n, k = mlp_out.shape
    h, w = grid
    c = k // (p * p)
    out = np.empty((b, h * p, w * p, c))
    for t in range(n):
        y, x = divmod(t, w)
        v = mlp_out[:, t].reshape(b, c, p, p)  # [c, dy, dx]
        out[:, y * p:(y + 1) * p, x * p:(x + 1) * p, :] = v.transpose(0, 2, 3, 1)
    return out


def _view_reference(net64, layers, grid, view: int) -> dict[str, np.ndarray]:
    """One view in float64 from the spec's formulas: raw channels concatenated as
    [xyz, conf | desc, desc_conf | clip | dino], then each slice post-processed."""
    head = net64.heads()[view - 1]
    cfg = net64.cfg
    p = cfg.patch_size
    with torch.no_grad():
        cat = torch.cat([layers[0], layers[-1]], dim=-1)
        raw = [head.dpt(layers, grid).numpy(),
               _pixel_shuffle_reference(head.head_local_features(cat).numpy(), grid, p)]
        for fh in cfg.feature_heads:
            module = getattr(head, f'{fh.name}_head')
            if fh.head_type == 'linear':
                fc = module.fc2(torch.nn.functional.gelu(module.fc1(cat)))  # exact GELU
                raw.append(_pixel_shuffle_reference(fc.numpy(), grid, p))
            else:
                raw.append(module(layers, grid).numpy())
    allc = np.concatenate(raw, axis=-1)

    def norm_exp(v):
        d = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.maximum(d, 1e-8) * np.expm1(d)

    out = {'pts3d': norm_exp(allc[..., 0:3]), 'conf': 1 + np.exp(allc[..., 3])}
    desc = allc[..., 4:28]
    out['desc'] = desc / np.linalg.norm(desc, axis=-1, keepdims=True)
    out['desc_conf'] = 1 + np.exp(allc[..., 28])  # desc_conf_mode absent -> conf_mode
    start = 29
    for fh in cfg.feature_heads:
        out[fh.name] = norm_exp(allc[..., start:start + fh.out_dim])
        start += fh.out_dim
    return out


@pytest.mark.parametrize('clip, dino', [('dpt', 'dpt'), ('linear', 'linear'), (None, 'linear')])
def test_training_layout_loads_strictly_and_matches_the_float64_reference(tmp_path, clip, dino):
    model_string = tiny_sab3r_args(clip, dino)
    cfg = config_from_official(*parse_constructor_call(model_string), name='tiny_sab3r')
    state = _random_state(cfg, seed=3)
    path = _training_file(tmp_path / 'checkpoint-final.pth', state, model_string)
    net = load_network(path)  # the model string alone names the architecture
    assert net.cfg.desc_conf_mode == OutputMode('exp', 1.0, math.inf)
    img1, img2 = random_images(1, 48, 32, seed=1), random_images(1, 32, 48, seed=2)
    with torch.no_grad():
        got = net(img1, img2)
        net64 = create_network(cfg).double()
        net64.load_state_dict({k: v.double() for k, v in state.items()})
        t1, t2 = net64.decode_tokens(net64.encode(img1.double()), net64.encode(img2.double()))
    for view, tokens, out in ((1, t1, got.view1), (2, t2, got.view2)):
        ref = _view_reference(net64, tokens.layers, tokens.grid, view)
        assert set(ref) == {'pts3d', 'conf', 'desc', 'desc_conf'} | {
            h.name for h in cfg.feature_heads}
        for name, want in ref.items():
            have = getattr(out, name).double().numpy()[0]
            assert have.shape == want[0].shape, name
            scale = np.abs(want).max()
            np.testing.assert_allclose(have, want[0], rtol=2e-4, atol=2e-5 * scale,
                                       err_msg=f'view {view} {name}')
        if 'clip' not in ref:
            assert out.clip is None


def test_release_layout_loads_without_a_flag(tmp_path, monkeypatch):
    cfg = load_config('tiny_cd')
    state = _random_state(cfg, seed=4)
    path = _deepspeed_file(tmp_path / 'base.pt', state)
    # The release file is read as the release architecture (here, a tiny one stands in).
    with pytest.raises(CheckpointError, match=r'sab3r_cd.*wrong shape'):
        load_network(path)
    monkeypatch.setattr(ckpt_mod, 'RELEASE_ARCHITECTURE', 'tiny_cd')
    net = load_network(path)
    assert net.cfg.name == 'tiny_cd'
    ref = create_network(cfg)
    ref.load_state_dict(state)
    img = random_images(1, 32, 48, seed=5)
    with torch.no_grad():
        a, b = net(img, img), ref(img, img)
    for name in ('pts3d', 'conf', 'desc', 'desc_conf', 'clip', 'dino'):
        torch.testing.assert_close(getattr(a.view2, name), getattr(b.view2, name), rtol=0,
                                   atol=0)
    monkeypatch.undo()
    net = load_network(path, config='tiny_cd')  # or name the architecture
    assert net.cfg.name == 'tiny_cd'


def test_release_layout_strictness_names_the_keys(tmp_path):
    cfg = load_config('tiny_cd')
    state = _random_state(cfg, seed=6)
    del state['downstream_head2.dino_head.fc2.bias']
    state['downstream_head1.seg_head.weight'] = torch.zeros(3)
    path = _deepspeed_file(tmp_path / 'base.pt', state)
    with pytest.raises(CheckpointError) as info:
        load_network(path, config='tiny_cd')
    message = str(info.value)
    assert str(path) in message
    assert 'missing: downstream_head2.dino_head.fc2.bias' in message
    assert 'unexpected: downstream_head1.seg_head.weight' in message


def test_release_layout_with_other_objects_needs_a_trusted_load(tmp_path):
    state = _random_state(load_config('tiny_cd'), seed=7)
    path = _deepspeed_file(tmp_path / 'base.pt', state, extra={'client': Path('/x')})
    with pytest.raises(CheckpointError, match=r'full \(code-running\) unpickling'):
        load_network(path, config='tiny_cd')
    assert load_network(path, config='tiny_cd', trusted=True).cfg.name == 'tiny_cd'


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'not_tensors'])
def test_corrupt_files_are_named(tmp_path, damage):
    state = _random_state(load_config('tiny_cd'), seed=8)
    path = _deepspeed_file(tmp_path / 'base.pt', state)
    if damage == 'truncated':
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        match = 'corrupt or truncated'
    elif damage == 'garbage':
        path.write_bytes(b'\x00not a checkpoint' * 100)
        match = 'corrupt or truncated'
    elif damage == 'empty':
        path.write_bytes(b'')
        match = 'corrupt or truncated'
    else:
        torch.save({'module': {'a': [1, 2]}}, path)
        match = "'module' is not a state dict of tensors"
    with pytest.raises(CheckpointError, match=match) as info:
        load_network(path, config='tiny_cd')
    assert str(path) in str(info.value)


def test_truncated_safetensors_is_named(tmp_path, tiny_cd_net):
    path = save_network(tiny_cd_net, tmp_path / 'm.safetensors')
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_network(path)


# ------------------------------------------------------------------------- our format
def test_format_1_export_is_converted_with_the_same_outputs(tmp_path, tiny_cd_net):
    """An export written before the release layout (heads at clip_head{v}.dpt.*, raw features)
    loads, converted, and computes what it computed then."""
    from safetensors.torch import save_file

    cfg = json.loads(tiny_cd_net.cfg.to_json())
    cfg['checkpoint_key_map'] = {}
    old_heads = []
    for h in cfg['feature_heads']:
        h = dict(h)
        h.pop('mode')
        h.update(output_stride=1, postprocess='none',
                 mlp_ratio=1.0 if h['head_type'] == 'linear' else 4.0)
        h['head_type'] = 'mlp' if h['head_type'] == 'linear' else 'dpt'
        old_heads.append(h)
    cfg['feature_heads'] = old_heads
    tensors = {}
    drop = {n for names in ckpt_mod.alias_groups(tiny_cd_net) for n in names[1:]}
    for k, v in tiny_cd_net.state_dict().items():
        if k in drop:
            continue
        for view in (1, 2):
            for name, inner in (('clip', 'dpt.'), ('dino', 'mlp.')):
                prefix = f'downstream_head{view}.{name}_head.'
                if k.startswith(prefix):
                    k = f'{name}_head{view}.{inner}' + k[len(prefix):]
        tensors[k] = v.contiguous()
    path = tmp_path / 'old.safetensors'
    save_file(tensors, str(path), metadata={'format': 'ros2_sab3r', 'format_version': '1',
                                            'config': json.dumps(cfg)})
    net = load_network(path)
    assert [h.mode.kind for h in net.cfg.feature_heads] == ['linear', 'linear']
    img = random_images(1, 32, 48, seed=9)
    with torch.no_grad():
        got, ref = net(img, img), tiny_cd_net(img, img)
        layers = tiny_cd_net.decode_tokens(tiny_cd_net.encode(img), tiny_cd_net.encode(img))
        raw_clip = tiny_cd_net.downstream_head1.clip_head(layers[0].layers, layers[0].grid)
    torch.testing.assert_close(got.view1.pts3d, ref.view1.pts3d, rtol=0, atol=0)
    # Raw, as then (norm-exp would differ by far more). Not bit-exact: the forward encodes both
    # views as one batch, which takes other GEMM kernels than one image on CPUs without AVX-512.
    torch.testing.assert_close(got.view1.clip, raw_clip, rtol=0, atol=1e-6)
    # Re-saved, it is a current-format file.
    again = load_network(save_network(net, tmp_path / 'new.safetensors'))
    assert again.cfg == net.cfg


def test_format_1_mlp_head_of_another_width_is_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = json.loads(load_config('tiny').to_json())
    cfg['feature_heads'] = [{'name': 'clip', 'out_dim': 8, 'head_type': 'mlp',
                             'output_stride': 1, 'mlp_ratio': 4.0, 'postprocess': 'none'}]
    path = tmp_path / 'old.safetensors'
    save_file({'x': torch.zeros(1)}, str(path),
              metadata={'format': 'ros2_sab3r', 'format_version': '1', 'config': json.dumps(cfg)})
    with pytest.raises(CheckpointError, match='hidden ratio 4.0'):
        load_network(path)


# ------------------------------------------------------------------------- the Hub
def test_hub_paths_are_parsed():
    assert hub_path('uva-cv-lab/SAB3R/demo_ckpt/base/base.pt') == (
        'uva-cv-lab/SAB3R', 'demo_ckpt/base/base.pt')
    assert hub_path('naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric') == (
        'naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric', None)
    assert hub_path('./models/base.pt') is None
    assert hub_path('/abs/base.pt') is None
    assert hub_path('~/base.pt') is None


def test_hub_file_offline_error_names_the_file_and_where_to_put_it(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(CheckpointError) as info:
        load_network('uva-cv-lab/SAB3R/demo_ckpt/base/base.pt')
    message = str(info.value)
    assert 'demo_ckpt/base/base.pt of Hugging Face repo uva-cv-lab/SAB3R' in message
    assert 'https://huggingface.co/uva-cv-lab/SAB3R/resolve/main/demo_ckpt/base/base.pt' in message
    assert 'local path' in message


def test_hub_file_download_is_used(tmp_path, monkeypatch):
    import huggingface_hub

    state = _random_state(load_config('tiny_cd'), seed=10)
    (tmp_path / 'cache').mkdir()
    local = _deepspeed_file(tmp_path / 'cache' / 'base.pt', state)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get('local_files_only')))
        return str(local)

    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    monkeypatch.setattr(ckpt_mod, 'RELEASE_ARCHITECTURE', 'tiny_cd')
    net = load_network('uva-cv-lab/SAB3R/demo_ckpt/base/base.pt')
    assert calls == [('uva-cv-lab/SAB3R', 'demo_ckpt/base/base.pt', False)]
    assert net.cfg.name == 'tiny_cd'
