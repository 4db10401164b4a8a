"""Locate on a map whose features are stored as int8, or as int8 codes of a projection fitted to
the map (mapping.feature_codec), answers like the bf16 map (the codecs themselves:
tests/mapping/test_feature_codec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.types import LocateQuery, LocateStatus
from tests.pipeline.conftest import make_backend, make_pipeline, run

pytestmark = pytest.mark.unit


# Largest change of a voxel's relevancy. pca_int8 computes cosines in the projected space: the
# part of a voxel's feature outside the basis is dropped, and here that is the simulated feature
# noise (clip_noise 0.5: ~5% of a voxel's energy on average, up to 19%), so a noisy voxel's
# cosine rises by up to ~0.09 (the best 128-d basis of this map itself leaves the same residual).
RELEVANCY_TOL = {'int8': 0.05, 'pca_int8': 0.1}


@pytest.mark.parametrize('compact', ['int8', 'pca_int8'])
def test_locate_on_a_compact_map_answers_like_the_bf16_map(scene, frames, text_encoder, compact):
    """The acceptance scene, posed: every class found in both maps with the same status, the
    same number of instances, centroids within one voxel and scores within 0.02."""
    answers = {}
    for codec in ('bf16', compact):
        pipeline = make_pipeline(make_backend(scene, frames[:30], text_encoder), text_encoder,
                                 True, **{'mapping.feature_codec': codec})
        run(pipeline, frames[:30], True)
        answers[codec] = pipeline.locate(LocateQuery(queries=tuple(scene.labels)))
    a, b = answers['bf16'].objects, answers[compact].objects
    assert [(o.query, o.status) for o in a] == [(o.query, o.status) for o in b]
    assert any(o.status == LocateStatus.FOUND for o in a)
    for x, y in zip(a, b):
        assert abs(x.score - y.score) <= 0.02, (x.query, x.score, y.score)
        if x.centroid is not None:
            assert np.linalg.norm(x.centroid - y.centroid) <= 0.05, x.query
            assert abs(x.point_count - y.point_count) <= 0.05 * x.point_count + 2
    np.testing.assert_allclose(answers[compact].relevancy, answers['bf16'].relevancy,
                               atol=RELEVANCY_TOL[compact])
