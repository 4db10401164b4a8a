"""The speed benchmarks run at toy size and refuse what they cannot measure (never a timed test:
the figures are printed, not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / 'benchmarks'


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCHMARKS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_mapping_runs_on_a_small_map(capsys):
    """A map far below 40,000 voxels (the re-observed count) used to raise in rng.choice."""
    speed = _load('speed')
    speed.ROWS.clear()
    assert speed.main(['mapping', '--voxels', '3000', '--keyframes', '1', '--queries', '1']) == 0
    figures = [r[0] for r in speed.ROWS]
    for wanted in ('integration into an empty map', 'integration into a ', 'Locate (lerf)',
                   'bytes per voxel in memory', 'bytes per voxel on disk', 'save / load',
                   'cosine difference', 'unseen features', 'into a full map'):
        assert any(wanted in f for f in figures), wanted
    bytes_row = next(r for r in speed.ROWS if 'bytes per voxel on disk' in r[0])
    assert bytes_row[4] == 'pass'  # pca_int8 on disk: a layout figure, not a timing
    full = next(r for r in speed.ROWS if 'into a full map' in r[0])
    assert ' 0 evicted' not in full[0]  # the full map really evicts
    assert 'load average' in capsys.readouterr().out


def test_pipeline_benchmark_refuses_too_few_frames():
    pipeline = _load('pipeline')
    with pytest.raises(SystemExit, match='raise --frames'):
        pipeline.keyframe_run(128, 96, 1, posed=True)
