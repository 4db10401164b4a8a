"""QoS profiles chosen by intent (see ARCHITECTURE.md)."""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)


def camera_qos(depth: int) -> QoSProfile:
    """Cameras: best effort, keep last `depth` (a late frame is worth less than a fresh one)."""
    qos = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in (
        'reliability', 'durability', 'history')}, depth=depth)
    return qos


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
