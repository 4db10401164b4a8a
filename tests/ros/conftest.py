"""A client node shared by the ROS graph tests of one module."""

import uuid

import pytest
import rclpy


@pytest.fixture(scope='module')
def ros_node():
    rclpy.init()
    node = rclpy.create_node(f'test_client_{uuid.uuid4().hex[:6]}')
    yield node
    node.destroy_node()
    rclpy.shutdown()
