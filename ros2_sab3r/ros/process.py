"""The node as a child process of the command-line tools (the demo and the live replay)."""

from __future__ import annotations

from pathlib import Path
import signal
import subprocess

ROOT = Path(__file__).resolve().parents[2]


def params_file() -> Path:
    """The checkout's config/perception.yaml, else the installed package's."""
    checkout = ROOT / 'config' / 'perception.yaml'
    if checkout.is_file():
        return checkout
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory('ros2_sab3r')) / 'config' / 'perception.yaml'


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
