"""Fixtures for the network tests: tiny random-weight networks, no network access."""

from __future__ import annotations

import pytest
import torch

from ros2_sab3r.model.arch import NetworkConfig, load_config
from ros2_sab3r.model.network import Sab3rNet, create_network
from tests.model.helpers import make_net, tiny_official_config

# The machine is shared; two threads keep a tiny forward fast without starving neighbours.
torch.set_num_threads(2)


@pytest.fixture(scope='session')
def tiny_net() -> Sab3rNet:
    return make_net('tiny')


@pytest.fixture(scope='session')
def tiny_cd_net() -> Sab3rNet:
    return make_net('tiny_cd')


@pytest.fixture(scope='session')
def tiny_official_net() -> Sab3rNet:
    torch.manual_seed(1)
    return create_network(tiny_official_config())


@pytest.fixture()
def tiny_cfg() -> NetworkConfig:
    return load_config('tiny')
