"""Locate on a map whose CLIP features are stored as int8 (mapping.feature_codec) answers like
the bf16 map (the codec itself: tests/mapping/test_feature_codec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.types import LocateQuery, LocateStatus
from tests.pipeline.conftest import make_backend, make_pipeline, run

pytestmark = pytest.mark.unit


def test_locate_on_an_int8_map_answers_like_the_bf16_map(scene, frames, text_encoder):
    """The acceptance scene, posed: every class found in both maps with the same status, the
    same number of instances, centroids within one voxel and scores within 0.02."""
    answers = {}
    for codec in ('bf16', 'int8'):
        pipeline = make_pipeline(make_backend(scene, frames[:30], text_encoder), text_encoder,
                                 True, **{'mapping.feature_codec': codec})
        run(pipeline, frames[:30], True)
        answers[codec] = pipeline.locate(LocateQuery(queries=tuple(scene.labels)))
    a, b = answers['bf16'].objects, answers['int8'].objects
    assert [(o.query, o.status) for o in a] == [(o.query, o.status) for o in b]
    assert any(o.status == LocateStatus.FOUND for o in a)
    for x, y in zip(a, b):
        assert abs(x.score - y.score) <= 0.02, (x.query, x.score, y.score)
        if x.centroid is not None:
            assert np.linalg.norm(x.centroid - y.centroid) <= 0.05, x.query
            assert abs(x.point_count - y.point_count) <= 0.05 * x.point_count + 2
    np.testing.assert_allclose(answers['int8'].relevancy, answers['bf16'].relevancy, atol=0.05)
