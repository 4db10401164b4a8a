"""The backend overlays in config/ name only declared parameters with valid values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ros2_sab3r.config import config_from_flat

pytestmark = pytest.mark.unit

CONFIG = Path(__file__).resolve().parents[2] / 'config'


def _flat(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


@pytest.mark.parametrize('name, backend', [('onnxruntime.yaml', 'onnxruntime'),
                                           ('tensorrt.yaml', 'tensorrt')])
def test_overlay_is_a_valid_configuration(name, backend):
    doc = yaml.safe_load((CONFIG / name).read_text(encoding='utf-8'))
    cfg = config_from_flat(_flat(doc['/**']['ros__parameters']))
    assert cfg.model.backend == backend
    assert cfg.model.image_height % 16 == 0 and cfg.model.image_width % 16 == 0
