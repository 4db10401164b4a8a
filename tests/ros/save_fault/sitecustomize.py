"""Fault injection for the node under test, loaded through PYTHONPATH by its process only.

With ``SAB3R_TEST_SAVE_FAULT=<dir>`` set, and once ``<dir>/armed`` exists, ``numpy.savez`` (the
map writer's archive call) writes the first half of the archive, flushes it, creates
``<dir>/writing`` and waits until rclpy is shut down (the node got its signal) before raising
OSError: a save that a signal interrupts half-way, every time, whatever the machine's speed.
"""

import os

_CONTROL = os.environ.get('SAB3R_TEST_SAVE_FAULT')

if _CONTROL:
    import io
    from pathlib import Path
    import time

    import numpy

    _savez = numpy.savez

    def _interrupted_savez(file, *args, **kwargs):
        control = Path(_CONTROL)
        if not (control / 'armed').exists():
            return _savez(file, *args, **kwargs)
        buf = io.BytesIO()
        _savez(buf, *args, **kwargs)
        data = buf.getvalue()
        file.write(data[:len(data) // 2])
        file.flush()
        (control / 'writing').touch()
        import rclpy

        deadline = time.monotonic() + 60.0
        while rclpy.ok() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise OSError('injected fault: the map write stopped half-way (test double)')

    numpy.savez = _interrupted_savez
