"""A small synthetic scene converted to a bag once per session (the conversion under test)."""

from pathlib import Path

import pytest

from ros2_sab3r.eval.convert import convert_synthetic

SCENE = dict(seed=0, frames=24, width=160, height=120, fps=5.0)
SCENE_TEXT = 'synthetic:seed=0,frames=24,width=160,height=120,fps=5'


@pytest.fixture(scope='session')
def synthetic_bag(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('bags') / 'synthetic'
    assert convert_synthetic(out, progress=False, **SCENE) == SCENE['frames']
    return out
