"""Lifecycle honesty, map paths and logging of the node in its own process (issue 13, 7-9).

Shutdown ends the process; a configure that fails says why; a node without weights refuses to
configure unless told to run without a network (model.backend 'none'), and weights that are
missing fail activation with the path; SaveMap/LoadMap resolve relative
paths against node.map_directory, not the directory launch was started from; the library's
Python log lines (pipeline, mapping) reach /rosout.
"""

from __future__ import annotations

import os
from pathlib import Path

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import pytest
from rcl_interfaces.msg import Log
from rclpy.qos import QoSProfile, ReliabilityPolicy

from ros2_sab3r.config import ModelConfig, PerceptionConfig
from ros2_sab3r.ros.perception_node import model_refusal
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import LoadMap, Locate, SaveMap

from . import test_node_robustness as robust
from .rosgraph import NodeProcess, call, spin_until
from .test_node_parameters import param_set, state_of, transition

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# PYTHONPATH entry whose sitecustomize.py sends the node's process SIGINT mid-start-up.
SIGNAL_FAULT_HOOK = Path(__file__).parent / 'signal_fault'

SCENE = 'seed=0,frames=6,width=160,height=120'


def test_shutdown_ends_the_process(ros_node, tmp_path):
    overlay = robust._overlay(SCENE) + '    node:\n      autostart: false\n'
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        answer = call(ros_node, ChangeState, f'{node_proc.name}/change_state', ChangeState.Request(
            transition=Transition(id=Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)))
        assert answer.success, node_proc.log()
        assert spin_until(ros_node, lambda: node_proc.proc.poll() is not None, timeout=20), (
            'the node process outlived its shutdown transition:\n' + node_proc.log())
        assert node_proc.proc.returncode == 0, node_proc.log()
    finally:
        node_proc.stop()
    assert 'the process ends' in node_proc.log()


@pytest.mark.parametrize('at', ['import', 'node', 'activate'])
def test_sigint_during_start_up_ends_the_process_cleanly(tmp_path, at):
    """rclpy's signal handler shuts the context down from another thread: a SIGINT while the
    node is built or activated made the next rclpy call fail (exit 1 with an RCLError
    traceback while building; 'activate failed' with a traceback while activating); during the
    imports Python's KeyboardInterrupt could be lost (the node then ran for ever). The hook
    in tests/ros/signal_fault/ sends the signal at that point every time (test double)."""
    env = {'SAB3R_TEST_SIGINT_AT': at,
           'PYTHONPATH': os.pathsep.join(filter(None, [str(SIGNAL_FAULT_HOOK),
                                                       os.environ.get('PYTHONPATH')]))}
    node_proc = NodeProcess(tmp_path, robust._overlay(SCENE), env=env)
    try:
        node_proc.proc.wait(60)  # it ends by itself
    finally:
        rc = node_proc.stop()
    log = node_proc.log()
    assert rc == 0 and 'Traceback' not in log and 'failed' not in log, log
    assert ('interrupted while starting' in log if at in ('import', 'node')
            else 'activate interrupted: the process is shutting down' in log), log


def test_an_empty_camera_list_fails_configure_with_the_reason(ros_node, tmp_path):
    overlay = robust._overlay(SCENE).replace("image_topics: ['NS/cam0/image_raw']",
                                             "image_topics: ['']")
    assert "image_topics: ['']" in overlay
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        assert spin_until(ros_node, lambda: 'configure failed' in node_proc.log(), timeout=60), (
            node_proc.log())
        state = call(ros_node, GetState, f'{node_proc.name}/get_state', GetState.Request())
        assert state.current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        assert node_proc.proc.poll() is None
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'image_topics' in log and 'the node is unconfigured' in log, log


@pytest.mark.parametrize(('backend', 'checkpoint', 'refused'), [
    ('torch', '', True), ('onnxruntime', ' ', True), ('tensorrt', '', True),
    ('torch', 'uva-cv-lab/SAB3R/demo_ckpt/base/base.pt', False),
    ('none', '', False), ('ros2_sab3r.sim.standin:SyntheticSceneBackend', '', False)])
def test_model_refusal(backend, checkpoint, refused):
    cfg = PerceptionConfig(model=ModelConfig(backend=backend, checkpoint=checkpoint))
    reason = model_refusal(cfg)
    assert (reason is not None) == refused, reason
    if refused:
        assert 'model.checkpoint is empty' in reason and "model.backend: 'none'" in reason


def test_model_refusal_of_special_files(tmp_path):
    """A FIFO as checkpoint would block the loader, and activation, for ever."""
    fifo = tmp_path / 'model.pt'
    os.mkfifo(fifo)
    reason = model_refusal(PerceptionConfig(model=ModelConfig(checkpoint=str(fifo))))
    assert reason is not None and 'not a regular file or directory' in reason, reason
    for ok in (tmp_path, tmp_path / 'missing.pt'):  # a directory; missing: the loader says so
        assert model_refusal(PerceptionConfig(model=ModelConfig(checkpoint=str(ok)))) is None


def test_no_weights_refuse_to_configure_unless_backend_none(ros_node, tmp_path):
    """The default (torch, no checkpoint) used to activate and build nothing; now configure
    fails saying what to set, and 'none' is the explicit choice of a node without a network."""
    overlay = robust._overlay(SCENE).replace(
        "backend: 'ros2_sab3r.sim.standin:SyntheticSceneBackend'", "backend: 'torch'")
    assert "backend: 'torch'" in overlay
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        assert spin_until(ros_node, lambda: 'autostart: configure failed' in node_proc.log(),
                          timeout=60), node_proc.log()
        assert state_of(ros_node, node_proc) == State.PRIMARY_STATE_UNCONFIGURED
        assert param_set(ros_node, node_proc, 'model.backend', 'none') == (True, '')
        assert transition(ros_node, node_proc, Transition.TRANSITION_CONFIGURE), node_proc.log()
        assert transition(ros_node, node_proc, Transition.TRANSITION_ACTIVATE), node_proc.log()
        answer = call(ros_node, Locate, f'{node_proc.name}/locate',
                      Locate.Request(queries=['bed']))
        assert not answer.success and "model.backend is 'none'" in answer.message, answer
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert "model.checkpoint is empty, so model.backend='torch' has no weights" in log, log
    assert 'no map is built' in log, log


@pytest.mark.parametrize(('backend', 'what'), [('onnxruntime', 'export'), ('torch', 'model.pt')])
def test_missing_weights_fail_activation_with_the_path(ros_node, tmp_path, backend, what):
    missing = tmp_path / 'not_there' / what
    overlay = robust._overlay(SCENE).replace(
        "backend: 'ros2_sab3r.sim.standin:SyntheticSceneBackend'",
        f"backend: '{backend}'\n      checkpoint: '{missing}'")
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        assert spin_until(ros_node, lambda: 'autostart: activate failed' in node_proc.log(),
                          timeout=60), node_proc.log()
        assert state_of(ros_node, node_proc) == State.PRIMARY_STATE_UNCONFIGURED
        assert node_proc.proc.poll() is None
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'the model cannot be loaded' in log and str(missing) in log, log
    assert 'listening on' not in log, log  # never active


def test_map_paths_resolve_against_map_directory_and_library_logs_reach_rosout(ros_node,
                                                                               tmp_path):
    maps = tmp_path / 'maps'
    maps.mkdir()
    overlay = robust._overlay(SCENE, queue_size=10) + f"    node:\n      map_directory: '{maps}'\n"
    rosout: list[Log] = []
    log_sub = ros_node.create_subscription(
        Log, '/rosout', rosout.append,
        QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])
        robust._feed(ros_node, node_proc, pub, [robust._image(f) for f in frames], status)
        assert spin_until(ros_node, lambda: status[-1].map_ready, timeout=30)
        saved = call(ros_node, SaveMap, f'{node_proc.name}/save_map',
                     SaveMap.Request(path='run1/map.npz'))
        assert not saved.success and str(maps / 'run1') in saved.message  # no such directory
        saved = call(ros_node, SaveMap, f'{node_proc.name}/save_map',
                     SaveMap.Request(path='map.npz'))
        assert saved.success and str(maps / 'map.npz') in saved.message, saved.message
        assert (maps / 'map.npz').is_file() and not (robust.Path.cwd() / 'map.npz').exists()
        assert saved.bytes == os.path.getsize(maps / 'map.npz')
        loaded = call(ros_node, LoadMap, f'{node_proc.name}/load_map',
                      LoadMap.Request(path='map.npz'))
        assert loaded.success, loaded.message
        # the pipeline's own (Python logging) line about the loaded map, on /rosout
        assert spin_until(ros_node, lambda: any(
            'ros2_sab3r.pipeline' in m.msg and 'loaded map' in m.msg for m in rosout),
            timeout=10), [m.msg for m in rosout]
        ros_node.destroy_subscription(sub)
    finally:
        ros_node.destroy_subscription(log_sub)
        assert node_proc.stop() == 0, node_proc.log()
