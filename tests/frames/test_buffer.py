"""The drop-oldest frame buffer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ros2_sab3r.frames.buffer import FrameBuffer
from ros2_sab3r.types import CameraFrame

pytestmark = pytest.mark.unit


def test_frame_buffer_drops_oldest():
    buf = FrameBuffer(2)
    img = np.zeros((4, 4, 3), np.uint8)
    for i in range(5):
        buf.push(CameraFrame(stamp_ns=i, frame_id='c', image=img))
    assert buf.dropped == 3 and len(buf) == 2
    assert buf.pop(0).stamp_ns == 3 and buf.pop(0).stamp_ns == 4
    assert buf.pop(0.01) is None
    t = threading.Thread(target=lambda: buf.close())
    t.start()
    assert buf.pop(1.0) is None
    t.join()
