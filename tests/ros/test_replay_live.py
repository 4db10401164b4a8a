"""Live mode: a synthetic bag played with its timing into a perception node in its own process."""

import json
import uuid

import pytest

from ros2_sab3r.eval.convert import convert_synthetic
from ros2_sab3r.ros.replay import main

pytestmark = pytest.mark.ros


def test_live_replay_measures_latency_and_drops(tmp_path):
    bag = tmp_path / 'bag'
    convert_synthetic(bag, frames=10, width=160, height=120, fps=5.0, progress=False)
    out = tmp_path / 'live'
    node = f'/t{uuid.uuid4().hex[:8]}/perception_node'
    assert main([str(bag), '--mode', 'live', '--standin', '--start-node', '--node', node,
                 '--rate', '2', '--out', str(out), '--timeout', '60']) == 0, (
        (out / 'perception_node.log').read_text())
    r = json.loads((out / 'live.json').read_text())
    assert r['frames_published'] == 10
    # The node's own counters (its ~/status): it saw at most what was published, and every
    # image it received is processed or dropped, none left queued.
    assert 2 <= r['frames_received'] <= 10, r
    assert r['frames_queued'] == 0, r
    assert r['frames_processed'] + r['frames_dropped'] == r['frames_received'], r
    assert r['frames_processed'] >= r['keyframes_timed'] >= 2
    assert 0 < r['end_to_end_ms']['median'] < 30_000
    assert 'stand-in' in r['node_backend']
    assert (out / 'live_report.md').is_file() and (out / 'live_latency.png').is_file()
