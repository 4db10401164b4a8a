"""QoS profiles chosen by intent (see ARCHITECTURE.md)."""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)

_RELIABILITY = {
    'reliable': ReliabilityPolicy.RELIABLE,
    'best_effort': ReliabilityPolicy.BEST_EFFORT,
}


def camera_qos(reliability: str, depth: int) -> QoSProfile:
    """Cameras: keep last `depth`, volatile, with the configured reliability.

    camera.qos_reliability explains the tradeoff: best effort (the sensor-data profile) loses
    large frames sent between processes; reliable gets them all and may slow the publisher.
    """
    if reliability not in _RELIABILITY:
        raise ValueError(f'camera.qos_reliability={reliability!r} is not one of '
                         f'{", ".join(_RELIABILITY)}')
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=_RELIABILITY[reliability],
                      durability=DurabilityPolicy.VOLATILE)


# Map, markers, poses: reliable + transient-local depth 1, so RViz or a late subscriber gets the
# latest state at once without the node republishing large clouds.
LATCHED = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)

# Status: reliable, volatile, a short history for plotting tools.
STATUS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=5,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)

# /tf_static: like tf2's static listener, transient local so the whole tree arrives late-joining.
LATCHED_TF = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=100,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
