"""Architecture configs as data: every shipped file loads, round-trips and validates."""

from __future__ import annotations

from dataclasses import replace
import json
import math

import pytest

from ros2_sab3r.model.arch import (
    ConfigError,
    FeatureHeadConfig,
    NetworkConfig,
    OutputMode,
    available_configs,
    load_config,
)

pytestmark = pytest.mark.unit


def test_shipped_configs_are_present():
    assert {'mast3r_vitl_512', 'sab3r_c', 'sab3r_cd', 'tiny', 'tiny_cd'} <= set(
        available_configs())


@pytest.mark.parametrize('name', available_configs())
def test_config_round_trips_through_json(name):
    cfg = load_config(name)
    again = NetworkConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert cfg.name == name


def test_official_values():
    cfg = load_config('mast3r_vitl_512')
    assert (cfg.enc_embed_dim, cfg.enc_depth, cfg.enc_num_heads) == (1024, 24, 16)
    assert (cfg.dec_embed_dim, cfg.dec_depth, cfg.dec_num_heads) == (768, 12, 12)
    assert cfg.dpt_hooks == (0, 6, 9, 12)
    assert cfg.depth_mode == OutputMode('exp', -math.inf, math.inf)
    assert cfg.conf_mode == OutputMode('exp', 1.0, math.inf)
    assert cfg.desc_conf_mode == OutputMode('exp', 0.0, math.inf)
    assert cfg.norm_eps == 1e-6 and cfg.rope_base == 100.0 and cfg.two_confs
    assert cfg.feature_heads == ()


def test_sab3r_heads_default_dims():
    c = load_config('sab3r_c')
    cd = load_config('sab3r_cd')
    assert [(h.name, h.out_dim) for h in c.feature_heads] == [('clip', 512)]
    assert [(h.name, h.out_dim) for h in cd.feature_heads] == [('clip', 512), ('dino', 384)]
    assert cd.feature_head('dino').head_type == 'dpt'
    # The release: norm-exp features and desc_conf = 1 + exp(x) (desc_conf_mode = conf_mode).
    assert {h.mode for h in cd.feature_heads} == {OutputMode('exp', -math.inf, math.inf)}
    assert cd.desc_conf_mode == cd.conf_mode == OutputMode('exp', 1.0, math.inf)


@pytest.mark.parametrize('change, message', [
    ({'dec_depth': 9}, 'dec_depth >= 10'),
    ({'enc_num_heads': 3}, 'not divisible'),
    ({'enc_embed_dim': 36, 'enc_num_heads': 2}, 'multiple of 4'),
    ({'head_type': 'dpt'}, r'catmlp\+dpt'),
    ({'depth_mode': OutputMode('exp', 0.0, math.inf)}, 'bounds'),
    ({'conf_mode': OutputMode('relu', 1.0, math.inf)}, 'confidence mode'),
])
def test_invalid_configs_are_rejected(tiny_cfg, change, message):
    with pytest.raises(ConfigError, match=message):
        replace(tiny_cfg, **change)


def test_invalid_feature_heads_are_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="head_type 'mlp'"):
        replace(tiny_cfg, feature_heads=(FeatureHeadConfig('clip', 8, head_type='mlp'),))
    with pytest.raises(ConfigError, match="mode 'sigmoid'"):
        replace(tiny_cfg, feature_heads=(FeatureHeadConfig('clip', 8, mode='sigmoid'),))
    with pytest.raises(ConfigError, match='clip before dino'):
        replace(tiny_cfg,
                feature_heads=(FeatureHeadConfig('dino', 8), FeatureHeadConfig('clip', 8)))
    with pytest.raises(ConfigError, match='not one of'):
        replace(tiny_cfg, feature_heads=(FeatureHeadConfig('seg', 8),))
    with pytest.raises(ConfigError, match='duplicate'):
        replace(tiny_cfg, feature_heads=(FeatureHeadConfig('clip', 8),) * 2)


def test_unknown_fields_and_names_are_reported(tmp_path):
    with pytest.raises(ConfigError, match='unknown architecture fields'):
        NetworkConfig.from_dict({'enc_width': 3})
    with pytest.raises(ConfigError, match='not found'):
        load_config('no_such_architecture')
    with pytest.raises(ConfigError, match="'inf' or '-inf'"):
        OutputMode.from_json(['exp', 'huge', 'inf'])
