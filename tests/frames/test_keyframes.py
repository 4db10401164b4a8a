"""The keyframe window."""

from __future__ import annotations

import pytest

from ros2_sab3r.frames.keyframes import KeyframeWindow, WindowKeyframe

pytestmark = pytest.mark.unit


def test_keyframe_window_evicts_oldest():
    w = KeyframeWindow(2)
    evicted = [w.insert(WindowKeyframe(keyframe=i, tokens=None)) for i in range(4)]
    assert [e.keyframe if e else None for e in evicted] == [None, None, 0, 1]
    assert [k.keyframe for k in w.recent(5)] == [3, 2] and w.total == 4
