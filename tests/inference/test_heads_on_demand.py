"""Heads on demand: a DecodeRequest runs only the feature heads asked for, and what it computes is
identical to the full decode, down to the map and the Locate answers built from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.inference.base import decode_takes_request
from ros2_sab3r.inference.torch_backend import TorchBackend
from ros2_sab3r.model.outputs import EncodedImage
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.sim.standin import HashTextEncoderStandIn
from ros2_sab3r.sim.synthetic import make_scene
from ros2_sab3r.types import (
    FULL_DECODE,
    GEOMETRY_ONLY,
    VIEW1_FEATURES,
    CameraFrame,
    DecodeRequest,
    LocateQuery,
)

pytestmark = pytest.mark.model

SIZE = (48, 64)
OVERRIDES = {'mapping.voxel_size_m': 0.005, 'geometry.max_registration_rmse': 10.0}


class CallCounter:
    """Forward hooks counting the calls of named submodules of a network."""

    def __init__(self, net, names) -> None:
        self.calls = dict.fromkeys(names, 0)
        modules = dict(net.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(*_):
            self.calls[name] += 1
        return hook

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


HEADS = ('downstream_head1.clip_head', 'downstream_head1.dino_head',
         'downstream_head2.clip_head', 'downstream_head2.dino_head',
         'downstream_head1.dpt', 'downstream_head2.dpt', 'dec_blocks.0')


class FullDecodeBackendDouble:
    """Wraps a backend and hides its requests: every decode computes every head (how the
    pipeline decoded before heads on demand), the reference the on-demand runs must equal."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.device, self.input_size = inner.name, inner.device, inner.input_size

    def encode(self, frame):
        return self.inner.encode(frame)

    def decode(self, a, b):
        return self.inner.decode(a, b, FULL_DECODE)


def _frame(seed: int) -> CameraFrame:
    rng = np.random.default_rng(seed)
    return CameraFrame(stamp_ns=seed, frame_id='cam',
                       image=rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8))


def test_decode_request_is_validated():
    assert DecodeRequest((2, 1)).features == (1, 2)
    assert VIEW1_FEATURES.wants_features(1) and not VIEW1_FEATURES.wants_features(2)
    for bad in ((3,), (1, 1), (0,)):
        with pytest.raises(ValueError, match='DecodeRequest.features'):
            DecodeRequest(bad)


def test_network_decode_runs_only_the_requested_feature_heads(tiny_net):
    torch.manual_seed(1)
    img1, img2 = torch.rand(2, 1, 3, *SIZE) * 2 - 1
    counter = CallCounter(tiny_net, HEADS)
    try:
        with torch.inference_mode():
            a, b = tiny_net.encode(img1), tiny_net.encode(img2)
            full = tiny_net.decode(a, b)
            counter.reset()
            geo = tiny_net.decode(a, b, features=())
            assert counter.calls['downstream_head1.clip_head'] == 0
            assert counter.calls['downstream_head2.dino_head'] == 0
            assert counter.calls['downstream_head1.dpt'] == 1
            one = tiny_net.decode(a, b, features=(1,))
    finally:
        counter.remove()
    for got in (geo, one):
        for v_full, v_got in ((full.view1, got.view1), (full.view2, got.view2)):
            for f in ('pts3d', 'conf', 'desc', 'desc_conf'):
                torch.testing.assert_close(getattr(v_got, f), getattr(v_full, f), rtol=0, atol=0)
    assert geo.view1.clip is None and geo.view2.dino is None
    torch.testing.assert_close(one.view1.clip, full.view1.clip, rtol=0, atol=0)
    torch.testing.assert_close(one.view1.dino, full.view1.dino, rtol=0, atol=0)
    assert one.view2.clip is None


def test_torch_backend_decodes_a_pair_once_and_each_head_at_most_once(tiny_net):
    backend = TorchBackend(tiny_net, SIZE)
    assert decode_takes_request(backend)
    a, b = backend.encode(_frame(1)), backend.encode(_frame(2))
    full = backend.decode(a, b)
    backend.forget_pair()
    counter = CallCounter(tiny_net, HEADS)
    try:
        geo = backend.decode(a, b, GEOMETRY_ONLY)
        assert counter.calls == {**dict.fromkeys(HEADS, 0), 'downstream_head1.dpt': 1,
                                 'downstream_head2.dpt': 1, 'dec_blocks.0': 1}
        counter.reset()
        kf = backend.decode(a, b, VIEW1_FEATURES)  # the same pair: only view 1's features run
        assert counter.calls == {**dict.fromkeys(HEADS, 0), 'downstream_head1.clip_head': 1,
                                 'downstream_head1.dino_head': 1}
        counter.reset()
        backend.decode(b, a, GEOMETRY_ONLY)  # another pair decodes again
        assert counter.calls['dec_blocks.0'] == 1
    finally:
        counter.remove()
    assert geo.view1.S_clip is None and geo.view2.S_dino is None
    assert kf.view2.S_clip is None
    for got in (geo, kf):
        for v_full, v_got in ((full.view1, got.view1), (full.view2, got.view2)):
            for f in ('X', 'C', 'D', 'D_conf'):
                np.testing.assert_array_equal(getattr(v_got, f), getattr(v_full, f))
    np.testing.assert_array_equal(kf.view1.S_clip, full.view1.S_clip)
    np.testing.assert_array_equal(kf.view1.S_dino, full.view1.S_dino)
    with pytest.raises(TypeError, match='DecodeRequest'):
        backend.decode(a, b, (1,))


def test_decode_graph_outputs_follow_the_requested_views(tiny_net):
    from ros2_sab3r.model.network import DecoderGraph

    names = DecoderGraph(tiny_net, SIZE, features=(1,)).output_names
    assert 'clip_1' in names and 'dino_1' in names
    assert 'clip_2' not in names and 'pts3d_in_other_view_2' in names
    assert not any(n.startswith(('clip', 'dino'))
                   for n in DecoderGraph(tiny_net, SIZE, features=()).output_names)
    tokens = tiny_net.encode(torch.zeros(1, 3, *SIZE))
    with torch.inference_mode():
        out = DecoderGraph(tiny_net, SIZE, features=(1,))(tokens.tokens, tokens.tokens)
        ref = tiny_net.decode(EncodedImage(tokens.tokens, tokens.grid, SIZE),
                              EncodedImage(tokens.tokens, tokens.grid, SIZE))
    torch.testing.assert_close(out[names.index('clip_1')], ref.view1.clip, rtol=0, atol=0)


def _build(backend, frames, posed: bool):
    cfg = config_from_flat({'frames.pose_source': 'tf' if posed else 'none', **OVERRIDES})
    pipeline = Pipeline(cfg, backend, HashTextEncoderStandIn(16))
    results = [pipeline.step(f.camera_frame(posed=posed)) for f in frames]
    return pipeline, results


@pytest.mark.parametrize('posed', [False, True], ids=['unposed', 'posed'])
def test_on_demand_heads_build_the_same_map_and_answers_as_full_decodes(tiny_net, posed):
    frames = make_scene(seed=0).sequence(6, 128, 96)
    counter = CallCounter(tiny_net, HEADS)
    try:
        ref, ref_results = _build(FullDecodeBackendDouble(TorchBackend(tiny_net, SIZE)),
                                  frames, posed)
        full_calls = dict(counter.calls)
        counter.reset()
        got, got_results = _build(TorchBackend(tiny_net, SIZE), frames, posed)
        calls = dict(counter.calls)
    finally:
        counter.remove()
    assert [r.status for r in got_results] == [r.status for r in ref_results]
    assert sum(r.is_keyframe for r in got_results) >= 2, [r.reason for r in got_results]
    for a, b in zip(got_results, ref_results):
        assert (a.T_WC is None) == (b.T_WC is None)
        if a.T_WC is not None:
            np.testing.assert_array_equal(a.T_WC, b.T_WC)
    # view 2's feature heads never run; view 1's once per keyframe, not per pair
    assert calls['downstream_head2.clip_head'] == 0 < full_calls['downstream_head2.clip_head']
    keyframes = sum(r.is_keyframe for r in got_results)
    assert calls['downstream_head1.clip_head'] == keyframes
    assert calls['downstream_head1.clip_head'] < full_calls['downstream_head1.clip_head']
    map_g, map_r = got.snapshot(), ref.snapshot()
    assert map_g.n_voxels > 50
    np.testing.assert_array_equal(map_g.keys, map_r.keys)
    np.testing.assert_array_equal(map_g.positions, map_r.positions)
    np.testing.assert_array_equal(map_g.weights, map_r.weights)
    np.testing.assert_array_equal(map_g.colors, map_r.colors)
    for name in ('clip', 'dino'):
        np.testing.assert_array_equal(map_g.features(name), map_r.features(name))
    query = LocateQuery(queries=('chair', 'table'), min_score=0.01)
    answer_g, answer_r = got.locate(query), ref.locate(query)
    assert len(answer_g.objects) == len(answer_r.objects)
    for a, b in zip(answer_g.objects, answer_r.objects):
        assert (a.label, a.status, a.score, a.point_count) == (b.label, b.status, b.score,
                                                               b.point_count)
        if a.centroid is not None:
            np.testing.assert_array_equal(a.centroid, b.centroid)
    np.testing.assert_array_equal(answer_g.relevancy, answer_r.relevancy)


@pytest.mark.export
def test_export_writes_split_graphs_with_parity_per_output(export_dir):
    _, manifest = export_dir
    assert manifest.format_version == 2
    for graph in manifest.graphs:
        if graph.precision != 'fp32':
            assert graph.split is None  # the int8 pair runs its full graph
            continue
        split = graph.split
        assert split is not None and set(split.features) == {'1', '2'}
        assert set(split.parity) == set(graph.output_names)
        assert all(f['rel'] <= f['tol'] for f in split.parity.values()), split.parity


def _ort(export, **kw):
    from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions

    return OnnxRuntimeBackend(export, SIZE, OrtOptions(threads=2), **kw)


@pytest.mark.export
def test_onnxruntime_split_graphs_run_only_the_requested_heads(export_dir):
    from ros2_sab3r.inference.parity import PARITY_TOLERANCES, compare

    out, manifest = export_dir
    backend = _ort(out)
    assert backend.split is not None and backend._decoder is None
    a, b = backend.encode(_frame(1)), backend.encode(_frame(2))
    full = backend.decode(a, b, FULL_DECODE)
    backend.forget_pair()
    runs = []
    for view, session in backend._features.items():
        session.run = _counting(session.run, runs, view)
    geo = backend.decode(a, b, GEOMETRY_ONLY)
    assert runs == [] and geo.view1.S_clip is None and geo.view2.S_dino is None
    kf = backend.decode(a, b, VIEW1_FEATURES)
    assert runs == [1] and kf.view2.S_clip is None
    for got in (geo, kf):
        for f in ('X', 'C', 'D', 'D_conf'):
            np.testing.assert_array_equal(getattr(got.view2, f), getattr(full.view2, f))
    np.testing.assert_array_equal(kf.view1.S_clip, full.view1.S_clip)
    # the split graphs against the full decoder graph of the same export
    from ros2_sab3r.inference.ort_backend import ort_session, ort_session_options

    graph = manifest.graph_for(SIZE)
    whole = ort_session(out / graph.decoder, ort_session_options(threads=2),
                        ['CPUExecutionProvider'])
    ref = dict(zip(graph.output_names,
                   whole.run(list(graph.output_names), {'tokens1': a.tokens,
                                                        'tokens2': b.tokens})))
    assert compare('clip_1', full.view1.S_clip[None], ref['clip_1']).ok
    assert compare('pts3d_in_other_view_2', full.view2.X[None],
                   ref['pts3d_in_other_view_2'], PARITY_TOLERANCES).ok


def _counting(run, calls, view):
    def counted(*args, **kw):
        calls.append(view)
        return run(*args, **kw)
    return counted


@pytest.mark.export
def test_format_1_export_still_loads_and_runs_the_full_graph(export_dir, tmp_path):
    import json
    import shutil

    out, _ = export_dir
    old = tmp_path / 'format1'
    shutil.copytree(out, old)
    data = json.loads((old / 'manifest.json').read_text())
    data['format_version'] = 1
    for g in data['graphs']:
        g.pop('split', None)
    (old / 'manifest.json').write_text(json.dumps(data))
    for f in old.glob('geometry_*.onnx'):
        f.unlink()
    backend = _ort(old)
    assert backend.split is None
    a, b = backend.encode(_frame(1)), backend.encode(_frame(2))
    geo = backend.decode(a, b, GEOMETRY_ONLY)
    assert geo.view1.S_clip is None
    full = backend.decode(a, b)
    assert full.view1.S_clip is not None and full.view2.S_dino is not None
    np.testing.assert_array_equal(geo.view2.X, full.view2.X)


@pytest.mark.export
def test_onnxruntime_on_demand_map_equals_the_full_decode_map(export_dir):
    out, _ = export_dir
    frames = make_scene(seed=0).sequence(6, 128, 96)
    ref, ref_results = _build(FullDecodeBackendDouble(_ort(out)), frames, False)
    got, got_results = _build(_ort(out), frames, False)
    assert [r.status for r in got_results] == [r.status for r in ref_results]
    map_g, map_r = got.snapshot(), ref.snapshot()
    assert map_g.n_voxels > 50
    np.testing.assert_array_equal(map_g.keys, map_r.keys)
    np.testing.assert_array_equal(map_g.positions, map_r.positions)
    np.testing.assert_array_equal(map_g.features('clip'), map_r.features('clip'))
