"""model.feature_pool in the pipeline: the map is built from pooled features and answers like
the map of the unpooled ones (the pooling itself: tests/inference/test_feature_pool.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.types import LocateQuery, LocateStatus
from tests.pipeline.conftest import make_pipeline, run

pytestmark = pytest.mark.unit


class MemoBackendDouble:
    """The ground-truth backend with its decodes remembered by the pair's stamps (a test double:
    deterministic per pair anyway), so the pooled and the plain run pay for them once."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.memo = {}

    def encode(self, frame):
        return self.inner.encode(frame)

    def decode(self, a, b):
        key = (a.stamp_ns, b.stamp_ns)
        if key not in self.memo:
            self.memo[key] = self.inner.decode(a, b)
        return self.memo[key]


def test_a_pooled_map_answers_like_the_unpooled_one(scene, text_encoder):
    """The acceptance scene, posed, features at every pixel (as the release heads give them)
    pooled 2 x 2: the same statuses and instance counts, centroids within a voxel, scores
    within 0.02."""
    pool = 2
    H, W = 120, 160  # features at every pixel: a smaller frame than the other pipeline tests
    # 10 frames, each decode paying for 512-d features at every pixel: all 8 labels found, both
    # runs 10 keyframes, scores within 1e-8, centroids within 0.028 m (16 frames: the same
    # figures, 0.028 m, at 1.8 x the time).
    frames = scene.sequence(10, W, H)
    backend = MemoBackendDouble(GroundTruthBackend(frames, text_encoder, feature_stride=1,
                                                   scene_center=np.array(scene.room_size) / 2))
    answers, maps = {}, {}
    for n in (1, pool):
        pipeline = make_pipeline(backend, text_encoder, True, **{'model.feature_pool': n})
        results = run(pipeline, frames, True)
        answers[n] = pipeline.locate(LocateQuery(queries=tuple(scene.labels)))
        maps[n] = pipeline.snapshot()
        kf = pipeline._window.latest().keyframe  # what the map was fed
        assert kf.S_clip.shape[:2] == (H // n, W // n)
        assert sum(r.status.value == 'keyframe' for r in results) >= 3
    a, b = answers[1].objects, answers[pool].objects
    assert [(o.query, o.status) for o in a] == [(o.query, o.status) for o in b]
    assert sum(o.status == LocateStatus.FOUND for o in a) >= 3
    for x, y in zip(a, b):
        assert abs(x.score - y.score) <= 0.02, (x.query, x.score, y.score)
        if x.centroid is not None:
            assert np.linalg.norm(x.centroid - y.centroid) <= 0.05, x.query
    # it took effect: the voxels' features moved (cells now average 2 x 2 of the old ones)
    assert not np.array_equal(maps[1].features('clip'), maps[pool].features('clip'))
    np.testing.assert_array_equal(maps[1].keys, maps[pool].keys)
