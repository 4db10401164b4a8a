"""The prepared GPU check runs end to end (CPU smoke mode) and writes the figures it promises."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'device_check.py'


@pytest.fixture
def one_thread():
    """Torch on one thread: the tiny smoke network gains nothing from threads, and on a shared
    2-core machine two threads wait for each other at every op (measured under load: the smoke
    run took 55 s on 2 threads, 3.7 s on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_device_check_smoke_run_writes_every_stage(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    out = tmp_path / 'check.json'
    assert device_check.main(['--smoke', '--frames', '3', '--repeat', '1', '--out',
                              str(out), '--feature-pools', '1,2']) == 0
    report = json.loads(out.read_text())
    assert report['architecture'] == 'tiny_cd' and report['device'] == 'cpu'
    (row,) = report['network']
    assert set(row['ms']) == {'encode', 'decode_geometry', 'feature_heads_view', 'decode_full',
                              'tracked_frame', 'full_pair'}
    assert all(v > 0 for v in row['ms'].values())
    assert [run['feature_pool'] for run in report['pipeline']['runs']] == [1, 2]
    for run in report['pipeline']['runs']:
        for mode in ('posed', 'unposed'):
            assert run[mode]['frames'] == 3
            assert sum(run[mode]['statuses'].values()) == 3
        for request in ('geometry_only', 'view1_features'):
            parts = run['decode_breakdown_ms'][request]
            assert set(parts) == {'device', 'to_host', 'wrap', 'decode'}
            assert parts['device'] > 0 and parts['decode'] > 0  # differences: noise here
