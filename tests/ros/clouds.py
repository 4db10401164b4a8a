"""Unpacking of the node's PointCloud2 messages, for the tests (the node only packs them)."""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ros2_sab3r.ros.messages.pack_rgb`: (N,) float32 -> (N, 3) uint8."""
    v = np.ascontiguousarray(rgb, np.float32).view(np.uint32)
    return np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=1).astype(np.uint8)


def cloud_to_arrays(msg: PointCloud2) -> dict[str, np.ndarray]:
    """Unpack the float32 fields of a PointCloud2 into {name: (N,) array} ('rgb' -> (N, 3))."""
    n = msg.width * msg.height
    fields = [f for f in msg.fields if f.datatype == PointField.FLOAT32 and f.count == 1]
    dtype = np.dtype({'names': [f.name for f in fields], 'formats': [np.float32] * len(fields),
                      'offsets': [f.offset for f in fields], 'itemsize': msg.point_step})
    data = np.frombuffer(bytes(msg.data), dtype, count=n)
    out = {name: np.array(data[name]) for name in data.dtype.names}
    if 'rgb' in out:
        out['rgb'] = unpack_rgb(out['rgb'])
    return out
