"""Drop-oldest frame buffer between camera callbacks and the pipeline worker."""

from __future__ import annotations

from collections import deque
import threading

from ros2_sab3r.types import CameraFrame


class FrameBuffer:
    """A bounded, thread-safe queue that drops the oldest frame when full.

    Camera callbacks must never block on a slow pipeline: a robot wants the newest image processed,
    not a backlog, so `push` always succeeds and counts what it dropped.
    """

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError(f'FrameBuffer capacity must be >= 1, got {capacity}')
        self._frames: deque[CameraFrame] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.pushed = 0

    def push(self, frame: CameraFrame) -> None:
        with self._cond:
            if len(self._frames) >= self._capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.pushed += 1
            self._cond.notify()

    def pop(self, timeout: float | None = None) -> CameraFrame | None:
        """Oldest waiting frame, waiting up to `timeout` s; None on timeout or after close()."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._frames or self._closed, timeout):
                return None
            return self._frames.popleft() if self._frames else None

    def close(self) -> None:
        """Wake every waiting pop() so that a worker thread can exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)
