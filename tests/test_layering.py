"""The rooms' rules: only ros2_sab3r/ros/ imports ROS and nothing imports it; no import cycle;
stand-ins only in sim/; every dependency declared in setup.py is imported."""

import ast
from pathlib import Path
import re

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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        # `from a.b import c` names a.b and a.b.c: both count where they are modules
        graph[name] = {n for n in _imports(path) if n in modules and n != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path, or None (iterative DFS with colours)."""
    state: dict[str, int] = {}
    for root in graph:
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_package_import_graph_has_no_cycle():
    cycle = _cycle(_import_graph())
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_detector_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) is None


STAND_IN_WORDS = ('StandIn', 'Double', 'Fake', 'Dummy', 'Stub', 'Mock')


def test_stand_ins_live_in_sim_only():
    """Stand-ins are named as such and kept in ros2_sab3r/sim/ (tests keep their own doubles)."""
    offenders = []
    for path in PACKAGE.rglob('*.py'):
        if path.relative_to(PACKAGE).parts[0] == 'sim':
            continue
        tree = ast.parse(path.read_text(encoding='utf-8'))
        offenders += [f'{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}'
                      for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                      and any(w in node.name for w in STAND_IN_WORDS)]
    assert not offenders, f'stand-ins outside ros2_sab3r/sim/: {offenders}'


# Distribution name -> import name, where they differ.
IMPORT_NAMES = {'pillow': 'PIL', 'open_clip_torch': 'open_clip', 'pycuda': 'pycuda.driver',
                'pyyaml': 'yaml'}
# Imported only behind a clear 'install the extra' error (setup.py extras_require).
OPTIONAL_IMPORTS = {'tensorrt', 'pycuda'}


def _declared_dependencies() -> list[str]:
    setup = ast.parse((PACKAGE.parent / 'setup.py').read_text(encoding='utf-8'))
    for node in ast.walk(setup):
        if isinstance(node, ast.keyword) and node.arg == 'install_requires':
            return [re.split(r'[<>=!~\[; ]', ast.literal_eval(elt))[0].lower()
                    for elt in node.value.elts]
    raise AssertionError('setup.py has no install_requires')


def test_every_declared_dependency_is_imported():
    imported = {name.split('.')[0] for p in PACKAGE.rglob('*.py') for name in _imports(p)}
    declared = _declared_dependencies()
    assert 'numpy' in declared
    unused = [d for d in declared if IMPORT_NAMES.get(d, d).split('.')[0] not in imported]
    assert not unused, f'declared in setup.py but imported nowhere in ros2_sab3r/: {unused}'


def test_every_imported_dependency_is_declared():
    """A third-party import the package makes is in install_requires (or an extra): a fresh
    `pip install` must not fail on first use (PyYAML was imported and not declared)."""
    import sys

    declared = {IMPORT_NAMES.get(d, d).split('.')[0] for d in _declared_dependencies()}
    undeclared = sorted({
        name.split('.')[0] for p in PACKAGE.rglob('*.py') for name in _imports(p)
        if not _is_ros_import(name)} - declared - OPTIONAL_IMPORTS - {'ros2_sab3r'}
        - set(sys.stdlib_module_names))
    assert not undeclared, f'imported in ros2_sab3r/ but not in setup.py: {undeclared}'
