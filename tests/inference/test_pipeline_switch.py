"""Switching the backend does not change the map: torch vs onnxruntime through the Pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions
from ros2_sab3r.inference.torch_backend import TorchBackend
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.sim.standin import HashTextEncoderStandIn
from ros2_sab3r.sim.synthetic import make_scene

pytestmark = [pytest.mark.model, pytest.mark.export]

# A random-weight network predicts a small, arbitrary geometry: a fine voxel grid and a loose
# registration check give a map with content in both modes; what matters is that both backends
# make the same one.
OVERRIDES = {'mapping.voxel_size_m': 0.005, 'geometry.max_registration_rmse': 10.0}


def _run(backend, frames, posed: bool):
    cfg = config_from_flat({'frames.pose_source': 'tf' if posed else 'none', **OVERRIDES})
    pipeline = Pipeline(cfg, backend, HashTextEncoderStandIn(16))
    results = [pipeline.step(f.camera_frame(posed=posed)) for f in frames]
    return results, pipeline.snapshot()


@pytest.mark.parametrize('posed', [False, True], ids=['unposed', 'posed'])
def test_torch_and_onnxruntime_build_the_same_map(export_dir, tiny_net, posed):
    out, _ = export_dir
    frames = make_scene(seed=0).sequence(6, 128, 96)
    runs = [_run(TorchBackend(tiny_net, (48, 64)), frames, posed),
            _run(OnnxRuntimeBackend(out, (48, 64), OrtOptions(threads=2)), frames, posed)]
    (res_t, map_t), (res_o, map_o) = runs
    assert [r.status for r in res_t] == [r.status for r in res_o]
    assert sum(r.is_keyframe for r in res_t) >= 2, [r.reason for r in res_t]
    for a, b in zip(res_t, res_o):
        if a.T_WC is not None:
            np.testing.assert_allclose(a.T_WC, b.T_WC, atol=5e-3)
    assert map_t.n_voxels > 50
    # A point within float error of a voxel face may land on either side: compare the voxels
    # both maps have, and require nearly all of them to be shared.
    keys_t, keys_o = map_t.keys, map_o.keys
    shared, it, io = np.intersect1d(keys_t, keys_o, return_indices=True)
    assert len(shared) >= 0.98 * max(len(keys_t), len(keys_o))
    # A point within float error of a voxel face may move to the neighbour, changing both
    # voxels' weight, mean position and colour: compare the voxels whose weight agrees (the same
    # points fell in), and require almost all to be such.
    w_t, w_o = map_t.weights[it], map_o.weights[io]
    same = np.isclose(w_t, w_o, rtol=1e-2)
    assert same.mean() >= 0.99, same.mean()
    it, io = it[same], io[same]
    np.testing.assert_allclose(map_t.positions[it], map_o.positions[io], atol=1e-3)
    assert np.abs(map_t.colors[it].astype(int) - map_o.colors[io]).max() <= 2
    S_t, S_o = map_t.features('clip'), map_o.features('clip')
    np.testing.assert_allclose(S_t[it], S_o[io], atol=2e-2)  # stored as bf16
