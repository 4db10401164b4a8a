"""ROS parameters declared from ros2_sab3r.config, the single source of truth.

Every field of :class:`~ros2_sab3r.config.PerceptionConfig` becomes one parameter named
``section.field`` with its description, unit and range; values are converted once into the
frozen config and validated there.

The contract of a parameter (``ParamSpec.read_only``): either it is applied live (validated,
then handed to the running node, pipeline and query engine), or it takes effect on configure:
settable while the node is unconfigured, refused while it is configured with that reason. No
parameter is read-only in the ROS sense, which would refuse it in every state.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ros2_sab3r.config import (
    ParamInfo,
    PerceptionConfig,
    config_from_flat,
    iter_params,
    param_infos,
)


def _parameter_type(default: Any) -> int:
    if isinstance(default, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(default, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(default, float):
        return ParameterType.PARAMETER_DOUBLE
    if isinstance(default, str):
        return ParameterType.PARAMETER_STRING
    if isinstance(default, tuple):
        return ParameterType.PARAMETER_STRING_ARRAY
    raise TypeError(f'no ROS parameter type for default {default!r}')


def descriptor_for(info: ParamInfo) -> ParameterDescriptor:
    spec = info.spec
    text = spec.description + (f' [{spec.unit}]' if spec.unit else '')
    d = ParameterDescriptor(
        name=info.name,
        type=_parameter_type(info.default),
        description=text,
        read_only=False,  # configure-time parameters are refused by the node while configured
        dynamic_typing=False,
    )
    constraints = ['takes effect on configure' if spec.read_only else 'applied live']
    if spec.choices:
        constraints.append('one of: ' + ', '.join(spec.choices))
    if spec.min is not None or spec.max is not None:
        lo = spec.min if spec.min is not None else float('-inf')
        hi = spec.max if spec.max is not None else float('inf')
        if d.type == ParameterType.PARAMETER_INTEGER:
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
        elif d.type == ParameterType.PARAMETER_DOUBLE:
            d.floating_point_range = [FloatingPointRange(from_value=float(lo),
                                                         to_value=float(hi), step=0.0)]
        constraints.append(f'range [{lo}, {hi}]')
    d.additional_constraints = '; '.join(constraints)
    return d


def declare_parameters(node: Node) -> dict[str, str]:
    """Declare every configuration parameter on the node (overrides come from --params-file).

    A value from the params file or the command line that breaks its declared type or range
    would make rclpy raise out of the constructor, killing the node with a traceback. Such a
    parameter is declared with its default instead and the problem returned, so the node stays
    up and refuses to configure with a message naming the parameter.
    """
    problems = {}
    for info in param_infos():
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        descriptor = descriptor_for(info)
        try:
            node.declare_parameter(info.name, default, descriptor)
        except (InvalidParameterTypeException, InvalidParameterValueException) as err:
            problems[info.name] = f'{info.name}: {err}'
            node.declare_parameter(info.name, default, descriptor, ignore_override=True)
    return problems


def read_config(node: Node, overrides: dict[str, Any] | None = None) -> PerceptionConfig:
    """The node's current parameters as a validated config (raises ValueError with the reason)."""
    values = {info.name: node.get_parameter(info.name).value for info in param_infos()}
    values.update(overrides or {})
    return config_from_flat(values)


CONFIGURE_TIME = frozenset(info.name for info in param_infos() if info.spec.read_only)
CONFIG_NAMES = frozenset(info.name for info in param_infos())


def check_parameter_update(node: Node, params: list[Parameter], configured: bool) -> str | None:
    """Why the update is refused (a configure-time parameter while configured, or a value that
    makes the configuration invalid), or None when it may be set."""
    ours = {p.name: p.value for p in params if p.name in CONFIG_NAMES}
    if configured:
        for name, value in ours.items():
            if name in CONFIGURE_TIME and value != _current(node, name):
                return (f'{name} takes effect on configure: deactivate and clean up the node, '
                        'set it, then configure and activate again')
    try:
        read_config(node, ours)
    except ValueError as err:
        return str(err)
    return None


def _current(node: Node, name: str) -> Any:
    value = node.get_parameter(name).value
    return list(value) if isinstance(value, (tuple, list)) else value


def live_changes(old: PerceptionConfig, new: PerceptionConfig) -> list[str]:
    """Names of the parameters whose values differ between two configurations (while the node
    is configured, only live ones can)."""
    before = {name: value for name, value, _ in iter_params(old)}
    return [name for name, value, _ in iter_params(new) if value != before[name]]
