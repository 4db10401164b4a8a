"""benchmarks/train_step.py runs in its CPU smoke mode and writes the promised figures."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.train, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'train_step.py'


def test_train_step_smoke_writes_time_memory_and_teacher_share(tmp_path):
    spec = importlib.util.spec_from_file_location('train_step', SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'step.json'
    assert bench.main(['--smoke', '--repeat', '1', '--only', 'bf16:on', '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['device'] == 'cpu' and report['size'] == [48, 64]
    (row,) = report['rows']
    assert (row['precision'], row['activation_checkpointing']) == ('bf16', True)
    assert row['step_s'] > 0 and row['teachers_s'] > 0 and row['peak_mb'] > 0
    assert len(report['load_average']) == 3
