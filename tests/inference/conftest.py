"""Fixtures for the inference tests: one tiny random-weight network, exported once per session.

The tiny_cd architecture with its feature heads at stride 1 (as the shipped sab3r configs): the
pipeline fuses CLIP and DINO features on one cell grid.
"""

from __future__ import annotations

import pytest
import torch

from ros2_sab3r.inference.export import export_network
from ros2_sab3r.model.arch import load_config
from ros2_sab3r.model.network import Sab3rNet, create_network

# Two static sizes: 4:3 (the synthetic frames' aspect) and a wider one.
SIZES = ((48, 64), (32, 64))

torch.set_num_threads(2)  # the machine is shared


@pytest.fixture(scope='session')
def tiny_net() -> Sab3rNet:
    torch.manual_seed(0)
    return create_network(load_config('tiny_cd'))


@pytest.fixture(scope='session')
def export_dir(tiny_net, tmp_path_factory):
    out = tmp_path_factory.mktemp('export')
    manifest = export_network(tiny_net, out, SIZES, source='tiny test net', progress=False)
    return out, manifest
