"""Feature grids of different strides through the pipeline."""

from __future__ import annotations

import pytest

from tests.doubles import FinerDinoBackendDouble
from tests.pipeline.conftest import make_backend, make_pipeline, run

pytestmark = pytest.mark.unit


def test_dino_and_clip_features_on_different_grids(scene, frames, text_encoder):
    backend = FinerDinoBackendDouble(make_backend(scene, frames[:8], text_encoder))
    pipeline = make_pipeline(backend, text_encoder, posed=True)
    results = run(pipeline, frames[:8], posed=True)
    assert all(r.status != 'skipped' for r in results), [r.reason for r in results]
    snap = pipeline.snapshot()
    assert snap.n_voxels > 1000 and snap.features('dino') is not None
