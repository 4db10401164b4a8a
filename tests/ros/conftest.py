"""A client node shared by the ROS graph tests of one module."""

import uuid

import pytest


@pytest.fixture(scope='module')
def ros_node():
    rclpy = pytest.importorskip('rclpy', reason='installed by scripts/bootstrap.sh')
    rclpy.init()
    node = rclpy.create_node(f'test_client_{uuid.uuid4().hex[:6]}')
    yield node
    node.destroy_node()
    rclpy.shutdown()
