"""Frame scheduling, per-camera clocks and the worker loop, without rclpy (frames/scheduler.py).

Each test feeds stamps the way a robot or a bag does and checks what the worker would get and
what is counted; the clock that decides whether a camera is silent is a fake one.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ros2_sab3r.frames.scheduler import FrameScheduler, FrameWorker, Throttle
from ros2_sab3r.types import CameraFrame

pytestmark = pytest.mark.unit

S = 1_000_000_000
IMG = np.zeros((2, 2, 3), np.uint8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _frame(t_s: float, camera: str = 'a') -> CameraFrame:
    return CameraFrame(stamp_ns=int(t_s * S), frame_id=camera, image=IMG, camera=camera)


def _drain(sched: FrameScheduler) -> list[tuple[str, float, bool]]:
    out = []
    while (item := sched.take(timeout=0.0)) is not None:
        out.append((item.frame.camera, item.frame.stamp_ns / S, item.reset))
        sched.done(True)
    return out


def _balanced(sched: FrameScheduler) -> bool:
    c = sched.counts()
    return c.received == c.processed + c.dropped + c.queued


def _scheduler(cameras=('a',), capacity=10, **kw) -> tuple[FrameScheduler, list[str]]:
    notes: list[str] = []
    clock = kw.pop('clock', FakeClock())
    sched = FrameScheduler(list(cameras), capacity, notify=lambda key, text: notes.append(text),
                           clock=clock, **kw)
    return sched, notes


@pytest.mark.parametrize('stray', [0.0, 6.0])  # stamp 0, and a frame 4 s late
def test_one_stray_old_frame_is_dropped_and_resets_nothing(stray):
    sched, notes = _scheduler()
    for t in (10.0, 10.1, stray, 10.2, 10.3):
        sched.push(0, _frame(t))
    assert _drain(sched) == [('a', 10.0, False), ('a', 10.1, False), ('a', 10.2, False),
                             ('a', 10.3, False)]
    c = sched.counts()
    assert (c.received, c.processed, c.dropped, c.out_of_order, c.loops) == (5, 4, 1, 1, 0)
    assert any('out of order' in n for n in notes), notes


def test_a_slightly_late_frame_is_out_of_order():
    sched, _ = _scheduler()
    for t in (10.0, 10.5, 10.2):
        sched.push(0, _frame(t))
    assert [t for _, t, _ in _drain(sched)] == [10.0, 10.5]
    assert sched.counts().out_of_order == 1 and _balanced(sched)


def test_a_bag_that_loops_resets_once_confirmed():
    sched, notes = _scheduler()
    for t in (10.0, 10.5, 12.0):
        sched.push(0, _frame(t))
    assert len(_drain(sched)) == 3
    assert not sched.push(0, _frame(10.0))  # could be a stray frame: dropped
    assert sched.push(0, _frame(10.1))  # the second in order: a new timeline
    sched.push(0, _frame(10.2))
    assert _drain(sched) == [('a', 10.1, True), ('a', 10.2, False)]
    c = sched.counts()
    assert c.loops == 1 and _balanced(sched)
    assert any('keyframe window and map reset' in n for n in notes)


def test_cameras_on_different_clocks_never_reset():
    """Camera b's clock is 1000 s behind camera a's: each is compared with itself."""
    sched, _ = _scheduler(('a', 'b'), capacity=20)
    for k in range(20):
        sched.push(0, _frame(1000.0 + 0.1 * k, 'a'))
        sched.push(1, _frame(0.1 * k, 'b'))
    got = _drain(sched)
    assert len(got) == 40 and not any(reset for _, _, reset in got)
    assert sched.counts().loops == 0 and sched.counts().dropped == 0


def test_the_map_resets_only_when_every_camera_jumped_back():
    clock = FakeClock()
    sched, _ = _scheduler(('a', 'b'), clock=clock)
    for k in range(5):
        sched.push(0, _frame(50.0 + k, 'a'))
        sched.push(1, _frame(80.0 + k, 'b'))
    _drain(sched)
    # camera a loops; b goes on: a's frames wait (dropped), nothing resets
    for k in range(4):
        sched.push(0, _frame(50.0 + 0.1 * k, 'a'))
        sched.push(1, _frame(85.0 + k, 'b'))
    got = _drain(sched)
    assert [c for c, _, _ in got] == ['b'] * 4 and not any(r for *_, r in got)
    assert sched.counts().loops == 0
    # b loops too: one reset, then both timelines go on
    sched.push(1, _frame(80.0, 'b'))
    sched.push(1, _frame(80.1, 'b'))
    sched.push(0, _frame(50.5, 'a'))
    got = _drain(sched)
    assert got[0][2] is True and sum(r for *_, r in got) == 1, got
    assert {c for c, _, _ in got} == {'a', 'b'}
    assert sched.counts().loops == 1 and _balanced(sched)


def test_a_silent_camera_is_not_waited_for():
    clock = FakeClock()
    sched, _ = _scheduler(('a', 'b'), clock=clock, stale_s=5.0)
    sched.push(0, _frame(50.0, 'a'))
    sched.push(1, _frame(80.0, 'b'))
    clock.now += 10.0  # b has gone quiet
    sched.push(0, _frame(51.0, 'a'))
    sched.push(0, _frame(10.0, 'a'))
    assert sched.push(0, _frame(10.1, 'a'))  # a alone loops
    assert sched.counts().loops == 1
    assert sched.push(1, _frame(3.0, 'b'))  # b's clock starts anew when it returns


def test_drop_oldest_clear_and_accounting_across_resets():
    sched, _ = _scheduler(('a', 'b'), capacity=2)
    for k in range(5):
        sched.push(0, _frame(k, 'a'))
    sched.reject(1, 'unsupported encoding')
    c = sched.counts()
    assert (c.received, c.dropped, c.queued) == (6, 4, 2)
    assert sched.clear(reset=True) == 2
    c = sched.counts()
    assert (c.received, c.processed, c.dropped, c.queued) == (6, 0, 6, 0)
    assert c.dropped_by_reset == 2
    sched.push(0, _frame(9, 'a'))
    item = sched.take(timeout=0.0)
    sched.done(False)  # the step failed: dropped
    assert item.frame.stamp_ns == 9 * S and _balanced(sched)


def test_frames_dropped_by_a_reset_are_counted_apart():
    """dropped_by_reset: frames a reset (the Reset service, a loop of the stream) emptied from
    the queues; a deactivation's clear and out-of-order frames are dropped, not by a reset."""
    sched, _ = _scheduler(('a',), capacity=5)
    for t in (10.0, 10.5, 11.0):
        sched.push(0, _frame(t))
    assert sched.clear(reset=False) == 3
    assert sched.counts().dropped_by_reset == 0
    for t in (12.0, 12.5, 13.0):
        sched.push(0, _frame(t))
    sched.push(0, _frame(12.9))  # out of order
    assert sched.clear(reset=True) == 3
    c = sched.counts()
    assert (c.dropped, c.out_of_order, c.dropped_by_reset) == (7, 1, 3), c
    # a loop of the whole stream drops what was queued of the old timeline
    for t in (14.0, 14.5):
        sched.push(0, _frame(t))
    sched.push(0, _frame(1.0))
    sched.push(0, _frame(1.1))  # confirms the loop: 14.0 and 14.5 go
    c = sched.counts()
    assert c.loops == 1 and c.dropped_by_reset == 5 and _balanced(sched), c


def test_cameras_are_served_in_turn():
    sched, _ = _scheduler(('a', 'b', 'c'))
    for k in range(3):
        for i, cam in enumerate('abc'):
            sched.push(i, _frame(k, cam))
    assert [c for c, _, _ in _drain(sched)] == list('abc' * 3)


def test_throttle_allows_one_line_per_key_and_period():
    clock = FakeClock()
    th = Throttle(5.0, clock)
    assert th.allow('x') and not th.allow('x') and th.allow('y')
    clock.now += 5.0
    assert th.allow('x')


def test_worker_runs_steps_resets_before_a_loop_and_survives_errors():
    sched, _ = _scheduler()
    seen: list = []
    errors: list = []
    progress = threading.Semaphore(0)

    def step(frame):
        seen.append(frame.stamp_ns // S)
        progress.release()
        if frame.stamp_ns // S == 11:
            raise RuntimeError('a stage failed')
        return True

    worker = FrameWorker(sched, step, reset=lambda: seen.append('reset'),
                         on_error=lambda where, err: errors.append(str(err)))
    worker.start()
    for t in (10, 11, 12, 1, 2):
        sched.push(0, _frame(t))
        if t != 1:  # 1 is dropped (it could be a stray frame); 2 confirms the loop
            assert progress.acquire(timeout=5.0)
    assert worker.stop(5.0)
    assert seen == [10, 11, 12, 'reset', 2], seen
    assert errors == ['a stage failed']
    c = sched.counts()
    assert (c.received, c.processed, c.dropped, c.queued) == (5, 3, 2, 0), c


def test_frames_that_never_arrived_are_estimated_and_reported():
    sched, notes = _scheduler(capacity=50)
    stamps = [10.0 + 0.1 * k for k in range(10)] + [11.4, 11.5, 11.6]  # 0.5 s: 4 frames lost
    for t in stamps:
        sched.push(0, _frame(t))
    c = sched.counts()
    assert c.missing == 4 and c.received == len(stamps) and c.dropped == 0, c
    assert any('about 4 frame(s) never arrived' in n and 'qos_reliability' in n
               for n in notes), notes
    # an even stream reports nothing
    sched, notes = _scheduler(capacity=50)
    for k in range(30):
        sched.push(0, _frame(10.0 + 0.1 * k))
    assert sched.counts().missing == 0 and not notes
