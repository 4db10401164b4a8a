"""Frame scheduling between camera callbacks and the one pipeline worker, without ROS.

The node is an adapter: it converts messages into :class:`CameraFrame` and hands them to a
:class:`FrameScheduler`; a :class:`FrameWorker` thread takes them in turn and runs the pipeline.
Everything about time lives here, per camera:

- Each camera has its own clock: its frames are compared with its own last accepted stamp,
  never with another camera's (two cameras on unsynchronised clocks are normal).
- A frame older than its camera's last accepted stamp is out of order: dropped and counted. One
  stray frame (stamp 0, or seconds late) therefore changes nothing.
- A camera has jumped back when ``confirm`` consecutive frames, in order among themselves, are
  more than ``jump_back_ns`` older than its last accepted stamp: a new timeline (a bag that loops,
  a simulator restarted). The map is reset only when every live camera has jumped back (a loop
  of the whole stream); until then the jumped cameras' frames are dropped and counted. A camera
  silent for ``stale_s`` is not waited for.
- Accounting: ``received == processed + dropped + queued`` whenever no frame is in the worker's
  hands, across drop-oldest, out-of-order frames, failed steps, loops and :meth:`clear`.
- Frames that never arrive (a best-effort subscription losing large images) show as a gap in a
  camera's stamps: more than ``gap_factor`` times its median step. They are estimated, counted
  as ``missing`` and reported, since the middleware drops them without telling the node.

Warnings go through ``notify(key, text)``; :class:`Throttle` limits each key to one line per
period, so a bad stream does not log at frame rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
import threading
import time

from ros2_sab3r.types import CameraFrame

Notify = Callable[[str, str], None]  # (key for throttling, text)


@dataclass(frozen=True)
class FrameCounts:
    """Frame accounting of a scheduler (the status message's counters)."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    queued: int = 0
    out_of_order: int = 0  # part of dropped
    dropped_by_reset: int = 0  # part of dropped: queued when a reset (clear or loop) emptied them
    loops: int = 0  # confirmed jumps back of the whole stream (map resets)
    missing: int = 0  # frames that never arrived, estimated from stamp gaps (not received)


@dataclass(frozen=True)
class ScheduledFrame:
    """A frame for the worker; `reset`: the stream looped, reset window and map before it."""

    frame: CameraFrame
    reset: bool


class Throttle:
    """At most one `allow(key)` per `period_s` for each key (a monotonic clock by default)."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 256) -> None:
        self.period_s = period_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.period_s:
                return False
            if len(self._last) >= self._max_keys:
                self._last.clear()
            self._last[key] = now
            return True


class _Camera:
    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.queue: deque[tuple[int, CameraFrame]] = deque()  # (epoch, frame)
        self.capacity = capacity
        self.last_ns: int | None = None  # last accepted stamp
        self.backward: list[int] = []  # consecutive stamps far behind last_ns, in order
        self.jumped = False  # confirmed a new timeline; waiting for the other cameras
        self.seen_at = -math.inf  # clock() when its last frame arrived
        self.periods: deque[int] = deque(maxlen=15)  # recent stamp steps (ns)


class FrameScheduler:
    """Per-camera drop-oldest queues served in turn, with per-camera clocks (module docstring).

    Thread-safe: cameras push from executor threads, one worker takes.
    """

    def __init__(self, cameras: Sequence[str], capacity: int, *,
                 jump_back_ns: int = 1_000_000_000, confirm: int = 2, stale_s: float = 5.0,
                 gap_factor: float = 2.5, notify: Notify | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not cameras:
            raise ValueError('FrameScheduler needs at least one camera; set camera.image_topics')
        if capacity < 1 or confirm < 1:
            raise ValueError(f'capacity ({capacity}) and confirm ({confirm}) must be >= 1')
        self._cameras = [_Camera(name, capacity) for name in cameras]
        self._jump_back_ns = jump_back_ns
        self._confirm = confirm
        self._stale_s = stale_s
        self._notify = notify or (lambda key, text: None)
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False
        self._next = 0
        self._epoch = 0  # +1 per loop of the whole stream
        self._taken_epoch = 0
        self._gap_factor = gap_factor
        self._received = self._processed = self._dropped = self._out_of_order = 0
        self._missing = self._dropped_by_reset = 0

    # ---- cameras ---------------------------------------------------------------------------
    def reject(self, camera: int, reason: str) -> None:
        """A message of `camera` that could not become a frame: received and dropped."""
        with self._cond:
            self._received += 1
            self._dropped += 1
        name = self._cameras[camera].name
        self._notify(f'reject:{name}:{reason}', f'frame on {name} dropped: {reason}')

    def push(self, camera: int, frame: CameraFrame) -> bool:
        """Queue `frame` of camera index `camera`; False when it was dropped (time rules)."""
        notes: list[tuple[str, str]] = []
        with self._cond:
            self._received += 1
            cam = self._cameras[camera]
            cam.seen_at = self._clock()
            accepted = self._admit(cam, frame.stamp_ns, notes)
            if accepted:
                if len(cam.queue) >= cam.capacity:
                    cam.queue.popleft()  # drop-oldest: a robot wants the newest image
                    self._dropped += 1
                cam.queue.append((self._epoch, frame))
                self._cond.notify()
            else:
                self._dropped += 1
        for key, text in notes:
            self._notify(key, text)
        return accepted

    def _admit(self, cam: _Camera, t: int, notes: list) -> bool:
        """The time rules for one frame (lock held); True: accept it."""
        if cam.jumped:
            if t >= cam.backward[-1]:
                cam.backward.append(t)
                if self._loop_if_every_camera_jumped(notes):
                    return True
                notes.append((f'wait:{cam.name}', f'{cam.name} jumped back in time; its frames '
                              'are dropped until every camera has (a loop of the whole stream)'))
            else:
                self._out_of_order += 1
            return False
        if cam.last_ns is None or t >= cam.last_ns:
            if cam.last_ns is not None:
                self._note_gap(cam, t - cam.last_ns, notes)
            cam.last_ns, cam.backward = t, []
            return True
        behind = cam.last_ns - t
        if behind > self._jump_back_ns:
            cam.backward = [*cam.backward, t] if cam.backward and t >= cam.backward[-1] else [t]
            if len(cam.backward) >= self._confirm:
                cam.jumped = True
                notes.append((f'jump:{cam.name}', f'{cam.name} jumped back by '
                              f'{behind / 1e9:.2f} s ({len(cam.backward)} frames in a row)'))
                return self._loop_if_every_camera_jumped(notes)
        else:
            cam.backward = []
        self._out_of_order += 1
        notes.append((f'late:{cam.name}', f'frame on {cam.name} {behind / 1e9:.3f} s older than '
                      'the last one dropped (out of order)'))
        return False

    def _note_gap(self, cam: _Camera, step: int, notes: list) -> None:
        """Estimate frames lost before this one from the camera's usual stamp step."""
        if len(cam.periods) >= 5:
            period = sorted(cam.periods)[len(cam.periods) // 2]
            if period > 0 and step > self._gap_factor * period:
                lost = round(step / period) - 1
                self._missing += lost
                notes.append((f'gap:{cam.name}', f'{cam.name}: about {lost} frame(s) never '
                              f'arrived ({step / 1e9:.3f} s gap, usual {period / 1e9:.3f} s); '
                              'if large frames get lost between processes, set '
                              'camera.qos_reliability: reliable'))
                return  # a gap is not a period
        if step > 0:
            cam.periods.append(step)

    def _loop_if_every_camera_jumped(self, notes: list) -> bool:
        now = self._clock()
        live = [c for c in self._cameras if now - c.seen_at <= self._stale_s]
        if not all(c.jumped for c in live):
            return False
        self._epoch += 1
        for c in self._cameras:
            self._dropped += len(c.queue)  # frames of the old timeline
            self._dropped_by_reset += len(c.queue)
            c.queue.clear()
            if c.jumped:
                c.last_ns, c.jumped = c.backward[-1], False
            else:  # silent camera: its next frame starts its clock anew
                c.last_ns = None
            c.backward = []
        notes.append(('loop', 'every camera jumped back in time (a looping bag?): keyframe window '
                      'and map reset'))
        return True

    # ---- worker ----------------------------------------------------------------------------
    def take(self, timeout: float = 0.2) -> ScheduledFrame | None:
        """The oldest frame of the next camera in turn; None after `timeout` s or close()."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while True:
                n = len(self._cameras)
                for k in range(n):
                    cam = self._cameras[(self._next + k) % n]
                    if cam.queue:
                        self._next = (self._next + k + 1) % n
                        epoch, frame = cam.queue.popleft()
                        reset = epoch != self._taken_epoch
                        self._taken_epoch = epoch
                        return ScheduledFrame(frame, reset)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)

    def done(self, processed: bool) -> None:
        """The worker finished a taken frame: processed, or dropped (the step failed)."""
        with self._cond:
            if processed:
                self._processed += 1
            else:
                self._dropped += 1

    def clear(self, reset: bool) -> int:
        """Drop every queued frame (counted); returns how many. Clocks are kept. `reset`: a map
        reset asked for it (counted in dropped_by_reset too), not a deactivation."""
        with self._cond:
            n = sum(len(c.queue) for c in self._cameras)
            for c in self._cameras:
                c.queue.clear()
            self._dropped += n
            if reset:
                self._dropped_by_reset += n
            return n

    def close(self) -> None:
        """Wake a waiting take() so the worker can exit; queued frames stay counted."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    def counts(self) -> FrameCounts:
        with self._cond:
            return FrameCounts(received=self._received, processed=self._processed,
                               dropped=self._dropped,
                               queued=sum(len(c.queue) for c in self._cameras),
                               out_of_order=self._out_of_order,
                               dropped_by_reset=self._dropped_by_reset, loops=self._epoch,
                               missing=self._missing)


class FrameWorker:
    """The one thread that takes frames from a scheduler and runs `step` on each.

    `step(frame)` returns True when the frame was processed (False: dropped, e.g. skipped by a
    failing stage). `reset()` runs before the first frame after a loop. An exception from either
    is reported to `on_error(where, err)` and counted as a dropped frame: the worker never dies.
    """

    def __init__(self, scheduler: FrameScheduler, step: Callable[[CameraFrame], bool],
                 reset: Callable[[], None], on_error: Callable[[str, Exception], None],
                 name: str = 'sab3r-pipeline') -> None:
        self._scheduler = scheduler
        self._step = step
        self._reset = reset
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._scheduler.reopen()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the thread to finish its frame and exit; False if it is still running."""
        self._stop.set()
        self._scheduler.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._scheduler.take()
            if item is None:
                continue
            processed = False
            try:
                if item.reset:
                    self._reset()
                processed = bool(self._step(item.frame))
            except Exception as err:  # noqa: BLE001  a bad frame must not stop the worker
                self._on_error('the pipeline worker', err)
            self._scheduler.done(processed)
