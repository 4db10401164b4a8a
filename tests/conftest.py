"""Shared pytest set-up: every test runs without network and with an isolated ROS graph."""

import os
import tempfile

# Hubs must never be contacted from tests (model downloads are tested offline).
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

# An isolated ROS graph per test session: a unique domain, localhost discovery only, logs in tmp.
os.environ['ROS_DOMAIN_ID'] = str(10 + os.getpid() % 90)
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
_ros_home = tempfile.mkdtemp(prefix='sab3r-ros-home-')
os.environ['ROS_HOME'] = _ros_home
os.environ['ROS_LOG_DIR'] = os.path.join(_ros_home, 'log')
