"""launch/*.launch.py against test doubles of the launch API that model its semantics.

`launch`/`launch_ros` are not published as wheels, so the real launch system cannot run here.
The doubles record what the files ask for and interpret them the way launch does where it
matters (checked against the ros2/launch sources): launch configurations form ONE dictionary
shared by a file and every file it includes; DeclareLaunchArgument sets its default only when the
name is still unset; IncludeLaunchDescription sets its launch_arguments into that same dictionary
before visiting the included description; entities are visited in order, so an OpaqueFunction
that raises stops everything after it. Command-line arguments are set first, as `ros2 launch`
does. That is the semantics under which replay.launch.py once started the node with
`--log-level ''`.
"""

import importlib.util
from pathlib import Path
import sys
import types

import pytest

from ros2_sab3r.config import param_infos

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILE = ROOT / 'launch' / 'perception.launch.py'
REPLAY_FILE = ROOT / 'launch' / 'replay.launch.py'


class _Recorder:
    kind = ''

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _recorder(kind: str) -> type:
    return type(kind + 'Double', (_Recorder,), {'kind': kind})


class LaunchConfigurationDouble:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        if self.name not in context:
            raise KeyError(f'launch configuration {self.name!r} is not set')
        return context[self.name]


class PackageNotFoundDouble(KeyError):
    pass


# packages the doubled ament index knows; rviz2 is added by the tests that want it
INSTALLED = {'ros2_sab3r'}


def _share_directory(pkg: str) -> str:
    # the source tree has the same launch/ and config/ layout as the installed share directory
    if pkg not in INSTALLED:
        raise PackageNotFoundDouble(pkg)
    return str(ROOT) if pkg == 'ros2_sab3r' else f'/opt/ros/share/{pkg}'


def _install_launch_doubles(monkeypatch):
    modules = {
        'launch': {'LaunchDescription': _recorder('LaunchDescription')},
        'launch.actions': {name: _recorder(name) for name in (
            'DeclareLaunchArgument', 'OpaqueFunction', 'ExecuteProcess',
            'IncludeLaunchDescription', 'TimerAction')},
        'launch.launch_description_sources': {
            'PythonLaunchDescriptionSource': _recorder('PythonLaunchDescriptionSource')},
        'launch.substitutions': {'LaunchConfiguration': LaunchConfigurationDouble},
        'launch_ros': {},
        'launch_ros.actions': {name: _recorder(name) for name in ('LifecycleNode', 'Node')},
        'ament_index_python': {},
        'ament_index_python.packages': {'get_package_share_directory': _share_directory,
                                        'PackageNotFoundError': PackageNotFoundDouble},
    }
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def launch_module(monkeypatch):
    _install_launch_doubles(monkeypatch)
    monkeypatch.setattr(sys.modules[__name__], 'INSTALLED', {'ros2_sab3r', 'rviz2'})
    return _load(LAUNCH_FILE)


class LaunchRun:
    """What one launch did: the shared configurations, declared arguments, started actions."""

    def __init__(self, command_line: dict[str, str]):
        self.context = dict(command_line)  # `ros2 launch f.py a:=b` sets these first
        self.declared: dict[str, dict] = {}
        self.started: list[tuple[str, dict]] = []  # ('LifecycleNode' | 'Node' | ..., kwargs)
        self.timers: list[dict] = []

    def visit(self, entity) -> None:
        kind = entity.kind
        if kind == 'LaunchDescription':
            for child in entity.args[0]:
                self.visit(child)
        elif kind == 'DeclareLaunchArgument':
            name = entity.args[0]
            self.declared.setdefault(name, entity.kwargs)
            if name not in self.context:  # launch: the default only fills an unset name
                assert 'default_value' in entity.kwargs, f'{name} has no default'
                self.context[name] = entity.kwargs['default_value']
        elif kind == 'IncludeLaunchDescription':
            (source,) = entity.args
            for name, value in entity.kwargs.get('launch_arguments', ()):
                self.context[name] = value  # SetLaunchConfiguration: no scope of its own
            self.visit(_load(Path(source.args[0])).generate_launch_description())
        elif kind == 'OpaqueFunction':
            for child in entity.kwargs['function'](self.context) or ():
                self.visit(child)
        elif kind == 'TimerAction':
            self.timers.append(entity.kwargs)
            for child in entity.kwargs['actions']:
                self.visit(child)
        else:
            self.started.append((kind, entity.kwargs))

    def started_of(self, kind: str) -> list[dict]:
        return [kwargs for k, kwargs in self.started if k == kind]


def _launch(path: Path, **command_line) -> LaunchRun:
    run = LaunchRun(command_line)
    run.visit(_load(path).generate_launch_description())
    return run


def _run(module, **overrides):
    run = _launch(LAUNCH_FILE, **overrides)
    (node,) = run.started_of('LifecycleNode')
    return run.declared, node, run.started_of('Node')


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




def test_new_arguments_reach_their_parameters(launch_module):
    _, node, _ = _run(launch_module, text_encoder='/m/open_clip.bin', pose_source='tf',
                      compressed='true', camera_reliability='reliable', respawn='true',
                      respawn_delay='4')
    overrides = node['parameters'][1]
    assert overrides['model.text_encoder'] == '/m/open_clip.bin'
    assert overrides['frames.pose_source'] == 'tf'
    assert overrides['camera.compressed'] is True
    assert overrides['camera.qos_reliability'] == 'reliable'
    assert node['respawn'] is True and node['respawn_delay'] == 4.0
    known = {p.name for p in param_infos()} | {'use_sim_time'}
    assert set(overrides) <= known, set(overrides) - known
    _, node, _ = _run(launch_module, compressed='false')
    assert node['parameters'][1]['camera.compressed'] is False and node['respawn'] is False


@pytest.mark.parametrize('argument', [('compressed', 'maybe'), ('log_level', 'loud'),
                                      ('respawn_delay', '-1'), ('rviz', 'sure')])
def test_bad_arguments_stop_the_launch_before_the_node(launch_module, argument):
    run = LaunchRun(dict([argument]))
    with pytest.raises(RuntimeError, match=argument[0]):
        run.visit(launch_module.generate_launch_description())
    assert run.started == []


def test_rviz_without_rviz2_fails_before_starting_anything(launch_module, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'INSTALLED', {'ros2_sab3r'})
    run = LaunchRun({'rviz': 'true'})
    with pytest.raises(RuntimeError, match='rviz2 package is not installed'):
        run.visit(launch_module.generate_launch_description())
    assert run.started == []  # no node left running without its launch


def test_perception_included_with_empty_configurations_keeps_its_defaults(launch_module):
    # an includer that declared these names with '' leaves them '' in the shared configurations
    _, node, _ = _run(launch_module, log_level='', params_file='', autostart='', rviz='',
                      use_sim_time='')
    assert node['arguments'] == ['--ros-args', '--log-level', 'info']
    assert node['parameters'][0] == str(ROOT / 'config' / 'perception.yaml')
    assert node['parameters'][1]['node.autostart'] is True


@pytest.fixture
def bag(tmp_path):
    path = tmp_path / 'run.mcap'
    path.write_bytes(b'')
    return str(path)


def test_replay_starts_the_node_with_perception_defaults(launch_module, bag):
    """The bug seen with real launch: the node died on `--log-level ''` and params_file ''."""
    run = _launch(REPLAY_FILE, bag=bag)
    (node,) = run.started_of('LifecycleNode')
    assert node['arguments'] == ['--ros-args', '--log-level', 'info']
    params_file, overrides = node['parameters']
    assert params_file == str(ROOT / 'config' / 'perception.yaml')
    assert overrides['use_sim_time'] is True
    assert run.started_of('Node') == []  # no rviz unless asked


def test_replay_hands_the_command_line_to_the_node(launch_module, bag):
    run = _launch(REPLAY_FILE, bag=bag, rate='0.5', loop='true', backend='onnxruntime',
                  rviz='true', log_level='debug', use_sim_time='false')
    assert all(len(kw['description']) > 5 for kw in run.declared.values())
    # replay declares its own arguments and shows perception's through the include
    perception_args, _, _ = _run(launch_module)
    assert set(perception_args) <= set(run.declared)
    (node,) = run.started_of('LifecycleNode')
    assert node['arguments'][-1] == 'debug'
    assert node['parameters'][1]['model.backend'] == 'onnxruntime'
    assert node['parameters'][1]['use_sim_time'] is True  # replay always runs on the bag clock
    (rviz,) = run.started_of('Node')
    assert rviz['parameters'] == [{'use_sim_time': True}]
    (timer,) = run.timers
    assert timer['period'] == 5.0
    (play,) = run.started_of('ExecuteProcess')
    assert play['cmd'] == ['ros2', 'bag', 'play', bag, '--clock', '--rate', '0.5', '--loop']


@pytest.mark.parametrize('arguments, match', [
    ({}, 'bag:=PATH'), ({'bag': '/no/such/bag'}, 'does not exist'),
    ({'rate': '0'}, 'rate'), ({'start_delay': 'soon'}, 'start_delay')])
def test_replay_refuses_bad_arguments_before_starting_the_node(launch_module, bag, arguments,
                                                              match):
    run = LaunchRun({'bag': bag, **arguments} if arguments else {})
    with pytest.raises(RuntimeError, match=match):
        run.visit(_load(REPLAY_FILE).generate_launch_description())
    assert run.started == []
