"""The ORACLE backend from recorded bags: synthetic and ScanNet-layout recordings, its noise
options, and the errors when a bag cannot support it."""

import json

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.eval.bag import BagError, GroundTruthBagWriter, read_bag
from ros2_sab3r.eval.cli import main as eval_main
from ros2_sab3r.eval.convert import main as convert_main
from ros2_sab3r.eval.oracle import BagOracleBackend, build_oracle, parse_oracle_param
from ros2_sab3r.inference.factory import load_model
from ros2_sab3r.sim.oracle import OracleNoise
from ros2_sab3r.sim.synthetic import backproject
from ros2_sab3r.types import CameraFrame

pytestmark = pytest.mark.unit

FAST = ['--group-sizes', '2', '--groups-per-size', '1', '--depth-frames', '3', '--no-progress']


def _frame(bag, i):
    return bag.frames[i].camera


def test_noise_options_parse_and_refuse():
    n = OracleNoise.parse('regime=cliplike, clip_noise=0.3,dino_dim=0')
    assert (n.regime, n.clip_noise, n.dino_dim) == ('cliplike', 0.3, 0)
    assert OracleNoise.parse('') == OracleNoise()
    for bad, words in (('regime=best', 'regime'), ('clip_noise=x', 'not a number'),
                       ('depth_noise=-1', 'depth_noise'), ('bogus=1', 'NAME=VALUE')):
        with pytest.raises(ValueError, match=words):
            OracleNoise.parse(bad)
    assert parse_oracle_param('/x/bag;regime=cliplike') == ('/x/bag', OracleNoise('cliplike'))
    with pytest.raises(ValueError, match='model.oracle is empty'):
        parse_oracle_param(';regime=hash')


def test_pointmaps_poses_and_features_come_from_the_bag(synthetic_bag):
    bag = read_bag(synthetic_bag, progress=False)
    oracle = build_oracle(bag, OracleNoise(depth_noise=0.0, clip_noise=0.0))
    assert 'ORACLE' in oracle.name
    a, b = _frame(bag, 0), _frame(bag, 2)
    pred = oracle.decode(oracle.encode(a), oracle.encode(b))
    t1, t2 = bag.frames[0].truth, bag.frames[2].truth
    X1 = backproject(t1.depth, a.K)
    scale = pred.extras['pair_scale']
    np.testing.assert_allclose(pred.view1.X, scale * X1, rtol=1e-4, atol=1e-4)
    # view 2 in view 1's frame through the recorded poses
    T12 = np.linalg.inv(t1.T_WC) @ t2.T_WC
    X2 = backproject(t2.depth, b.K) @ T12[:3, :3].T + T12[:3, 3]
    np.testing.assert_allclose(pred.view2.X, scale * X2, rtol=1e-3, atol=1e-3)
    # clean hash regime: a pixel's feature is its class name's text embedding
    s = oracle._stride
    cls = int(t1.semantic[s // 2, s // 2])
    e = oracle.text_encoder.encode([bag.label_map[cls]])[0]
    np.testing.assert_allclose(pred.view1.S_clip[0, 0], e, atol=1e-6)


def test_missing_depth_has_no_confidence(synthetic_bag):
    bag = read_bag(synthetic_bag, progress=False)
    bag.frames[1].truth.depth[:10] = 0.0  # ScanNet marks missing depth with 0
    bag.frames[1].truth.depth[10:12] = np.nan
    oracle = build_oracle(bag)
    t = oracle.encode(_frame(bag, 1))
    v = oracle.decode(t, t).view1
    assert (v.C[:12] == 0).all() and (v.C[12:] > 1).all()
    assert np.isfinite(v.X).all() and np.isfinite(v.D).all()


def test_bag_without_labels_is_refused(tmp_path):
    with GroundTruthBagWriter(tmp_path / 'b') as w:
        for i in range(2):
            w.write_frame(int(1e9) + i, np.zeros((8, 8, 3), np.uint8), np.eye(3),
                          np.ones((8, 8), np.float32), None, None, np.eye(4))
    bag = read_bag(tmp_path / 'b', progress=False)
    with pytest.raises(BagError, match='label'):
        build_oracle(bag)
    assert eval_main([str(tmp_path / 'b'), '--oracle', *FAST]) == 1


def test_unknown_frame_is_a_value_error(synthetic_bag):
    oracle = build_oracle(read_bag(synthetic_bag, progress=False))
    with pytest.raises(ValueError, match='no rendered frame'):
        oracle.encode(CameraFrame(stamp_ns=5, frame_id='c', image=np.zeros((120, 160, 3),
                                                                           np.uint8)))


def test_node_plugin_reads_model_oracle(synthetic_bag):
    cfg = config_from_flat({'model.backend': 'ros2_sab3r.eval.oracle:BagOracleBackend',
                            'model.oracle': f'{synthetic_bag};regime=cliplike'})
    model = load_model(cfg.model)
    assert isinstance(model.backend, BagOracleBackend)
    assert model.backend.noise.regime == 'cliplike'
    assert type(model.text_encoder).__name__ == 'ClipLikeTextEncoderStandIn'


@pytest.mark.slow
def test_sab3r_eval_oracle_on_a_scannet_layout_scene(tmp_path, capsys):
    scene, bag = tmp_path / 'scene0000_00', tmp_path / 'bag'
    assert convert_main(['synthetic', '--layout', 'scannet', '--seed', '1', '--frames', '16',
                         '--width', '128', '--height', '96', str(scene)]) == 0
    assert convert_main(['scannet', str(scene), str(bag), '--stride', '1', '--labels', 'nyu40',
                         '--no-progress']) == 0
    out = tmp_path / 'eval'
    assert eval_main([str(bag), '--oracle', '--out', str(out), *FAST]) == 0
    r = json.loads((out / 'results.json').read_text())
    assert 'ORACLE' in r['configuration']['backend']
    assert r['configuration']['bag']['info']['source'] == 'scannet:scene0000_00'
    assert r['pose']['RRA@15'] == 100.0 and r['locate']['success_rate'] is not None
    loc = r['locate']
    assert loc['one_found_per_object'] is not None and loc['objects']
    assert all(q['reason'] for q in loc['queries'])  # calibrated mode says why, every answer
