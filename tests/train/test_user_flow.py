"""A user's flow, through the console entry points: sab3r-convert synthetic --layout scannet ->
sab3r-convert scannet -> sab3r-train (toy recipe on that bag, Map-and-Locate by sab3r-eval
during training, best model kept) -> stopped -> resumed -> the checkpoint loads in the node's
backend -> sab3r-eval reports on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.eval.bag import read_bag
from ros2_sab3r.eval.cli import main as sab3r_eval
from ros2_sab3r.eval.convert import main as sab3r_convert
from ros2_sab3r.inference.factory import load_model
from ros2_sab3r.train.cli import main as sab3r_train

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

# The toy network's input size and a stand-in text tower of the tiny CLIP head's width (16):
# what a user of the toy recipe passes to the node and to sab3r-eval.
NODE = ['model.text_encoder=ros2_sab3r.sim.standin:HashTextEncoderStandIn',
        'model.image_width=64', 'model.image_height=48', 'model.device=cpu']
EVAL = ['--group-sizes', '2', '--groups-per-size', '1', '--depth-frames', '4',
        *[a for p in NODE for a in ('--param', p)]]



def test_convert_train_stop_resume_load_and_evaluate(tmp_path, capsys):
    scene, bag, run = tmp_path / 'scannet_scene', tmp_path / 'bag', tmp_path / 'run'
    assert sab3r_convert(['synthetic', '--seed', '0', '--frames', '12', '--width', '96',
                          '--height', '72', '--layout', 'scannet', '--no-progress',
                          str(scene)]) == 0
    assert sab3r_convert(['scannet', str(scene), str(bag), '--labels', 'nyu40', '--stride', '1',
                          '--no-progress']) == 0

    # 50 steps of the 3D term teach the toy enough depth for sab3r-eval's one-view alignment
    # (after 2 steps it refuses: fewer than 10 pixels with a predicted and a true depth; after
    # 50, 3071 of the view's 3072 pixels have both, 3072 after 150).
    train = ['toy_cpu', '--out', str(run), '--no-progress',
             '--set', 'data.sources.0.kind=bag', '--set', f'data.sources.0.path={bag}',
             '--set', 'run.steps=50', '--set', 'run.checkpoint_every=20',
             '--set', 'optim.lr=2e-3', '--set', 'batch.accumulation=1',
             '--set', 'batch.micro_batch=2', '--set', f'run.eval_bags=[{bag}]',
             '--set', f'run.eval_args={json.dumps(EVAL)}',
             '--set', 'run.best_metric=eval/bag0/depth.AbsRel', '--set', 'run.best_mode=min']
    assert sab3r_train([*train, '--stop-at', '30']) == 0
    assert 'resume with --resume auto' in capsys.readouterr().out
    assert not (run / 'export').exists()
    assert sab3r_train([*train, '--resume', 'auto']) == 0
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if 'total' in r] == list(range(1, 51))
    final = [r for r in rows if 'eval/bag0/depth.AbsRel' in r]
    assert [r['step'] for r in final] == [50]  # evaluated at the end (run.eval_every 0)
    for key in ('eval/bag0/locate.success_rate', 'eval/bag0/sequence_map.mIoU',
                'eval/depth_vs_initial', 'eval/rot_vs_initial_deg'):
        assert key in final[0], sorted(final[0])
    assert (run / 'eval' / 'step_00000050' / 'bag0' / 'report.md').is_file()
    best = json.loads((run / 'best' / 'best.json').read_text())
    assert best['step'] == 50 and best['value'] == final[0]['eval/bag0/depth.AbsRel']

    # The node's backend loads the export and decodes a frame of the bag.
    weights = run / 'export' / 'toy_cpu.safetensors'
    cfg = config_from_flat({'model.text_encoder': NODE[0].split('=')[1], 'model.image_width': 64,
                            'model.image_height': 48, 'model.device': 'cpu',
                            'model.checkpoint': str(weights)})
    model = load_model(cfg.model)
    frame = read_bag(bag, progress=False).frames[0].camera
    tokens = model.backend.encode(frame)
    pred = model.backend.decode(tokens, tokens)
    assert pred.image_size == (48, 64)
    assert np.isfinite(pred.view1.X).all()

    # ... and sab3r-eval reports on it.
    out = tmp_path / 'eval'
    assert sab3r_eval([str(bag), '--checkpoint', str(weights), '--out', str(out),
                       '--no-progress', *EVAL]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['depth']['images'] == 4 and np.isfinite(results['depth']['AbsRel'])
    assert 'locate' in results and 'sequence_map' in results
