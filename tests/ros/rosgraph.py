"""Helpers for tests that drive the node in its own process through a real rclpy graph."""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import uuid

import rclpy

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / 'config' / 'perception.yaml'


class NodeProcess:
    """The node started as `python -m ros2_sab3r.ros.perception_node --ros-args ...`."""

    def __init__(self, tmp_path: Path, overlay: str, name: str = 'perception_node',
                 env: dict[str, str] | None = None) -> None:
        self.ns = f'/t{uuid.uuid4().hex[:8]}'
        self.name = f'{self.ns}/{name}'
        overlay_file = tmp_path / 'overlay.yaml'
        overlay_file.write_text(overlay.replace('NS', self.ns), encoding='utf-8')
        self.log_path = tmp_path / 'node.log'
        self._log = open(self.log_path, 'w', encoding='utf-8')  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'ros2_sab3r.ros.perception_node', '--ros-args',
             '--params-file', str(PARAMS), '--params-file', str(overlay_file),
             '-r', f'__ns:={self.ns}'],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=ROOT)

    def rss_bytes(self) -> int:
        """Resident memory of the node process (Linux /proc)."""
        for line in Path(f'/proc/{self.proc.pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
        raise RuntimeError('VmRSS not found')

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding='utf-8')

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def call(node, srv_type, name: str, request, timeout: float = 20.0):
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f'service {name} never appeared'
        future = client.call_async(request)
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        assert future.done(), f'{name} did not answer within {timeout} s'
        return future.result()
    finally:
        node.destroy_client(client)


def spin_until(node, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if predicate():
            return True
    return False


def publish_until(node, pub, make_msg: Callable[[], object], predicate: Callable[[], bool],
                  timeout: float = 20.0, period: float = 0.2) -> bool:
    """Best-effort topics lose messages sent before both ends matched: resend until seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(make_msg())
        if spin_until(node, predicate, timeout=period):
            return True
    return False


