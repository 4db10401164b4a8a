"""Only ros2_sab3r/ros/ may import rclpy or ROS message packages; nothing imports ros/."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / 'ros2_sab3r'
ROS_MODULES = {
    'rclpy', 'rcl_interfaces', 'builtin_interfaces', 'std_msgs', 'std_srvs', 'sensor_msgs',
    'geometry_msgs', 'nav_msgs', 'visualization_msgs', 'lifecycle_msgs', 'tf2_msgs',
    'tf2_ros', 'launch', 'launch_ros', 'rosidl_runtime_py', 'ament_index_python',
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f'{node.module}.{alias.name}' for alias in node.names)
    return names


def _is_ros_import(name: str) -> bool:
    top = name.split('.')[0]
    return (top in ROS_MODULES or top.endswith('_msgs') or top.endswith('_srvs')
            or name.startswith(('ros2_sab3r.msg', 'ros2_sab3r.srv')))


def _library_files():
    return [p for p in PACKAGE.rglob('*.py') if 'ros' not in p.relative_to(PACKAGE).parts[:1]]


def test_library_modules_exist():
    assert len(_library_files()) >= 10, 'package layout lost its rooms'


def test_only_ros_package_imports_ros():
    offenders = {
        str(p.relative_to(PACKAGE.parent)): [n for n in _imports(p) if _is_ros_import(n)]
        for p in _library_files()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f'ROS imports outside ros2_sab3r/ros/: {offenders}'


def test_nothing_imports_the_ros_layer():
    offenders = [str(p) for p in _library_files()
                 if any(n.startswith('ros2_sab3r.ros') for n in _imports(p))]
    assert not offenders, f'modules outside ros/ import ros2_sab3r.ros: {offenders}'


def test_detector_catches_a_ros_import(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('from sensor_msgs.msg import Image\nimport rclpy.node\n')
    assert [n for n in _imports(bad) if _is_ros_import(n)]
