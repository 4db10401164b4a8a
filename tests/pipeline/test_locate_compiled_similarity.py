"""Locate on int8 codes through the compiled similarity loop (mapping.kernels) answers as the
widening + torch path that preceded it (forced here by allowing the loop no embedding): the
acceptance scene, posed, both int8 codecs, 'lerf' and 'official' relevancy (the 'calibrated'
vocabulary is too many embeddings for the loop and takes the widening path either way)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.mapping import snapshot as snapshot_module
from ros2_sab3r.query.engine import QueryEngine
from ros2_sab3r.types import LocateQuery, LocateStatus
from tests.pipeline.conftest import make_backend, make_pipeline, run

pytestmark = pytest.mark.unit

# float32 sums of the same int8 values in another order: relevancy (a logistic of cosine
# differences over query.temperature, or min-max normalised cosines) moves by ~1e-6
TOL = 1e-4


@pytest.mark.parametrize('codec', ['int8', 'pca_int8'])
def test_compiled_similarity_answers_as_the_widened_path(scene, frames, text_encoder, codec,
                                                         monkeypatch):
    pipeline = make_pipeline(make_backend(scene, frames[:30], text_encoder), text_encoder, True,
                             **{'mapping.feature_codec': codec})
    run(pipeline, frames[:30], True)
    snap = pipeline.snapshot()
    assert snap.clip_codec == codec
    labels = tuple(scene.labels)
    for mode in ('lerf', 'official'):
        for threads in (1, 2):
            cfg = config_from_flat({'query.relevancy_mode': mode, 'query.threads': threads})
            query = LocateQuery(queries=labels)
            # a fresh engine each way: the negatives' per-block cache would carry one path's
            # figures into the other
            compiled = QueryEngine(cfg.query, text_encoder).locate(snap, query)
            with monkeypatch.context() as m:
                m.setattr(snapshot_module, 'MAX_COMPILED_EMBEDDINGS', 0)
                widened = QueryEngine(cfg.query, text_encoder).locate(snap, query)
            a, b = compiled.objects, widened.objects
            assert [(o.query, o.status, o.point_count) for o in a] == [
                (o.query, o.status, o.point_count) for o in b], (mode, threads)
            assert sum(o.status == LocateStatus.FOUND for o in a) >= len(labels) // 2
            for x, y in zip(a, b):
                assert abs(x.score - y.score) <= TOL, (mode, x.query, x.score, y.score)
                if x.centroid is not None:
                    np.testing.assert_allclose(x.centroid, y.centroid, atol=TOL)
            np.testing.assert_allclose(compiled.relevancy, widened.relevancy, atol=TOL)
