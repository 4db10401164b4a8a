"""The prepared GPU check runs end to end (CPU smoke mode) and writes the figures it promises."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'device_check.py'


def test_device_check_smoke_run_writes_every_stage(tmp_path):
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    out = tmp_path / 'check.json'
    assert device_check.main(['--smoke', '--frames', '3', '--repeat', '1', '--out',
                              str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['architecture'] == 'tiny_cd' and report['device'] == 'cpu'
    (row,) = report['network']
    assert set(row['ms']) == {'encode', 'decode_geometry', 'feature_heads_view', 'decode_full',
                              'tracked_frame', 'full_pair'}
    assert all(v > 0 for v in row['ms'].values())
    for mode in ('posed', 'unposed'):
        assert report['pipeline'][mode]['frames'] == 3
        assert sum(report['pipeline'][mode]['statuses'].values()) == 3
