"""Start the ros2_sab3r perception node.

    ros2 launch ros2_sab3r perception.launch.py
    ros2 launch ros2_sab3r perception.launch.py namespace:=robot1 \
        image_topics:=/front/image_raw,/wrist/image_raw \
        camera_info_topics:=/front/camera_info,/wrist/camera_info \
        backend:=onnxruntime checkpoint:=/models/sab3r_512.onnx
    ros2 launch ros2_sab3r perception.launch.py rviz:=true   # also opens config/perception.rviz

Every node parameter lives in params_file (default: the package's config/perception.yaml); the
arguments below override the few that change from robot to robot. Run
`ros2 launch ros2_sab3r perception.launch.py --show-args` for the list.
"""

import os
import tempfile

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from launch import LaunchDescription

# Launch configurations are shared with the file that includes this one (launch has no scope per
# included file): an includer that declares one of these names with '' leaves it '' here, since
# DeclareLaunchArgument only sets its default when the name is unset. So every argument treats
# '' as "use the default" and this file works whatever includes it.
_OVERRIDES = {
    # launch argument -> node parameter (applied only when the argument is not empty)
    'backend': 'model.backend',
    'checkpoint': 'model.checkpoint',
    'device': 'model.device',
    'text_encoder': 'model.text_encoder',
    'map_frame': 'frames.map_frame',
    'pose_source': 'frames.pose_source',
    'camera_reliability': 'camera.qos_reliability',
}
_BOOL_OVERRIDES = {'compressed': 'camera.compressed'}
# Every argument: (name, default, description), in --show-args order. A default of '' means
# "the parameter's value in params_file"; None: computed (the package's perception.yaml).
_ARGUMENTS = (
    ('params_file', None, 'YAML with all node parameters (see config/perception.yaml)'),
    ('namespace', '', 'namespace of the node, its topics and services'),
    ('image_topics', '', 'comma-separated sensor_msgs/Image topics, one per camera; empty: '
                         'camera.image_topics from params_file'),
    ('camera_info_topics', '', 'comma-separated CameraInfo topics in the order of image_topics; '
                               'empty: camera.camera_info_topics from params_file'),
    ('backend', '', "inference backend: 'torch', 'onnxruntime', 'tensorrt' or 'none' (no "
                    'network); empty: model.backend from params_file'),
    ('checkpoint', '', 'SAB3R checkpoint file, Hugging Face repo id, or ONNX/engine directory '
                       '(required by the built-in backends); empty: model.checkpoint'),
    ('device', '', "'cpu' or 'cuda'; empty: model.device"),
    ('text_encoder', '', "CLIP ViT-B/16 text tower: open_clip file, 'openai' or 'module:Class'; "
                         'empty: model.text_encoder'),
    ('map_frame', '', 'map frame; empty: frames.map_frame'),
    ('pose_source', '', "'tf' (camera poses from TF) or 'none' (from SAB3R); empty: "
                        'frames.pose_source'),
    ('compressed', '', 'true: subscribe to <image_topic>/compressed; empty: camera.compressed'),
    ('camera_reliability', '', "camera QoS 'best_effort' or 'reliable' (see "
                               'camera.qos_reliability); empty: params_file'),
    ('respawn', 'false', 'restart the node process if it exits (then autostart configures it)'),
    ('respawn_delay', '2.0', 'seconds to wait before a respawn'),
    ('use_sim_time', 'false', 'use /clock (true when replaying bags with --clock)'),
    ('autostart', 'true', 'configure and activate the lifecycle node at once; false when a '
                          'lifecycle manager drives it'),
    ('rviz', 'false', 'also start rviz2 with config/perception.rviz (map, located objects, '
                      'relevancy, keyframes, trajectory)'),
    ('log_level', 'info', 'debug, info, warn, error or fatal'),
)
_DEFAULTS = {name: default for name, default, _ in _ARGUMENTS}
assert set(_OVERRIDES) | set(_BOOL_OVERRIDES) <= set(_DEFAULTS)
_LOG_LEVELS = ('debug', 'info', 'warn', 'error', 'fatal')


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(',') if item.strip()]


def _bool_argument(name: str, text: str) -> bool:
    if text.lower() in ('true', '1', 'yes'):
        return True
    if text.lower() in ('false', '0', 'no'):
        return False
    raise RuntimeError(f'{name}:={text} is not a boolean; use true or false')


def rviz_config_for(namespace: str) -> str:
    """The package's RViz layout with the node's topics moved into `namespace`."""
    path = os.path.join(get_package_share_directory('ros2_sab3r'), 'config', 'perception.rviz')
    ns = namespace.strip('/')
    if not ns:
        return path
    with open(path, encoding='utf-8') as f:
        text = f.read().replace('Value: /perception_node/', f'Value: /{ns}/perception_node/')
    fd, out = tempfile.mkstemp(prefix=f'perception_{ns.replace("/", "_")}_', suffix='.rviz')
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
    return out


def _default_params_file() -> str:
    return os.path.join(get_package_share_directory('ros2_sab3r'), 'config', 'perception.yaml')


def _require_rviz2() -> None:
    # Checked before any action is returned: a missing rviz2 must not leave the node running
    # with nobody to stop it when launch exits on the failed rviz2 action.
    try:
        get_package_share_directory('rviz2')
    except PackageNotFoundError:
        raise RuntimeError('rviz:=true but the rviz2 package is not installed; install '
                           'ros-<distro>-rviz2 or launch with rviz:=false') from None


def _default(name: str) -> str:
    default = _DEFAULTS[name]
    return _default_params_file() if default is None else default


def _node(context):
    value = {name: LaunchConfiguration(name).perform(context) or _default(name)
             for name, _, _ in _ARGUMENTS}
    log_level = value['log_level']
    if log_level.lower() not in _LOG_LEVELS:
        raise RuntimeError(f'log_level:={log_level} is not one of {", ".join(_LOG_LEVELS)}')
    respawn_delay = value['respawn_delay']
    try:
        delay_s = float(respawn_delay)
    except ValueError:
        delay_s = -1.0
    if not delay_s >= 0.0:
        raise RuntimeError(f'respawn_delay:={respawn_delay} must be a number of seconds >= 0')
    rviz = _bool_argument('rviz', value['rviz'])
    if rviz:
        _require_rviz2()
    overrides = {
        'use_sim_time': _bool_argument('use_sim_time', value['use_sim_time']),
        'node.autostart': _bool_argument('autostart', value['autostart']),
    }
    for arg, param in _OVERRIDES.items():
        if value[arg]:
            overrides[param] = value[arg]
    for arg, param in _BOOL_OVERRIDES.items():
        if value[arg]:
            overrides[param] = _bool_argument(arg, value[arg])
    if value['image_topics']:
        overrides['camera.image_topics'] = _split_list(value['image_topics'])
    if value['camera_info_topics']:
        overrides['camera.camera_info_topics'] = _split_list(value['camera_info_topics'])
    params_file = value['params_file']
    if not os.path.isfile(params_file):
        raise RuntimeError(f'params_file:={params_file} is not a file; give a parameter YAML '
                           'such as config/perception.yaml')
    actions = [LifecycleNode(
        package='ros2_sab3r',
        executable='perception_node',
        name='perception_node',
        namespace=value['namespace'],
        output='screen',
        emulate_tty=True,
        respawn=_bool_argument('respawn', value['respawn']),
        respawn_delay=delay_s,
        parameters=[params_file, overrides],
        arguments=['--ros-args', '--log-level', log_level.lower()],
    )]
    if rviz:
        actions.append(Node(
            package='rviz2', executable='rviz2', name='rviz2', output='screen',
            arguments=['-d', rviz_config_for(value['namespace'])],
            parameters=[{'use_sim_time': overrides['use_sim_time']}]))
    return actions


def generate_launch_description():
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=_default(name), description=description)
          for name, _, description in _ARGUMENTS),
        OpaqueFunction(function=_node)])
