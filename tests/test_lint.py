"""ruff (lint + import order) over the whole tree, as a test."""

from pathlib import Path
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    proc = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format=concise', '.'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f'ruff found problems:\n{proc.stdout}\n{proc.stderr}'


def test_launch_and_scripts_are_valid_python():
    for path in [*ROOT.glob('launch/*.py'), ROOT / 'scripts' / 'perception_node']:
        compile(path.read_text(encoding='utf-8'), str(path), 'exec')
