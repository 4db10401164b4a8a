"""sab3r-eval end to end on a synthetic bag with the ground-truth stand-in backend.

The stand-in answers from ground truth, so the metrics must sit near their ideal values; the
perturbed stand-in (noisy pair geometry, swapped classes) must lower exactly the metrics that
measure what was perturbed.
"""

import json

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.eval.bag import GroundTruthBagWriter, read_bag
from ros2_sab3r.eval.cli import main
from ros2_sab3r.eval.evaluate import EvalOptions, Evaluator
from ros2_sab3r.inference.factory import load_model
from ros2_sab3r.sim.standin import SceneSpec
from tests.eval.conftest import SCENE_TEXT

pytestmark = pytest.mark.unit

FAST = ['--group-sizes', '2', '3', '--groups-per-size', '1', '--depth-frames', '6',
        '--no-progress']
OPTIONS = EvalOptions(group_sizes=(2, 3), groups_per_size=1, depth_frames=6, progress=False)


@pytest.fixture(scope='module')
def ideal(synthetic_bag, tmp_path_factory):
    out = tmp_path_factory.mktemp('eval')
    assert main([str(synthetic_bag), '--standin', '--out', str(out), *FAST]) == 0
    return out, json.loads((out / 'results.json').read_text())


def _perturbed(bag_path, perturbation: str) -> dict:
    cfg = config_from_flat({'model.backend': 'ros2_sab3r.sim.standin:PerturbedSceneBackend',
                            'model.standin_scene': f'{SCENE_TEXT};{perturbation}'})
    bag = read_bag(bag_path, progress=False)
    return Evaluator(cfg, load_model(cfg.model), OPTIONS).evaluate(bag).results


def test_report_files_and_configuration(ideal):
    out, r = ideal
    for name in ('results.json', 'report.md', 'class_iou.png', 'trajectory.png', 'latency.png',
                 'semantic_map_top.png'):
        assert (out / name).stat().st_size > 0, name
    cfg = r['configuration']
    assert cfg['parameters']['model.standin_scene'] == SCENE_TEXT
    assert 'stand-in' in cfg['backend'] and cfg['bag']['frames'] == 24
    assert cfg['options']['group_sizes'] == [2, 3] and cfg['command'][0] == 'sab3r-eval'
    assert r['skipped'] == {}
    report = (out / 'report.md').read_text()
    assert 'stand-in' in report and '## Map and Locate' in report and '![trajectory]' in report


def test_ideal_backend_scores_near_perfect(ideal):
    _, r = ideal
    pose = r['pose']
    assert pose['RRA@15'] == 100.0 and pose['RTA@15'] == 100.0 and pose['mAA(30)'] > 99.0
    assert pose['median_rotation_error_deg'] < 0.5
    assert r['depth']['AbsRel'] < 0.01 and r['depth']['delta<1.25'] > 99.0
    seq = r['sequence_map']
    assert seq['mIoU'] > 80 and seq['Acc'] > 90
    assert seq['Comp'] < 0.05 and seq['Median Comp'] < 0.05
    for n in (2, 3):
        g = r['map_and_locate_groups'][f'{n}_views']
        assert len(g['groups']) == 1 and g['mIoU'] > 70 and g['Comp'] < 0.05, g
    loc = r['locate']
    assert loc['success_rate'] == 100.0
    assert r['sequence']['frames'] == 24 and r['sequence']['skipped'] == 0
    assert 0 < r['sequence']['keyframe_rate'] < 1 and 'total' in r['sequence']['latency_ms']


def test_noisy_poses_lower_pose_and_geometry_not_depth(synthetic_bag, ideal):
    _, good = ideal
    bad = _perturbed(synthetic_bag, 'pose_noise_deg=6')
    assert bad['pose']['mAA(30)'] < good['pose']['mAA(30)'] - 10
    assert bad['pose']['median_rotation_error_deg'] > 2.0
    assert bad['sequence_map']['Comp'] > 3 * good['sequence_map']['Comp']
    assert bad['depth']['AbsRel'] == pytest.approx(good['depth']['AbsRel'], abs=1e-6)


def test_swapped_labels_lower_semantics_not_pose(synthetic_bag, ideal):
    _, good = ideal
    bad = _perturbed(synthetic_bag, 'swap=chair:sofa')
    iou_good = good['sequence_map']['per_class_IoU']
    iou_bad = bad['sequence_map']['per_class_IoU']
    assert iou_bad['chair'] < 5 and iou_bad['sofa'] < 5
    assert iou_bad['bed'] == pytest.approx(iou_good['bed'])
    assert bad['sequence_map']['mIoU'] < good['sequence_map']['mIoU'] - 10
    assert bad['sequence_map']['per_class_Comp']['chair'] > 0.3
    assert bad['pose']['mAA(30)'] == pytest.approx(good['pose']['mAA(30)'])
    located = {q['query']: q for q in bad['locate']['queries']}
    assert not located['chair']['success'] and not located['sofa']['success']


def test_bag_without_ground_truth_skips_metrics_and_says_so(tmp_path):
    _, frames = SceneSpec.parse(SCENE_TEXT).render()
    bag = tmp_path / 'images_only'
    with GroundTruthBagWriter(bag) as w:
        w.write_label_map({}, synthetic_scene=SCENE_TEXT)
        for f in frames[:8]:
            w.write_frame(f.stamp_ns, f.rgb, f.K)
    out = tmp_path / 'eval'
    assert main([str(bag), '--standin', '--out', str(out), *FAST]) == 0
    r = json.loads((out / 'results.json').read_text())
    assert set(r['skipped']) == {'pose', 'depth', 'map_and_locate_groups', 'sequence_map',
                                 'locate'}
    assert 'ground-truth camera poses' in r['skipped']['pose']
    assert r['sequence']['frames'] == 8
    report = (out / 'report.md').read_text()
    assert '## Skipped' in report and 'ground-truth depth' in report


def test_clear_errors(tmp_path, synthetic_bag, capsys):
    assert main([str(tmp_path / 'missing'), '--standin', *FAST]) == 1
    assert 'does not exist' in capsys.readouterr().err
    assert main([str(synthetic_bag), '--out', str(tmp_path / 'o'), *FAST]) == 1
    assert '--standin' in capsys.readouterr().err  # no checkpoint: says what to give
    with pytest.raises(SystemExit):
        main([str(synthetic_bag), '--param', 'nonsense'])
    assert main([str(synthetic_bag), '--standin', '--param', 'keyframes.bogus=1', *FAST]) == 1
    assert 'unknown parameter' in capsys.readouterr().err


def test_a_model_with_no_valid_depth_is_reported_not_raised(synthetic_bag, monkeypatch):
    """A barely trained checkpoint can predict no positive depth at the alignment view: the
    map-and-locate sections are listed as skipped with the reason; the rest is still scored."""
    monkeypatch.setattr(Evaluator, '_self_pair_depth',
                        lambda self, frame: np.full((48, 64), -1.0, np.float32))
    cfg = config_from_flat({'model.backend': 'ros2_sab3r.sim.standin:SyntheticSceneBackend',
                            'model.standin_scene': SCENE_TEXT})
    r = Evaluator(cfg, load_model(cfg.model), OPTIONS).evaluate(
        read_bag(synthetic_bag, progress=False)).results
    assert 'fewer than 10 pixels' in r['skipped']['sequence_map']
    assert r['skipped']['locate'] == r['skipped']['sequence_map']
    assert 'pose' in r and 'sequence_map' not in r
