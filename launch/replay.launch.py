"""Replay a rosbag2 into the perception node on simulated time.

    ros2 launch ros2_sab3r replay.launch.py bag:=/data/scene0000_00 rviz:=true
    ros2 launch ros2_sab3r replay.launch.py bag:=/data/run.mcap rate:=0.5 backend:=onnxruntime \
        checkpoint:=/opt/sab3r/onnx image_topics:=/front/image_raw

Starts perception.launch.py with use_sim_time:=true and, after `start_delay` seconds (time to
load the model), `ros2 bag play BAG --clock`. A bag that loops resets the node's keyframe window
and map (the node sees time jump back). For metrics on a bag (Map-and-Locate, depth, pose,
latency), use `sab3r-eval BAG` instead; this file is for watching a replay in RViz.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    IncludeLaunchDescription,
    OpaqueFunction,
    TimerAction,
)
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription

# arguments handed to perception.launch.py unchanged (empty: its own default)
_FORWARDED = ('params_file', 'namespace', 'image_topics', 'camera_info_topics', 'backend',
              'checkpoint', 'device', 'map_frame', 'rviz', 'log_level')


def _actions(context):
    value = {name: LaunchConfiguration(name).perform(context)
             for name in ('bag', 'rate', 'loop', 'start_delay', *_FORWARDED)}
    if not value['bag']:
        raise RuntimeError('replay.launch.py needs bag:=PATH (a rosbag2 folder or file)')
    rate = float(value['rate'])
    if not rate > 0:
        raise RuntimeError(f'rate:={value["rate"]} must be a positive number')
    perception = os.path.join(get_package_share_directory('ros2_sab3r'), 'launch',
                              'perception.launch.py')
    forwarded = {name: value[name] for name in _FORWARDED if value[name]}
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(perception),
        launch_arguments={**forwarded, 'use_sim_time': 'true'}.items())
    play = ['ros2', 'bag', 'play', value['bag'], '--clock', '--rate', str(rate)]
    if value['loop'].lower() in ('true', '1', 'yes'):
        play.append('--loop')
    return [node, TimerAction(period=float(value['start_delay']),
                              actions=[ExecuteProcess(cmd=play, output='screen')])]


def generate_launch_description():
    args = [
        DeclareLaunchArgument('bag', default_value='',
                              description='rosbag2 to play (folder, .db3 or .mcap)'),
        DeclareLaunchArgument('rate', default_value='1.0',
                              description='playback rate (0.5: half speed for a slow backend)'),
        DeclareLaunchArgument('loop', default_value='false',
                              description='play the bag again and again'),
        DeclareLaunchArgument('start_delay', default_value='5.0',
                              description='seconds between starting the node and the bag, for '
                                          'the model to load'),
        DeclareLaunchArgument('params_file', default_value='',
                              description='node parameters; empty: config/perception.yaml'),
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('image_topics', default_value='',
                              description="comma-separated image topics of the bag's cameras"),
        DeclareLaunchArgument('camera_info_topics', default_value='',
                              description='comma-separated CameraInfo topics, same order'),
        DeclareLaunchArgument('backend', default_value='', description='inference backend'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='checkpoint or export directory'),
        DeclareLaunchArgument('device', default_value='', description="'cpu' or 'cuda'"),
        DeclareLaunchArgument('map_frame', default_value='', description='map frame'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='also open config/perception.rviz'),
        DeclareLaunchArgument('log_level', default_value='', description='node log level'),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_actions)])
