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

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from launch import LaunchDescription

_OVERRIDES = {
    # launch argument -> node parameter (applied only when the argument is not empty)
    'backend': 'model.backend',
    'checkpoint': 'model.checkpoint',
    'device': 'model.device',
    'map_frame': 'frames.map_frame',
}


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(',') if item.strip()]


def _true(text: str) -> bool:
    return text.lower() in ('true', '1', 'yes')


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


def _node(context):
    value = {name: LaunchConfiguration(name).perform(context) for name in (
        'params_file', 'namespace', 'image_topics', 'camera_info_topics', 'use_sim_time',
        'log_level', 'autostart', 'rviz', *_OVERRIDES)}
    overrides = {
        'use_sim_time': _true(value['use_sim_time']),
        'node.autostart': _true(value['autostart']),
    }
    for arg, param in _OVERRIDES.items():
        if value[arg]:
            overrides[param] = value[arg]
    if value['image_topics']:
        overrides['camera.image_topics'] = _split_list(value['image_topics'])
    if value['camera_info_topics']:
        overrides['camera.camera_info_topics'] = _split_list(value['camera_info_topics'])
    actions = [LifecycleNode(
        package='ros2_sab3r',
        executable='perception_node',
        name='perception_node',
        namespace=value['namespace'],
        output='screen',
        emulate_tty=True,
        parameters=[value['params_file'], overrides],
        arguments=['--ros-args', '--log-level', value['log_level']],
    )]
    if _true(value['rviz']):
        actions.append(Node(
            package='rviz2', executable='rviz2', name='rviz2', output='screen',
            arguments=['-d', rviz_config_for(value['namespace'])],
            parameters=[{'use_sim_time': overrides['use_sim_time']}]))
    return actions


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory('ros2_sab3r'), 'config', 'perception.yaml')
    args = [
        DeclareLaunchArgument(
            'params_file', default_value=default_params,
            description='YAML with all node parameters (see config/perception.yaml)'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='namespace of the node, its topics and services'),
        DeclareLaunchArgument(
            'image_topics', default_value='',
            description='comma-separated sensor_msgs/Image topics, one per camera; empty: '
                        'camera.image_topics from params_file'),
        DeclareLaunchArgument(
            'camera_info_topics', default_value='',
            description='comma-separated CameraInfo topics in the order of image_topics; '
                        'empty: camera.camera_info_topics from params_file'),
        DeclareLaunchArgument(
            'backend', default_value='',
            description="inference backend: 'torch', 'onnxruntime' or 'tensorrt'; empty: "
                        'model.backend from params_file'),
        DeclareLaunchArgument(
            'checkpoint', default_value='',
            description='SAB3R checkpoint file, Hugging Face repo id, or ONNX/engine directory; '
                        'empty: model.checkpoint from params_file'),
        DeclareLaunchArgument(
            'device', default_value='', description="'cpu' or 'cuda'; empty: model.device"),
        DeclareLaunchArgument(
            'map_frame', default_value='', description='map frame; empty: frames.map_frame'),
        DeclareLaunchArgument(
            'use_sim_time', default_value='false',
            description='use /clock (true when replaying bags with --clock)'),
        DeclareLaunchArgument(
            'autostart', default_value='true',
            description='configure and activate the lifecycle node at once; false when a '
                        'lifecycle manager drives it'),
        DeclareLaunchArgument(
            'rviz', default_value='false',
            description='also start rviz2 with config/perception.rviz (map, located objects, '
                        'relevancy, keyframes, trajectory)'),
        DeclareLaunchArgument(
            'log_level', default_value='info',
            description='debug, info, warn, error or fatal'),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_node)])
