"""Child processes of the command-line tools (the node started by the demo and the live replay)."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGINT (the node saves nothing half-way and exits cleanly), then SIGKILL after `timeout`
    seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
