"""ROS message <-> numpy conversions at the node boundary.

The decoders work on raw message fields and live in :mod:`ros2_sab3r.frames.decode` (the rosbag
evaluation uses them without the ROS layer); they are re-exported here under their old names.
"""

from __future__ import annotations

from ros2_sab3r.frames.decode import (
    SUPPORTED_ENCODINGS,
    ConversionError,
    camera_info_to_K,
    image_to_rgb,
    rgb_to_image_fields,
)

__all__ = ['SUPPORTED_ENCODINGS', 'ConversionError', 'camera_info_to_K', 'image_to_rgb',
           'rgb_to_image_fields']
