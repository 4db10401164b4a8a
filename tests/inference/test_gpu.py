"""GPU backends: torch on CUDA (fp32/fp16/bf16, CUDA graphs), ONNX Runtime CUDA, TensorRT.

Skipped without a CUDA GPU (and without tensorrt + pycuda for the TensorRT tests); on a GPU
machine they fail on wrong results. Tolerances are relative to each output's largest |value|
against torch fp32 on the CPU:
- fp32 on the GPU: 1e-2 (TF32 matmuls, TensorRT's default for fp32 engines on Ampere and newer);
- fp16/bf16 backbone, fp32 heads: 5e-2 for every output (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ros2_sab3r.inference.torch_backend import TorchBackend
from ros2_sab3r.types import CameraFrame

pytestmark = [pytest.mark.gpu, pytest.mark.model]

FIELDS = ('X', 'C', 'D', 'D_conf', 'S_clip', 'S_dino')
TOL_FP32 = 1e-2
TOL_REDUCED = 5e-2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (torch.cuda.is_available() is False)')


def _tensorrt_missing() -> str:
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"needs tensorrt and pycuda (pip install 'ros2_sab3r[tensorrt]'): {exc}"
    return ''


needs_tensorrt = pytest.mark.skipif(not torch.cuda.is_available() or bool(_tensorrt_missing()),
                                    reason=_tensorrt_missing() or 'needs a CUDA GPU')


def _frame(stamp: int) -> CameraFrame:
    rng = np.random.default_rng(stamp)
    return CameraFrame(stamp, 'cam', rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))


def _assert_close(got, want, tol: float, what: str) -> None:
    for v in ('view1', 'view2'):
        for f in FIELDS:
            x, y = getattr(getattr(got, v), f), getattr(getattr(want, v), f)
            assert x.shape == y.shape, f'{what} {v}.{f}'
            assert np.isfinite(x).all(), f'{what} {v}.{f} has non-finite values'
            err = float(np.abs(x - y).max() / np.abs(y).max())
            assert err <= tol, f'{what} {v}.{f}: {err:.2e} > {tol:.0e}'


@pytest.fixture(scope='module')
def reference(tiny_net):
    cpu = TorchBackend(copy.deepcopy(tiny_net), (48, 64))
    return cpu.decode(cpu.encode(_frame(1)), cpu.encode(_frame(2)))


@needs_cuda
@pytest.mark.parametrize('dtype, tol', [('fp32', TOL_FP32), ('fp16', TOL_REDUCED),
                                        ('bf16', TOL_REDUCED)])
@pytest.mark.parametrize('graphs', [False, True], ids=['eager', 'cuda-graphs'])
def test_torch_cuda_matches_cpu(tiny_net, reference, dtype, tol, graphs):
    be = TorchBackend(copy.deepcopy(tiny_net), (48, 64), 'cuda', dtype, cuda_graphs=graphs)
    assert be.device == 'cuda'
    a = be.encode(_frame(1))
    a_copy = a.tokens.clone()
    b = be.encode(_frame(2))  # a second replay must not overwrite the first frame's tokens
    assert torch.equal(a.tokens, a_copy)
    _assert_close(be.decode(a, b), reference, tol, f'torch cuda {dtype} graphs={graphs}')


@needs_cuda
def test_onnxruntime_cuda_matches_cpu(export_dir, reference):
    if 'CUDAExecutionProvider' not in ort.get_available_providers():
        pytest.skip('onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)')
    from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions

    out, _ = export_dir
    be = OnnxRuntimeBackend(out, (48, 64), OrtOptions(device='cuda'))
    _assert_close(be.decode(be.encode(_frame(1)), be.encode(_frame(2))), reference, TOL_FP32,
                  'onnxruntime cuda')


@needs_tensorrt
@pytest.mark.parametrize('precision, tol', [('fp32', TOL_FP32), ('fp16', TOL_REDUCED),
                                            ('bf16', TOL_REDUCED)])
def test_tensorrt_engines_match_torch_and_are_cached(export_dir, reference, tmp_path,
                                                     precision, tol):
    from ros2_sab3r.inference.trt_backend import TensorRTBackend
    from ros2_sab3r.inference.trt_engine import ensure_engines

    out, manifest = export_dir
    graph = manifest.graph_for((48, 64))
    enc, dec = ensure_engines(out, graph, precision, tmp_path)
    stamp = (enc.stat().st_mtime_ns, dec.stat().st_mtime_ns)
    assert ensure_engines(out, graph, precision, tmp_path) == (enc, dec)  # cache hit
    assert (enc.stat().st_mtime_ns, dec.stat().st_mtime_ns) == stamp
    assert list(tmp_path.glob('timing_*.cache'))
    be = TensorRTBackend(enc, dec, manifest, graph, precision)
    try:
        pred = be.decode(be.encode(_frame(1)), be.encode(_frame(2)))
        _assert_close(pred, reference, tol, f'tensorrt {precision}')
    finally:
        be.close()


@needs_cuda
def test_torch_cuda_graphs_per_request_kind(tiny_net, reference):
    """With CUDA graphs each DecodeRequest kind replays its own captured decoder."""
    from ros2_sab3r.types import GEOMETRY_ONLY, VIEW1_FEATURES, DecodeRequest

    be = TorchBackend(copy.deepcopy(tiny_net), (48, 64), 'cuda', 'fp32', cuda_graphs=True)
    a, b = be.encode(_frame(1)), be.encode(_frame(2))
    geo = be.decode(a, b, GEOMETRY_ONLY)
    assert geo.view1.S_clip is None and geo.view2.S_clip is None
    kf = be.decode(a, b, VIEW1_FEATURES)
    assert kf.view2.S_dino is None
    err = np.abs(kf.view1.S_clip - reference.view1.S_clip).max()
    assert err <= TOL_FP32 * np.abs(reference.view1.S_clip).max()
    two = be.decode(a, b, DecodeRequest((2,)))  # captured when first asked for
    assert two.view1.S_clip is None and two.view2.S_clip is not None


@needs_tensorrt
def test_tensorrt_split_engines_serve_heads_on_demand(export_dir, reference, tmp_path):
    """Format-2 exports: the split decoder's engines answer every request; what they compute
    matches torch like the full engine, and a geometry-only decode has no features."""
    from ros2_sab3r.inference.trt_backend import TensorRTBackend
    from ros2_sab3r.inference.trt_engine import ensure_engines, ensure_split_engines
    from ros2_sab3r.types import GEOMETRY_ONLY, VIEW1_FEATURES

    out, manifest = export_dir
    graph = manifest.graph_for((48, 64))
    enc, dec = ensure_engines(out, graph, 'fp32', tmp_path)
    split = ensure_split_engines(out, graph, 'fp32', tmp_path)
    assert split is not None and set(split) == {'geometry', '1', '2'}
    be = TensorRTBackend(enc, dec, manifest, graph, 'fp32', split_engines=split)
    try:
        a, b = be.encode(_frame(1)), be.encode(_frame(2))
        geo = be.decode(a, b, GEOMETRY_ONLY)
        assert geo.view1.S_clip is None and geo.view2.S_dino is None
        kf = be.decode(a, b, VIEW1_FEATURES)
        assert kf.view2.S_clip is None
        np.testing.assert_array_equal(kf.view2.X, geo.view2.X)
        _assert_close(be.decode(a, b), reference, TOL_FP32, 'tensorrt split fp32')
    finally:
        be.close()


@needs_tensorrt
def test_tensorrt_through_load_model_and_the_pipeline(export_dir, tiny_net, tmp_path):
    """TensorRT fp32 through load_model and the Pipeline builds the map torch builds (posed
    from TF, so what is compared is what the network adds). Tolerances: the same statuses;
    poses within 1e-4 (they come from TF); at least 80% of the 5 mm voxels shared, median
    position difference of shared voxels under 1.5 mm and CLIP cosine above 0.98, the bounds
    the int8 map test holds with 3% RMS output error (TF32 engines stay well inside 1e-2)."""
    import dataclasses

    from ros2_sab3r.config import ModelConfig, config_from_flat
    from ros2_sab3r.inference.factory import load_model
    from ros2_sab3r.pipeline import Pipeline
    from ros2_sab3r.sim.synthetic import make_scene
    from tests.inference.maps import assert_nearly_the_same_map

    out, _ = export_dir
    model = dataclasses.replace(
        ModelConfig(), backend='tensorrt', checkpoint=str(out), device='cuda', dtype='fp32',
        image_height=48, image_width=64, engine_cache_dir=str(tmp_path),
        text_encoder='ros2_sab3r.sim.standin:HashTextEncoderStandIn')
    loaded = load_model(model)
    frames = make_scene(seed=0).sequence(6, 128, 96)
    cfg = config_from_flat({'frames.pose_source': 'tf', 'mapping.voxel_size_m': 0.005,
                            'geometry.max_registration_rmse': 10.0})
    runs = []
    try:
        for backend in (loaded.backend, TorchBackend(copy.deepcopy(tiny_net), (48, 64))):
            pipeline = Pipeline(cfg, backend, loaded.text_encoder)
            runs.append(([pipeline.step(f.camera_frame(posed=True)) for f in frames],
                         pipeline.snapshot()))
    finally:
        loaded.backend.close()
    (res_trt, map_trt), (res_t, map_t) = runs
    assert [r.status for r in res_trt] == [r.status for r in res_t]
    for a, b in zip(res_trt, res_t):
        assert (a.T_WC is None) == (b.T_WC is None)
        if a.T_WC is not None:
            np.testing.assert_allclose(a.T_WC, b.T_WC, atol=1e-4)
    assert map_t.n_voxels > 500
    assert_nearly_the_same_map(map_trt, map_t)
