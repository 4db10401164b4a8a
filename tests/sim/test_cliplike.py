"""The CLIP-like stand-in has the statistics it promises (and the hash stand-in does not)."""

import numpy as np
import pytest

from ros2_sab3r.sim.standin import ClipLikeTextEncoderStandIn

pytestmark = pytest.mark.unit


def test_text_and_pixel_statistics():
    enc = ClipLikeTextEncoderStandIn()
    E = dict(zip(['chair', 'sofa', 'couch', 'lamp', 'bed', 'object'],
                 enc.encode(['chair', 'sofa', 'couch', 'lamp', 'bed', 'object'])))
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in E.values())
    assert E['sofa'] @ E['couch'] > 0.95  # near-synonyms
    assert E['chair'] @ E['sofa'] > E['chair'] @ E['lamp'] + 0.1  # related classes closer
    assert 0.4 < E['lamp'] @ E['bed'] < 0.8  # all text embeddings share a direction
    p = enc.pixel_feature('sofa')
    assert 0.25 < p @ E['sofa'] < 0.4  # low absolute cosine with its own class
    assert p @ E['sofa'] > p @ E['chair'] > p @ E['lamp']
    wall = enc.pixel_feature('wall')
    assert wall @ E['object'] >= wall @ enc.encode(['wall'])[0] - 0.02  # background ~ generic
    harder = ClipLikeTextEncoderStandIn(pixel_text_cosine=0.2).pixel_feature('sofa')
    assert harder @ E['sofa'] < p @ E['sofa']
    with pytest.raises(ValueError, match='pixel_text_cosine'):
        ClipLikeTextEncoderStandIn(pixel_text_cosine=1.5)
