"""The configuration dataclasses, their validation and the generated parameter file."""

from pathlib import Path

import pytest
import yaml

from ros2_sab3r.config import (
    PerceptionConfig,
    config_from_flat,
    param_infos,
    parse_standin_scene,
    render_params_yaml,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    assert PerceptionConfig().validate() == PerceptionConfig()


def test_params_yaml_is_generated_from_config():
    committed = (ROOT / 'config' / 'perception.yaml').read_text(encoding='utf-8')
    assert committed == render_params_yaml(), (
        'config/perception.yaml is out of date: run `python -m ros2_sab3r.config > '
        'config/perception.yaml`')


def test_params_yaml_round_trips_into_the_defaults():
    doc = yaml.safe_load(render_params_yaml())['/**']['ros__parameters']
    flat = {f'{sec}.{key}': value for sec, kv in doc.items() for key, value in kv.items()}
    assert set(flat) == {p.name for p in param_infos()}
    assert config_from_flat(flat) == PerceptionConfig()


def test_every_parameter_is_described():
    for info in param_infos():
        assert len(info.spec.description) > 10, info.name
        # one line: unit, range and effect; the why belongs in a comment beside the field
        assert '\n' not in info.spec.description and len(info.spec.description) <= 130, (
            info.name, len(info.spec.description))
        if isinstance(info.default, (int, float)) and not isinstance(info.default, bool):
            assert info.spec.min is not None and info.spec.max is not None, info.name


@pytest.mark.parametrize('name, value, message', [
    ('mapping.voxel_size_m', 0.0, 'below its minimum'),
    ('mapping.voxel_size_m', float('nan'), 'finite'),
    ('keyframes.window_size', 1000, 'above its maximum'),
    ('model.backend', 'tensorflow', 'not one of'),
    ('model.image_width', 500, 'multiple of 16'),
    ('camera.image_topics', [], 'at least one image topic'),
    ('camera.camera_info_topics', ['/a', '/b'], 'one per image topic'),
    ('frames.map_frame', '', 'must not be empty'),
    ('mapping.max_voxels', 1.5, 'must be of type int'),
    ('no.such', 1, 'unknown parameter'),
    ('model.standin_scene', 'frames=1', 'too small to map'),
    ('model.standin_scene', 'seed=x', 'not an integer'),
    ('model.standin_scene', 'colour=red', 'bad scene option'),
    ('model.standin_scene', 'seed=0;swap=chair', 'CLASS:CLASS'),
])
def test_invalid_values_are_rejected_with_the_reason(name, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_flat({name: value})


def test_plugin_backend_path_is_accepted():
    cfg = config_from_flat({'model.backend': 'my_pkg.backends:MyBackend'})
    assert cfg.model.backend == 'my_pkg.backends:MyBackend'


def test_standin_scene_parses_into_scene_options_and_perturbations():
    assert parse_standin_scene('') == ({}, {})
    assert parse_standin_scene('synthetic:seed=2,fps=2.5;pose_noise_deg=3,swap=chair:sofa') == (
        {'seed': 2, 'fps': 2.5}, {'pose_noise_deg': 3.0, 'swap': ('chair', 'sofa')})


def test_int_promotes_to_float():
    assert config_from_flat({'mapping.voxel_size_m': 1}).mapping.voxel_size_m == 1.0
