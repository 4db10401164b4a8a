"""SIGINT noted from the first moment of the node's process, before rclpy is even imported.

Python turns SIGINT into KeyboardInterrupt wherever the main thread is; while the node's imports
run, that can be inside C code that probes and clears errors, which then loses it (seen: a SIGINT
landing in scipy.spatial's import left the node running for ever). perception_node imports this
module first; its handler records the signal before raising, and main() checks the record
before starting rclpy. Once rclpy is initialised its own handler (which chains to this one)
shuts the context down, so a signal is not lost after that.
"""

from __future__ import annotations

import signal
import threading

_received = threading.Event()


def _note_and_interrupt(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


def install() -> None:
    """Install the recording handler in place of Python's default one (main thread only;
    another handler already installed is left alone)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _note_and_interrupt)


def received() -> bool:
    """True once a SIGINT reached the process (since install())."""
    return _received.is_set()


install()
