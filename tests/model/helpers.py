"""Helpers shared by the network tests: tiny networks, images, official-layout checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ros2_sab3r.model.arch import NetworkConfig
from ros2_sab3r.model.network import Sab3rNet, create_network

TINY_ARGS = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
    "img_size=(512, 512), head_type='catmlp+dpt', output_mode='pts3d+desc24', "
    "depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=32, enc_depth=2, "
    "enc_num_heads=2, dec_embed_dim=24, dec_depth=10, dec_num_heads=2, two_confs=True, "
    "desc_conf_mode=('exp', 0, inf))")


DATA = Path(__file__).parent / 'data'


def read_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) rows of a reference state-dict list in data/ (``name<TAB>shape<TAB>dtype``,
    official registration order; every tensor float32)."""
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape, dtype = line.split('\t')
        assert dtype == 'float32'
        rows.append((key, tuple(int(v) for v in shape.strip('()').split(',') if v.strip())))
    return rows


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1  # (B, 3, H, W)


def make_net(name: str, seed: int = 0) -> Sab3rNet:
    torch.manual_seed(seed)
    return create_network(name)


def tiny_official_config() -> NetworkConfig:
    """The tiny architecture as it comes back from TINY_ARGS (dpt/mlp widths are not in the
    official string, so the official-layout tests use the official head widths)."""
    from ros2_sab3r.model.checkpoint import config_from_official, parse_constructor_call

    return config_from_official(*parse_constructor_call(TINY_ARGS), name='tiny_official')


def write_official_checkpoint(path: Path, net: Sab3rNet, model_string: str = TINY_ARGS,
                              state: dict | None = None) -> Path:
    """torch.save in the official layout: {'args': Namespace, 'model': state_dict, 'epoch'}."""
    args = argparse.Namespace(model=model_string, lr=1e-4, batch_size=4, output_dir='/x')
    sd = net.state_dict() if state is None else state
    torch.save({'args': args, 'model': sd, 'epoch': 3}, path)
    return path
