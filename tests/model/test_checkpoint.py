"""Checkpoint loading: official layout, SAB3R head mapping, our safetensors format, hub ids."""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import math
from pathlib import Path

import pytest
import torch

from ros2_sab3r.model.arch import ConfigError, load_config
from ros2_sab3r.model.checkpoint import (
    CheckpointError,
    config_from_official,
    load_network,
    parse_constructor_call,
    save_network,
)
from ros2_sab3r.model.network import create_network
from tests.model.helpers import (
    TINY_ARGS,
    make_net,
    random_images,
    tiny_official_config,
    write_official_checkpoint,
)

pytestmark = pytest.mark.model

OFFICIAL_ARGS = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
    "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
    "depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, "
    "enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True, "
    "desc_conf_mode=('exp', 0, inf))")


def _assert_same_outputs(net_a, net_b, size=(32, 48)):
    img1, img2 = random_images(1, *size, seed=21), random_images(1, *size, seed=22)
    with torch.no_grad():
        a, b = net_a(img1, img2), net_b(img1, img2)
    for va, vb in ((a.view1, b.view1), (a.view2, b.view2)):
        for field in ('pts3d', 'conf', 'desc', 'desc_conf', 'clip', 'dino'):
            x, y = getattr(va, field), getattr(vb, field)
            if x is None:
                assert y is None
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_parse_official_model_string():
    name, kwargs = parse_constructor_call(OFFICIAL_ARGS)
    assert name == 'AsymmetricMASt3R'
    assert kwargs['img_size'] == (512, 512)
    assert kwargs['depth_mode'] == ('exp', -math.inf, math.inf)
    assert kwargs['two_confs'] is True and kwargs['enc_depth'] == 24
    cfg = config_from_official(name, kwargs, name='mast3r_vitl_512')
    assert cfg == load_config('mast3r_vitl_512')


def test_parse_accepts_landscape_only_and_lists():
    name, kwargs = parse_constructor_call(
        "AsymmetricMASt3R(landscape_only=True, x=[1, -2.5, None], s='a,b')")
    assert kwargs == {'landscape_only': True, 'x': [1, -2.5, None], 's': 'a,b'}


@pytest.mark.parametrize('text', [
    "__import__('os').system('true')",
    "AsymmetricMASt3R(enc_depth=__import__('os').getpid())",
    'AsymmetricMASt3R(enc_depth=os.sep)',
    'AsymmetricMASt3R(24)',
    'AsymmetricMASt3R(**kw)',
    'AsymmetricMASt3R(enc_depth=2*12)',
    "AsymmetricMASt3R(enc_depth=-'a')",
    'AsymmetricMASt3R(',
])
def test_parse_rejects_anything_but_literals(text):
    with pytest.raises(ValueError):
        parse_constructor_call(text)


def test_official_config_errors():
    _, kwargs = parse_constructor_call(OFFICIAL_ARGS)
    with pytest.raises(ConfigError, match='not supported'):
        config_from_official('AsymmetricCroCo3DStereo', kwargs)
    with pytest.raises(ConfigError, match='output_mode'):
        config_from_official('AsymmetricMASt3R', {**kwargs, 'output_mode': 'pts3d'})
    with pytest.raises(ConfigError, match='pos_embed'):
        config_from_official('AsymmetricMASt3R', {**kwargs, 'pos_embed': 'cosine'})
    no_depth = dict(kwargs)
    del no_depth['dec_depth']
    with pytest.raises(ConfigError, match='dec_depth'):
        config_from_official('AsymmetricMASt3R', no_depth)


def test_load_official_layout(tmp_path, tiny_official_net):
    path = write_official_checkpoint(tmp_path / 'ckpt.pth', tiny_official_net)
    net = load_network(path)
    assert net.cfg == replace(tiny_official_config(), name='ckpt')
    _assert_same_outputs(net, tiny_official_net)


def test_load_official_without_dec_blocks2_copies_decoder(tmp_path, tiny_official_net):
    sd = {k: v for k, v in tiny_official_net.state_dict().items()
          if not k.startswith('dec_blocks2.')}
    path = write_official_checkpoint(tmp_path / 'croco_init.pth', tiny_official_net, state=sd)
    net = load_network(path)
    torch.testing.assert_close(net.dec_blocks2[3].mlp.fc1.weight,
                               tiny_official_net.dec_blocks[3].mlp.fc1.weight, rtol=0, atol=0)
    # copies, not shared storage: the two decoders stay independent (and saveable)
    w1, w2 = net.dec_blocks[3].mlp.fc1.weight, net.dec_blocks2[3].mlp.fc1.weight
    assert w1.data_ptr() != w2.data_ptr()
    save_network(net, tmp_path / 'resaved.safetensors')


def test_load_accepts_either_alias_name(tmp_path, tiny_official_net):
    sd = tiny_official_net.state_dict()
    only_new = {k: v for k, v in sd.items() if '_rn.' not in k or 'layer_rn.' in k}
    only_old = {k: v for k, v in sd.items() if 'layer_rn.' not in k}
    assert len(only_new) == len(only_old) == len(sd) - 8
    for name, state in (('new.pth', only_new), ('old.pth', only_old)):
        net = load_network(write_official_checkpoint(tmp_path / name, tiny_official_net,
                                                     state=state))
        _assert_same_outputs(net, tiny_official_net)


def test_differing_aliases_are_an_error(tmp_path, tiny_official_net):
    sd = dict(tiny_official_net.state_dict())
    key = 'downstream_head1.dpt.scratch.layer_rn.2.weight'
    sd[key] = sd[key] + 1.0
    path = write_official_checkpoint(tmp_path / 'bad_alias.pth', tiny_official_net, state=sd)
    with pytest.raises(CheckpointError, match='alias keys'):
        load_network(path)


def test_missing_and_unexpected_keys_are_reported_with_the_file(tmp_path, tiny_official_net):
    sd = dict(tiny_official_net.state_dict())
    del sd['enc_norm.weight']
    sd['some_new_head.weight'] = torch.zeros(3)
    path = write_official_checkpoint(tmp_path / 'broken.pth', tiny_official_net, state=sd)
    with pytest.raises(CheckpointError) as info:
        load_network(path)
    msg = str(info.value)
    assert str(path) in msg and 'enc_norm.weight' in msg and 'some_new_head.weight' in msg
    assert '1 missing' in msg and '1 unexpected' in msg
    # non-strict: loads, the missing key keeps its initial value
    net = load_network(path, strict=False)
    assert torch.isfinite(net.enc_norm.weight).all()


def test_wrong_shapes_are_an_error(tmp_path, tiny_official_net):
    bigger = TINY_ARGS.replace('enc_embed_dim=32', 'enc_embed_dim=64')
    path = write_official_checkpoint(tmp_path / 'shape.pth', tiny_official_net,
                                     model_string=bigger)
    with pytest.raises(CheckpointError, match='wrong shape'):
        load_network(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'state_dict': {}}, path)
    with pytest.raises(CheckpointError, match="neither a 'model' nor a 'module' key"):
        load_network(path)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_network(tmp_path / 'nothing.pth')


def test_unsafe_pickles_are_refused(tmp_path, tiny_official_net):
    path = tmp_path / 'unsafe.pth'
    args = argparse.Namespace(model=TINY_ARGS, extra=Path('/tmp'))  # a non-allow-listed global
    torch.save({'args': args, 'model': tiny_official_net.state_dict()}, path)
    with pytest.raises(CheckpointError, match='full .code-running. unpickling'):
        load_network(path)
    net = load_network(path, trusted=True)  # explicit opt-in for files one made
    _assert_same_outputs(net, tiny_official_net)


def test_training_layout_with_unknown_class_needs_an_architecture(tmp_path, tiny_cd_net):
    path = write_official_checkpoint(tmp_path / 'sab3r.pth', tiny_cd_net,
                                     model_string='Sab3rModel(foo=1)')
    with pytest.raises(CheckpointError, match='not supported'):
        load_network(path)  # unknown class: the architecture must be named
    with pytest.raises(CheckpointError, match='clip_head and dino_head weights.*sab3r_cd'):
        load_network(path, config='tiny')  # heads the architecture lacks: named, with the fix
    _assert_same_outputs(load_network(path, config='tiny_cd'), tiny_cd_net)


def test_safetensors_round_trip(tmp_path, tiny_cd_net):
    path = save_network(tiny_cd_net, tmp_path / 'export' / 'tiny_cd.safetensors')
    assert path.with_suffix('.json').is_file()
    sidecar = json.loads(path.with_suffix('.json').read_text())
    assert sidecar['format'] == 'ros2_sab3r' and sidecar['config']['name'] == 'tiny_cd'
    # safetensors: an 8-byte little-endian header length and a JSON header, no pickle opcodes
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], 'little')
    assert json.loads(raw[8:8 + header_len])['__metadata__']['format'] == 'ros2_sab3r'
    net = load_network(path)
    assert net.cfg == tiny_cd_net.cfg
    _assert_same_outputs(net, tiny_cd_net)
    # a directory holding exactly one checkpoint also works
    path.with_suffix('.json').unlink()
    _assert_same_outputs(load_network(path.parent), tiny_cd_net)


def test_hub_directory_with_official_config(tmp_path, tiny_official_net):
    from safetensors.torch import save_file

    _, kwargs = parse_constructor_call(TINY_ARGS)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    (tmp_path / 'config.json').write_text(json.dumps(kwargs))  # -Infinity/Infinity, as the hub
    sd = {k: v.contiguous() for k, v in tiny_official_net.state_dict().items()
          if 'layer_rn.' not in k}
    save_file(sd, str(tmp_path / 'model.safetensors'))
    _assert_same_outputs(load_network(tmp_path), tiny_official_net)


def test_repo_id_offline_names_the_file(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append((repo_id, filename, local_files_only))
        raise huggingface_hub.errors.LocalEntryNotFoundError('not in cache')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)
    repo = 'naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric'
    with pytest.raises(CheckpointError) as info:
        load_network(repo)
    msg = str(info.value)
    assert 'model.safetensors' in msg and repo in msg and 'HF_HUB_OFFLINE' in msg
    assert calls == [(repo, 'model.safetensors', True)]


def test_repo_id_downloads_through_the_hub(monkeypatch, tmp_path, tiny_cd_net):
    import huggingface_hub

    save_network(tiny_cd_net, tmp_path / 'cache' / 'model.safetensors')
    (tmp_path / 'cache' / 'model.json').rename(tmp_path / 'cache' / 'config.json')

    def fake_download(repo_id, filename, local_files_only=False, **kwargs):
        assert repo_id == 'someone/tiny-sab3r'
        return str(tmp_path / 'cache' / filename)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.chdir(tmp_path)
    _assert_same_outputs(load_network('someone/tiny-sab3r'), tiny_cd_net)


def test_loaded_network_is_eval_and_float32(tmp_path):
    net = make_net('tiny', seed=9)
    half = {k: v.half() for k, v in net.state_dict().items()}
    path = write_official_checkpoint(tmp_path / 'half.pth', net, state=half)
    loaded = load_network(path, config='tiny')
    assert not loaded.training
    assert loaded.enc_blocks[0].attn.qkv.weight.dtype == torch.float32
    assert create_network('tiny').cfg == loaded.cfg
