"""Replay a rosbag2 into the perception node on simulated time.

    ros2 launch ros2_sab3r replay.launch.py bag:=/data/scene0000_00 rviz:=true
    ros2 launch ros2_sab3r replay.launch.py bag:=/data/run.mcap rate:=0.5 backend:=onnxruntime \
        checkpoint:=/opt/sab3r/onnx image_topics:=/front/image_raw

Starts perception.launch.py with use_sim_time:=true and, after `start_delay` seconds (time to
load the model), `ros2 bag play BAG --clock`. Every argument of perception.launch.py (params_file,
log_level, backend, rviz, ...) is taken as given on the command line: launch configurations are
shared with the included file, so this file declares only its own arguments (re-declaring one
of perception's with another default would override that default). A bag that loops resets the
node's keyframe window and map once every camera has jumped back. For metrics on a bag
(Map-and-Locate, depth, pose, latency), use `sab3r-eval BAG` instead; this file is for watching
a replay in RViz.
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


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float('nan')  # fails every check below, which names the argument


def _checked_play(context):
    """The bag player, after checking the replay's own arguments (before the node starts)."""
    value = {name: LaunchConfiguration(name).perform(context)
             for name in ('bag', 'rate', 'loop', 'start_delay')}
    if not value['bag']:
        raise RuntimeError('replay.launch.py needs bag:=PATH (a rosbag2 folder or file)')
    if not os.path.exists(value['bag']):
        raise RuntimeError(f'bag:={value["bag"]} does not exist; give a rosbag2 folder or file')
    rate, delay = _number(value['rate']), _number(value['start_delay'])
    if not rate > 0:
        raise RuntimeError(f'rate:={value["rate"]} must be a positive number')
    if not delay >= 0:
        raise RuntimeError(f'start_delay:={value["start_delay"]} must be a number of seconds '
                           '>= 0')
    play = ['ros2', 'bag', 'play', value['bag'], '--clock', '--rate', str(rate)]
    if value['loop'].lower() in ('true', '1', 'yes'):
        play.append('--loop')
    return [TimerAction(period=delay, actions=[ExecuteProcess(cmd=play, output='screen')])]


def generate_launch_description():
    perception = os.path.join(get_package_share_directory('ros2_sab3r'), 'launch',
                              'perception.launch.py')
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
    ]
    # The check runs first: a missing bag stops the launch before the node starts.
    return LaunchDescription([
        *args,
        OpaqueFunction(function=_checked_play),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(perception),
                                 launch_arguments={'use_sim_time': 'true'}.items()),
    ])
