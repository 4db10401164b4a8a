"""Parameters with a true contract (issue 13, finding 3), through the real parameter services.

Live parameters are applied to the running node, pipeline and query engine; configure-time ones
are refused while configured, with the reason, and settable while unconfigured; a bad start-up
value fixed with a parameter set no longer fails configure.
"""

from __future__ import annotations

import time

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters

from ros2_sab3r.msg import PerceptionStatus
from ros2_sab3r.ros import qos
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.srv import Locate

from . import test_node_robustness as robust
from .rosgraph import NodeProcess, call, spin_until

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCENE = 'seed=0,frames=8,width=160,height=120'


def _value(v) -> ParameterValue:
    if isinstance(v, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=v)
    if isinstance(v, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=v)
    if isinstance(v, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=v)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=v)


def param_set(ros_node, node_proc, name: str, value):
    """What `ros2 param set NODE name value` does: (successful, reason)."""
    res = call(ros_node, SetParameters, f'{node_proc.name}/set_parameters',
               SetParameters.Request(parameters=[Parameter(name=name, value=_value(value))]))
    (result,) = res.results
    return result.successful, result.reason


def param_get(ros_node, node_proc, name: str):
    res = call(ros_node, GetParameters, f'{node_proc.name}/get_parameters',
               GetParameters.Request(names=[name]))
    v = res.values[0]
    return {ParameterType.PARAMETER_INTEGER: v.integer_value,
            ParameterType.PARAMETER_DOUBLE: v.double_value,
            ParameterType.PARAMETER_STRING: v.string_value}.get(v.type)


def transition(ros_node, node_proc, tid: int) -> bool:
    return call(ros_node, ChangeState, f'{node_proc.name}/change_state',
                ChangeState.Request(transition=Transition(id=tid))).success


def state_of(ros_node, node_proc) -> int:
    return call(ros_node, GetState, f'{node_proc.name}/get_state',
                GetState.Request()).current_state.id


def _status_count(ros_node, node_proc, seconds: float) -> int:
    got: list[PerceptionStatus] = []
    sub = ros_node.create_subscription(PerceptionStatus, f'{node_proc.name}/status', got.append,
                                       qos.STATUS)
    spin_until(ros_node, lambda: bool(got), timeout=10)
    got.clear()
    t0 = time.monotonic()
    spin_until(ros_node, lambda: time.monotonic() - t0 > seconds, timeout=seconds + 1)
    ros_node.destroy_subscription(sub)
    return len(got)


def test_live_and_configure_time_parameters(ros_node, tmp_path):
    overlay = robust._overlay(SCENE, queue_size=10).replace('status_rate_hz: 20.0',
                                                            'status_rate_hz: 1.0')
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        _, frames = SceneSpec.parse(SCENE).render()
        status, sub, (pub,) = robust._connect(ros_node, node_proc, ['cam0/image_raw'])
        robust._feed(ros_node, node_proc, pub, [robust._image(f) for f in frames[:4]], status)
        ros_node.destroy_subscription(sub)
        locate = f'{node_proc.name}/locate'
        two = Locate.Request(queries=['bed', 'chair'])
        assert call(ros_node, Locate, locate, two).success

        # live: the query engine takes the new limit at once
        assert param_set(ros_node, node_proc, 'query.max_queries', 1) == (True, '')
        refused = call(ros_node, Locate, locate, two)
        assert not refused.success and 'max_queries' in refused.message, refused.message
        assert param_set(ros_node, node_proc, 'query.max_queries', 64)[0]
        assert call(ros_node, Locate, locate, two).success
        # live: the status timer runs at the new rate
        assert _status_count(ros_node, node_proc, 2.0) <= 4
        assert param_set(ros_node, node_proc, 'publish.status_rate_hz', 20.0)[0]
        assert _status_count(ros_node, node_proc, 2.0) >= 10
        # an invalid live value is refused with the reason, the old one stays
        ok, reason = param_set(ros_node, node_proc, 'query.max_queries', 0)
        assert not ok and 'query.max_queries' in reason, reason
        assert param_get(ros_node, node_proc, 'query.max_queries') == 64

        # configure-time: refused while configured, with the reason and the remedy
        ok, reason = param_set(ros_node, node_proc, 'keyframes.window_size', 4)
        assert not ok and 'takes effect on configure' in reason, reason
        assert param_get(ros_node, node_proc, 'keyframes.window_size') == 8
        # ... and settable once unconfigured, then configure takes it
        for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP):
            assert transition(ros_node, node_proc, tid), node_proc.log()
        assert param_set(ros_node, node_proc, 'keyframes.window_size', 4) == (True, '')
        for tid in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert transition(ros_node, node_proc, tid), node_proc.log()
        assert state_of(ros_node, node_proc) == State.PRIMARY_STATE_ACTIVE
    finally:
        assert node_proc.stop() == 0, node_proc.log()
    log = node_proc.log()
    assert 'applied live: query.max_queries=1' in log, log
    assert 'Traceback' not in log, log


def test_a_bad_start_up_value_fixed_by_a_parameter_set_lets_configure_pass(ros_node, tmp_path):
    overlay = robust._overlay(SCENE) + '    query:\n      max_queries: 5000\n'
    node_proc = NodeProcess(tmp_path, overlay)
    try:
        assert spin_until(ros_node, lambda: 'invalid parameters' in node_proc.log(),
                          timeout=60), node_proc.log()
        assert state_of(ros_node, node_proc) == State.PRIMARY_STATE_UNCONFIGURED
        assert not param_set(ros_node, node_proc, 'query.max_queries', 5000)[0]
        assert param_set(ros_node, node_proc, 'query.max_queries', 32) == (True, '')
        # configure-time parameters are settable while unconfigured
        assert param_set(ros_node, node_proc, 'camera.queue_size', 3) == (True, '')
        assert transition(ros_node, node_proc, Transition.TRANSITION_CONFIGURE), node_proc.log()
        assert state_of(ros_node, node_proc) == State.PRIMARY_STATE_INACTIVE
    finally:
        assert node_proc.stop() == 0, node_proc.log()
