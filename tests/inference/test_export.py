"""sab3r-export: static graphs, onnx.checker, manifest, ORT parity of every output at two sizes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ros2_sab3r.inference import export as export_mod
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.export import (
    DYNAMIC_OPS,
    ExportError,
    check_graph,
    export_network,
    weights_sha256,
)
from ros2_sab3r.inference.manifest import read_manifest
from ros2_sab3r.inference.ort_backend import (
    DISABLED_OPTIMIZERS,
    OnnxRuntimeBackend,
    OrtOptions,
    ort_session_options,
)
from ros2_sab3r.inference.parity import PARITY_TOLERANCES, tolerance_for
from ros2_sab3r.model.network import DecoderGraph
from ros2_sab3r.model.outputs import ENCODER_OUTPUT
from tests.inference.conftest import SIZES

pytestmark = [pytest.mark.model, pytest.mark.export]


def _images(size, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *size, generator=gen) * 2 - 1


def test_manifest_describes_the_export(export_dir, tiny_net):
    out, manifest = export_dir
    assert read_manifest(out) == manifest
    assert manifest.opset >= 17
    assert manifest.image_sizes == list(SIZES)
    assert manifest.weights_sha256 == weights_sha256(tiny_net)
    assert manifest.clip_dim == 16
    for g in manifest.graphs:
        assert g.output_names == DecoderGraph(tiny_net, g.image_size).output_names
        assert g.token_shape == (1, g.image_size[0] * g.image_size[1] // 256, 32)
        # Every output was compared at export time and is inside its written-down tolerance.
        assert set(g.parity) == {ENCODER_OUTPUT, *g.output_names}
        for name, fig in g.parity.items():
            assert fig['rel'] <= fig['tol'] == tolerance_for(name), name


def test_graphs_pass_the_checker_and_have_static_shapes(export_dir):
    out, manifest = export_dir
    for g in manifest.graphs:
        for name in (g.encoder, g.decoder):
            check_graph(out / name)  # raises on a checker failure or a dynamic shape
            model = onnx.load(str(out / name))
            assert model.opset_import[0].version == manifest.opset
            ops = {n.op_type for n in model.graph.node}
            assert not ops & DYNAMIC_OPS, name


@pytest.mark.parametrize('size', SIZES)
def test_onnxruntime_matches_torch_for_every_output(export_dir, tiny_net, size):
    out, manifest = export_dir
    backend = OnnxRuntimeBackend(out, size, OrtOptions(threads=2))
    img1, img2 = _images(size, 10), _images(size, 11)
    with torch.inference_mode():
        ref_t1, ref_t2 = tiny_net.encode(img1).tokens, tiny_net.encode(img2).tokens
        ref = dict(zip(manifest.graph_for(size).output_names,
                       DecoderGraph(tiny_net, size)(ref_t1, ref_t2)))
    t1, t2 = backend.encode_array(img1.numpy()), backend.encode_array(img2.numpy())
    np.testing.assert_allclose(t1, ref_t1.numpy(), atol=tolerance_for(ENCODER_OUTPUT) *
                               float(ref_t1.abs().max()), rtol=0)
    got = backend.decode_arrays(t1, t2)
    assert set(got) == set(ref)
    for name, want in ref.items():
        want = want.numpy()
        assert got[name].shape == want.shape, name
        err = float(np.abs(got[name] - want).max()) / float(np.abs(want).max())
        assert err <= tolerance_for(name), f'{name}: {err:.2e} of its range'


def test_no_rotary_fusion_in_the_optimised_graph(export_dir, tmp_path):
    """ORT's 1D rotary fusion would corrupt the 2D RoPE: the optimised graph must not have it."""
    out, manifest = export_dir
    g = manifest.graphs[0]
    opts = ort_session_options('all', 1)
    optimised = tmp_path / 'optimised.onnx'
    opts.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(out / g.decoder), opts, providers=['CPUExecutionProvider'],
                         disabled_optimizers=DISABLED_OPTIMIZERS)
    ops = {n.op_type for n in onnx.load(str(optimised)).graph.node}
    assert not {op for op in ops if 'Rotary' in op}, ops


def test_modified_or_missing_files_and_wrong_sizes_are_refused(export_dir, tmp_path):
    out, manifest = export_dir
    with pytest.raises(BackendUnavailable, match=r'no graphs for image size 96x128.*48x64'):
        OnnxRuntimeBackend(out, (96, 128))
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    with open(copy / manifest.graphs[0].decoder, 'ab') as fh:
        fh.write(b'\0')
    with pytest.raises(BackendUnavailable, match='sha256 mismatch'):
        OnnxRuntimeBackend(copy, manifest.graphs[0].image_size)
    (copy / manifest.graphs[1].encoder).unlink()
    with pytest.raises(BackendUnavailable, match='missing'):
        OnnxRuntimeBackend(copy, manifest.graphs[1].image_size)
    with pytest.raises(BackendUnavailable, match='not an sab3r-export directory'):
        OnnxRuntimeBackend(tmp_path, (48, 64))
    with pytest.raises(BackendUnavailable, match="model.dtype to 'fp32'"):
        OnnxRuntimeBackend(out, (48, 64), OrtOptions(dtype='fp16'))


def test_an_export_that_differs_fails_and_writes_no_manifest(tiny_net, tmp_path, monkeypatch):
    monkeypatch.setitem(PARITY_TOLERANCES, 'conf', 0.0)
    with pytest.raises(ExportError, match=r'differs from torch.*conf_1'):
        export_network(tiny_net, tmp_path, [(32, 32)], progress=False)
    assert not (tmp_path / 'manifest.json').exists()


def test_check_graph_rejects_data_dependent_shapes(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node('NonZero', ['x'], ['y'])], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info('y', TensorProto.INT64, [1, 'n'])])
    path = tmp_path / 'dynamic.onnx'
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), str(path))
    with pytest.raises(ExportError, match='non-static shape'):
        check_graph(path)


def test_cli_exports_random_weights(tmp_path, capsys):
    rc = export_mod.main(['--random-weights', 'tiny', '--size', '32x48', '--out',
                          str(tmp_path), '--threads', '2'])
    assert rc == 0
    text = capsys.readouterr().out
    assert 'pts3d_in_other_view_2' in text and 'tol' in text
    assert read_manifest(tmp_path).config_name == 'tiny'
    assert export_mod.main(['--random-weights', 'tiny', '--size', '30x48', '--out',
                            str(tmp_path / 'x')]) == 2
