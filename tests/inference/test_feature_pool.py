"""model.feature_pool: semantic features averaged over n x n pixels, on the torch backend's
device before the copy to the host, on arrival for every other backend."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.inference.common import pool_factor, pool_features, pool_prediction
from ros2_sab3r.inference.torch_backend import TorchBackend
from ros2_sab3r.types import CameraFrame, PairPrediction, ViewPrediction

SIZE = (48, 64)


@pytest.mark.unit
def test_pool_features_averages_each_cell_block():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(8, 12, 5)).astype(np.float32)
    got = pool_features(S, (8, 12), 2)
    assert got.shape == (4, 6, 5) and got.dtype == np.float32
    want = np.stack([[S[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((0, 1)) for j in range(6)]
                     for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # a grid at stride 4 with pool 8 is averaged 2x2; one as coarse as asked is left alone
    assert pool_factor((8, 12), (32, 48), 8) == 2
    assert pool_features(S, (16, 24), 2) is S
    assert pool_features(S, (8, 12), 1) is S and pool_features(None, (8, 12), 2) is None
    assert pool_factor((7, 12), (14, 24), 4) == 1  # does not divide: left as it is


@pytest.mark.unit
def test_pool_prediction_pools_both_views_and_keeps_the_geometry():
    rng = np.random.default_rng(1)
    H, W = 8, 12

    def view(features: bool) -> ViewPrediction:
        return ViewPrediction(X=rng.normal(size=(H, W, 3)), C=np.ones((H, W)),
                              D=np.zeros((H, W, 4)), D_conf=np.ones((H, W)),
                              S_clip=rng.normal(size=(H, W, 6)).astype(np.float32)
                              if features else None,
                              S_dino=rng.normal(size=(H // 2, W // 2, 3)).astype(np.float32)
                              if features else None)

    pred = PairPrediction(view1=view(True), view2=view(False), image_size=(H, W))
    got = pool_prediction(pred, 2)
    assert got.view1.S_clip.shape == (4, 6, 6)
    assert got.view1.S_dino is pred.view1.S_dino  # already on the pooled grid
    assert got.view2 is pred.view2 and got.view1.X is pred.view1.X
    assert pool_prediction(pred, 1) is pred


@pytest.mark.unit
@pytest.mark.parametrize('value', [0, 3, 16])
def test_feature_pool_is_validated(value):
    with pytest.raises(ValueError, match='model.feature_pool'):
        config_from_flat({'model.feature_pool': value}).validate()


def _frame(seed: int) -> CameraFrame:
    rng = np.random.default_rng(seed)
    return CameraFrame(stamp_ns=seed, frame_id='cam',
                       image=rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8))


@pytest.mark.model
def test_torch_backend_pools_on_its_device_as_the_pipeline_pools_on_arrival(tiny_net):
    """The features the torch backend hands over with feature_pool 2 are those of a plain
    decode pooled on the host; the geometry is untouched."""
    plain = TorchBackend(tiny_net, SIZE)
    pooled = TorchBackend(tiny_net, SIZE, feature_pool=2)
    a, b = _frame(1), _frame(2)
    ref = plain.decode(plain.encode(a), plain.encode(b))
    got = pooled.decode(pooled.encode(a), pooled.encode(b))
    assert ref.view1.S_clip.shape[:2] == SIZE  # tiny_cd's heads are at full resolution
    for v_ref, v_got in ((ref.view1, got.view1), (ref.view2, got.view2)):
        for f in ('X', 'C', 'D', 'D_conf'):
            np.testing.assert_array_equal(getattr(v_got, f), getattr(v_ref, f))
        for f in ('S_clip', 'S_dino'):
            want = pool_features(getattr(v_ref, f), SIZE, 2)
            assert getattr(v_got, f).shape == (SIZE[0] // 2, SIZE[1] // 2, want.shape[-1])
            np.testing.assert_allclose(getattr(v_got, f), want, rtol=1e-5, atol=1e-6)
    # what the pipeline does on arrival leaves them as they are
    assert pool_prediction(got, 2) is got
