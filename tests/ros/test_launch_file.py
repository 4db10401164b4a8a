"""launch/perception.launch.py against test doubles of the launch API.

`launch`/`launch_ros` are not published as wheels, so the real launch system cannot run here.
These doubles record what the file asks for, so that a wrong parameter name, a missing argument
or a broken override fails here rather than on a robot.
"""

import importlib.util
from pathlib import Path
import sys
import types

import pytest

from ros2_sab3r.config import param_infos

pytestmark = pytest.mark.unit

LAUNCH_FILE = Path(__file__).resolve().parents[2] / 'launch' / 'perception.launch.py'


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfigurationDouble:
    values: dict = {}

    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context[self.name]


ROOT = LAUNCH_FILE.parents[1]


def _share_directory(pkg: str) -> str:
    # the source tree has the same launch/ and config/ layout as the installed share directory
    return str(ROOT) if pkg == 'ros2_sab3r' else f'/opt/ros/share/{pkg}'


def _install_launch_doubles(monkeypatch):
    modules = {
        'launch': {'LaunchDescription': _Recorder},
        'launch.actions': {name: _Recorder for name in (
            'DeclareLaunchArgument', 'OpaqueFunction', 'ExecuteProcess',
            'IncludeLaunchDescription', 'TimerAction')},
        'launch.launch_description_sources': {'PythonLaunchDescriptionSource': _Recorder},
        'launch.substitutions': {'LaunchConfiguration': LaunchConfigurationDouble},
        'launch_ros': {},
        'launch_ros.actions': {'LifecycleNode': _Recorder, 'Node': _Recorder},
        'ament_index_python': {},
        'ament_index_python.packages': {'get_package_share_directory': _share_directory},
    }
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


@pytest.fixture
def launch_module(monkeypatch):
    _install_launch_doubles(monkeypatch)
    spec = importlib.util.spec_from_file_location('perception_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, **overrides):
    desc = module.generate_launch_description()
    entities = desc.args[0]
    declared = {e.args[0]: e.kwargs for e in entities if isinstance(e, _Recorder) and e.args}
    context = {name: kw['default_value'] for name, kw in declared.items()}
    context.update(overrides)
    opaque = entities[-1]
    node, *others = opaque.kwargs['function'](context)
    return declared, node.kwargs, [o.kwargs for o in others]


def test_documented_arguments(launch_module):
    declared, _, _ = _run(launch_module)
    for name in ('params_file', 'namespace', 'image_topics', 'backend', 'checkpoint',
                 'use_sim_time', 'log_level'):
        assert name in declared, name
        assert len(declared[name]['description']) > 10, name
    assert declared['params_file']['default_value'].endswith('config/perception.yaml')


def test_node_and_overrides(launch_module):
    _, node, others = _run(launch_module, image_topics='/a/image, /b/image', backend='onnxruntime',
                   use_sim_time='true', namespace='robot1', log_level='debug')
    assert node['package'] == 'ros2_sab3r' and node['executable'] == 'perception_node'
    assert node['namespace'] == 'robot1' and others == []  # no rviz unless asked
    params_file, overrides = node['parameters']
    assert params_file.endswith('perception.yaml')
    assert overrides['camera.image_topics'] == ['/a/image', '/b/image']
    assert overrides['model.backend'] == 'onnxruntime'
    assert overrides['use_sim_time'] is True
    assert node['arguments'] == ['--ros-args', '--log-level', 'debug']
    known = {p.name for p in param_infos()} | {'use_sim_time'}
    assert set(overrides) <= known, set(overrides) - known


def test_empty_arguments_leave_params_file_in_charge(launch_module):
    _, node, _ = _run(launch_module)
    overrides = node['parameters'][1]
    assert 'model.backend' not in overrides and 'camera.image_topics' not in overrides


def test_rviz_follows_the_node_namespace(launch_module):
    _, _, (rviz,) = _run(launch_module, rviz='true', namespace='robot1', use_sim_time='true')
    assert (rviz['package'], rviz['executable']) == ('rviz2', 'rviz2')
    assert rviz['parameters'] == [{'use_sim_time': True}]
    flag, path = rviz['arguments']
    text = Path(path).read_text(encoding='utf-8')
    Path(path).unlink()
    assert flag == '-d' and 'Value: /robot1/perception_node/semantic_map' in text
    assert 'Value: /perception_node/' not in text
    _, _, (rviz,) = _run(launch_module, rviz='true')
    assert rviz['arguments'][1] == str(ROOT / 'config' / 'perception.rviz')


@pytest.fixture
def replay_module(monkeypatch):
    _install_launch_doubles(monkeypatch)
    spec = importlib.util.spec_from_file_location('replay_launch', ROOT / 'launch' /
                                                  'replay.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replay(module, **overrides):
    entities = module.generate_launch_description().args[0]
    declared = {e.args[0]: e.kwargs for e in entities if isinstance(e, _Recorder) and e.args}
    context = {name: kw['default_value'] for name, kw in declared.items()}
    context.update(overrides)
    return declared, entities[-1].kwargs['function'](context)


def test_replay_plays_the_bag_on_sim_time_into_the_node(replay_module, launch_module):
    declared, (include, timer) = _replay(replay_module, bag='/data/run.mcap', rate='0.5',
                                         loop='true', backend='onnxruntime', rviz='true')
    assert all(len(kw['description']) > 5 for kw in declared.values())
    (source,) = include.args
    assert source.args[0] == str(ROOT / 'launch' / 'perception.launch.py')
    forwarded = dict(include.kwargs['launch_arguments'])
    assert forwarded == {'backend': 'onnxruntime', 'rviz': 'true', 'use_sim_time': 'true'}
    # every forwarded name is an argument perception.launch.py declares
    perception_args, _, _ = _run(launch_module)
    assert set(forwarded) <= set(perception_args)
    assert timer.kwargs['period'] == 5.0
    (play,) = timer.kwargs['actions']
    assert play.kwargs['cmd'] == ['ros2', 'bag', 'play', '/data/run.mcap', '--clock', '--rate',
                                  '0.5', '--loop']


def test_replay_refuses_a_missing_bag_or_a_bad_rate(replay_module):
    with pytest.raises(RuntimeError, match='bag:=PATH'):
        _replay(replay_module)
    with pytest.raises(RuntimeError, match='rate'):
        _replay(replay_module, bag='/b', rate='0')
