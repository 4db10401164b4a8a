"""The training engine at toy scale: teachers see the student's pixels, a student distils a
random teacher, heads-only keeps the geometry, DDP equals one process, resume is bit-identical,
exports load, bad states stop with a named cause, and the CLI runs end to end."""

from __future__ import annotations

import errno
import json
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from ros2_sab3r.model.checkpoint import load_network
from ros2_sab3r.model.preprocess import u8_to_tensor
from ros2_sab3r.train import checkpoint as train_checkpoint
from ros2_sab3r.train.augment import plan_crop
from ros2_sab3r.train.checkpoint import (
    TrainingCheckpointError,
    complete_checkpoints,
    load_checkpoint,
)
from ros2_sab3r.train.cli import main
from ros2_sab3r.train.data import image_tensor, student_input
from ros2_sab3r.train.engine import Trainer, TrainingError, close_distributed, run_training
from ros2_sab3r.train.recipe import load_recipe

pytestmark = [pytest.mark.train, pytest.mark.usefixtures('one_thread')]



class RandomTeacherDouble(nn.Module):
    """Test double of a teacher: a fixed random conv net on the [0, 1] crop, (B, H, W, dim)
    at every pixel (a smooth function of the local colours, learnable by a student)."""

    def __init__(self, dim: int, seed: int = 0, record: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(32, 3, 5, 5, generator=g) * 0.4, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(dim, 32, 1, 1, generator=g) * 0.5, requires_grad=False)
        self.dim = dim
        self.seen: list[torch.Tensor] = []
        self.record = record

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.seen.append(images.clone())
        x = F.avg_pool2d(images - 0.5, 4)
        x = torch.tanh(F.conv2d(x, self.w1, padding=2))
        x = F.conv2d(x, self.w2)
        x = F.interpolate(x, size=images.shape[-2:], mode='bilinear', align_corners=False)
        return x.permute(0, 2, 3, 1).contiguous()


class NanTeacherDouble(RandomTeacherDouble):
    """Test double: a teacher whose targets are NaN (a corrupt teacher)."""

    def forward(self, images):
        return super().forward(images) * float('nan')


def toy(*overrides):
    return load_recipe('toy_cpu', list(overrides))


def distil(*overrides):
    """Toy recipe with the CLIP term on (tiny_cd's clip head has 16 channels)."""
    return toy('loss.clip=1.0', 'teachers.clip.weights=unused', 'teachers.clip.upsampler=none',
               *overrides)


def teachers(seed=0, record=False):
    return {'clip': RandomTeacherDouble(16, seed, record)}


def test_teachers_see_exactly_the_student_pixels(tmp_path):
    trainer = Trainer(distil('run.steps=1'), tmp_path, teachers=teachers(record=True),
                      progress=False)
    k = trainer.sample_indices(0, 0)[0]
    pair = trainer.dataset[k]
    trainer.optimise(0)
    seen = trainer.teachers['clip'].seen
    assert len(seen) == 2 * trainer.recipe.batch.accumulation  # both views, every micro-batch
    assert torch.equal(seen[0][0], image_tensor(pair.rgb1))  # the crop, in [0, 1]
    assert torch.equal(seen[1][0], image_tensor(pair.rgb2))
    # ... and the student was given the same crop as the official ToTensor + Normalize(0.5)
    assert torch.equal(student_input(seen[0][:1]), u8_to_tensor(pair.rgb1))


def test_uncropped_input_shows_the_teachers_the_centred_view_not_the_crop(tmp_path, caplog):
    """Reproduction only: the teachers see the official reader's centred view, the student its
    random crop (the toy data's frames have the principal point at the image centre)."""
    with caplog.at_level('WARNING', logger='ros2_sab3r.train.engine'):
        trainer = Trainer(distil('run.steps=1', 'teachers.clip.uncropped_input=true',
                                 'data.scale_range=[1.2, 1.5]'),
                          tmp_path, teachers=teachers(record=True), progress=False)
    assert sum('REPRODUCTION ONLY' in r.getMessage() for r in caplog.records) == 1
    k = trainer.sample_indices(0, 0)[0]
    pair = trainer.dataset[k]
    trainer.optimise(0)
    seen = trainer.teachers['clip'].seen
    source = trainer.scenes[0].views[0].rgb
    centred = plan_crop(source.shape[:2], trainer.recipe.data.resolution)
    assert torch.equal(seen[0][0], image_tensor(pair.teacher1))
    assert torch.equal(seen[1][0], image_tensor(pair.teacher2))
    assert not torch.equal(seen[0][0], image_tensor(pair.rgb1))  # not the student's crop
    assert pair.teacher1.shape == pair.rgb1.shape == centred.image(source).shape


def test_heads_only_keeps_the_geometry_bit_identical(tmp_path):
    recipe = distil('model.trainable=heads', 'run.steps=2', 'optim.warmup_steps=0')
    trainer = Trainer(recipe, tmp_path, teachers=teachers(), progress=False)
    initial = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.fit()
    changed = [k for k, v in trainer.net.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed and all('.clip_head.' in k for k in changed), changed
    assert any('.clip_head.' in k for k in changed)
    metrics = trainer.evaluate()
    assert metrics['depth_vs_initial'] == 0.0
    assert metrics['rot_vs_initial_deg'] < 1e-4 and metrics['tdir_vs_initial_deg'] < 1e-4


def test_forgetting_figures_see_the_geometry_move(tmp_path):
    """Training everything moves depth and pose away from the initial model's."""
    trainer = Trainer(distil('run.steps=3', 'optim.warmup_steps=0', 'optim.lr=1e-2',
                             'batch.accumulation=1'), tmp_path, teachers=teachers(),
                      progress=False)
    assert trainer.evaluate()['rot_vs_initial_deg'] < 1e-4
    trainer.fit()
    metrics = trainer.evaluate()
    assert metrics['depth_vs_initial'] > 0.01
    assert metrics['rot_vs_initial_deg'] > 0.01 and metrics['tdir_vs_initial_deg'] > 0.01


def _parallel_worker(rank: int, world: int, port: int, out: str, parallelism: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(distil('batch.accumulation=1', 'data.held_out=0',
                             f'run.parallelism={parallelism}'), out, progress=False,
                      teachers=teachers())
    trainer.accumulate(0)
    grads = {}
    for name, p in trainer.net.named_parameters():
        if p.grad is not None:  # FSDP2 holds shards (DTensor): gather them (a collective)
            grads[name] = p.grad.full_tensor() if hasattr(p.grad, 'full_tensor') else p.grad
    if rank == 0:
        torch.save(grads, os.path.join(out, 'grads.pt'))
    close_distributed(completed=True)


@pytest.mark.slow
@pytest.mark.parametrize('parallelism', ['ddp', 'fsdp2'])
def test_two_process_gradients_equal_one_process(tmp_path, parallelism):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_parallel_worker, args=(2, port, str(tmp_path), parallelism),
                                nprocs=2)
    ddp = torch.load(tmp_path / 'grads.pt')
    single = Trainer(distil('batch.accumulation=2', 'data.held_out=0'), tmp_path / 'one',
                     progress=False, teachers=teachers())
    single.accumulate(0)  # samples 0 and 1: what ranks 0 and 1 read
    grads = {n: p.grad for n, p in single.net.named_parameters() if p.grad is not None}
    assert set(grads) == set(ddp) and len(grads) > 10
    worst = max(float((ddp[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                for n, g in grads.items())
    assert worst < 1e-4, worst  # float32 summation order only


def test_resume_is_bit_identical(tmp_path):
    recipe = distil('run.steps=2', 'run.checkpoint_every=1', 'data.held_out=0',
                    'batch.accumulation=1', 'batch.micro_batch=2', 'optim.warmup_steps=0')
    straight = run_training(recipe, tmp_path / 'a', teachers=teachers(), progress=False)
    paused = run_training(recipe, tmp_path / 'b', teachers=teachers(), stop_at=1,
                          progress=False)
    assert paused.step == 1 and not (tmp_path / 'b' / 'export').exists()
    resumed = run_training(recipe, tmp_path / 'b', teachers=teachers(), resume='auto',
                           progress=False)
    assert resumed.step == 2
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    a = load_checkpoint(complete_checkpoints(tmp_path / 'a')[-1])
    b = load_checkpoint(complete_checkpoints(tmp_path / 'b')[-1])
    for key in ('exp_avg', 'exp_avg_sq'):
        for i, state in a['optimizer']['state'].items():
            assert torch.equal(state[key], b['optimizer']['state'][i][key])
    assert a['scheduler'] == b['scheduler']
    assert torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])
    # the exports of both runs load strictly and reproduce the in-memory model
    img = torch.rand(1, 3, 48, 64) * 2 - 1
    resumed.net.eval()
    want = resumed.net(img, img.flip(-1))
    for export in (tmp_path / 'b' / 'export' / 'toy_cpu.safetensors',):
        got = load_network(export)(img, img.flip(-1))
        for name in ('pts3d', 'conf', 'desc', 'clip', 'dino'):
            assert torch.equal(getattr(got.view2, name), getattr(want.view2, name)), name
    official = load_network(tmp_path / 'b' / 'export' / 'toy_cpu.pth', config='tiny_cd')
    for k, v in official.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    card = (tmp_path / 'b' / 'export' / 'MODEL_CARD.md').read_text()
    assert 'CC BY-NC-SA 4.0' in card and 'step 2' in card


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    recipe = toy('run.steps=4', 'run.checkpoint_every=2', 'batch.accumulation=1')
    trainer = Trainer(recipe, tmp_path, progress=False)
    trainer.fit(stop_at=2)
    (good,) = complete_checkpoints(tmp_path)
    before = load_checkpoint(good)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(train_checkpoint.torch, 'save', full)
    with pytest.raises(TrainingCheckpointError, match='step 4.*No space left.*step_00000002 '
                       'is intact'):
        trainer.fit()
    assert complete_checkpoints(tmp_path) == [good]
    assert not list((tmp_path / 'checkpoints').glob('.*partial'))
    after = load_checkpoint(good)
    for k, v in before['model'].items():
        assert torch.equal(v, after['model'][k])


def test_a_non_finite_loss_stops_naming_step_and_term(tmp_path):
    recipe = distil('run.steps=3', 'run.checkpoint_every=1', 'batch.accumulation=1')
    trainer = Trainer(recipe, tmp_path, teachers=teachers(), progress=False)
    trainer.fit(stop_at=1)
    trainer.teachers['clip'] = NanTeacherDouble(16)
    with pytest.raises(TrainingError, match="step 1: loss term 'clip_1' is nan"):
        trainer.fit()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ['step_00000001']


def test_cli_end_to_end_on_the_toy_recipe(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['toy_cpu', '--out', str(out), '--set', 'run.steps=2', '--no-progress',
                 '--stop-at', '1']) == 0
    assert 'resume with --resume auto' in capsys.readouterr().out
    assert main(['toy_cpu', '--out', str(out), '--set', 'run.steps=2', '--no-progress',
                 '--resume', 'auto']) == 0
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if 'total' in r] == [1, 2]
    assert all(np.isfinite(r['total']) and r['pairs_per_s'] > 0 for r in rows if 'total' in r)
    assert any('eval/depth_vs_initial' in r for r in rows)
    net = load_network(out / 'export' / 'toy_cpu.safetensors')
    assert net.cfg.name == 'tiny_cd'
    assert (out / 'export' / 'MODEL_CARD.md').is_file()
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))  # pinned dependency
    assert main(['toy_cpu', '--set', 'run.stepz=2']) == 2
    assert "no key 'stepz'" in capsys.readouterr().err
    assert main(['toy_cpu', '--resume', str(tmp_path / 'nowhere')]) == 2
    assert main([str(tmp_path / 'missing.yaml')]) == 2


def test_sources_without_depth_or_poses_are_guarded(tmp_path):
    from ros2_sab3r.eval.bag import GroundTruthBagWriter
    from ros2_sab3r.sim.synthetic import make_scene
    from ros2_sab3r.train.data import DataError

    bag = tmp_path / 'bare'
    with GroundTruthBagWriter(bag) as writer:  # images and K only: no depth, no pose
        for f in make_scene(0).sequence(4, width=64, height=48):
            writer.write_frame(f.stamp_ns, f.rgb, f.K)
    source = ['data.sources.0.kind=bag', f'data.sources.0.path={bag}', 'data.held_out=0',
              'batch.accumulation=1']
    trainer = Trainer(toy(*source), tmp_path / 'run', progress=False)
    assert trainer.guard == 'self_distill'
    metrics = trainer.accumulate(0)
    # the targets are the frozen initial model's own pointmaps: zero error before any step
    assert metrics['pts_err_1'] < 1e-6 and metrics['pts_err_2'] < 1e-6
    assert metrics['regr_1'] < 0  # every pixel counted: -alpha log C (unguarded: no pixel, 0)
    assert metrics['match'] == 0.0  # no true correspondence without geometry
    heads = Trainer(distil(*source, 'model.trainable=heads'), tmp_path / 'heads',
                    teachers=teachers(), progress=False)
    assert heads.guard == 'heads_only'
    with pytest.raises(DataError, match='geometry_guard to heads_only or self_distill'):
        Trainer(toy(*source, 'data.geometry_guard=none'), tmp_path / 'x', progress=False)
    with pytest.raises(DataError, match='set model.trainable=heads'):
        Trainer(toy(*source, 'data.geometry_guard=heads_only'), tmp_path / 'y', progress=False)


def test_the_best_model_is_kept_by_the_configured_metric(tmp_path):
    recipe = distil('run.steps=4', 'run.eval_every=1', 'run.checkpoint_every=4',
                    'optim.warmup_steps=0', 'optim.lr=5e-3', 'batch.accumulation=1',
                    'run.best_metric=eval/depth_vs_initial', 'run.best_mode=max')
    trainer = run_training(recipe, tmp_path, teachers=teachers(), progress=False)
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    logged = [(r['eval/depth_vs_initial'], r['step']) for r in rows
              if 'eval/depth_vs_initial' in r]
    assert len(logged) == 4
    best = json.loads((tmp_path / 'best' / 'best.json').read_text())
    assert (best['value'], best['step']) == max(logged)
    net = load_network(tmp_path / 'best' / 'toy_cpu.safetensors')
    if best['step'] == trainer.step:  # the best is the last model: the export equals it
        for k, v in net.state_dict().items():
            assert torch.equal(v, trainer.net.state_dict()[k]), k
    missing = Trainer(distil('run.best_metric=eval/nothing'), tmp_path / 'x',
                      teachers=teachers(), progress=False)
    with pytest.raises(TrainingError, match=r"eval/nothing was not computed.*'eval/cos_clip'"):
        missing.track_best(missing.evaluate())


def _fsdp2_resume_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    recipe = distil('run.steps=2', 'run.checkpoint_every=1', 'data.held_out=0.25',
                    'batch.accumulation=1', 'optim.warmup_steps=0', 'run.parallelism=fsdp2',
                    'run.best_metric=eval/cos_clip')
    run_training(recipe, os.path.join(out, 'a'), teachers=teachers(), progress=False)
    run_training(recipe, os.path.join(out, 'b'), teachers=teachers(), stop_at=1, progress=False)
    run_training(recipe, os.path.join(out, 'b'), teachers=teachers(), resume='auto',
                 progress=False)
    close_distributed(completed=True)


def _assert_equal_nested(a, b, where=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_equal_nested(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f'{where}.{i}')
    else:
        assert a == b, where


@pytest.mark.slow
def test_fsdp2_resume_is_bit_identical(tmp_path):
    """2 processes (gloo), FSDP2: stopped after step 1 and resumed, step 2 equals a straight
    run's in the gathered model, the optimiser state, the schedule and every rank's RNG; the
    evaluation, pictures and exports see the whole model."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp2_resume_worker, args=(2, port, str(tmp_path)), nprocs=2)
    a = load_checkpoint(complete_checkpoints(tmp_path / 'a')[-1])
    b = load_checkpoint(complete_checkpoints(tmp_path / 'b')[-1])
    assert a['step'] == b['step'] == 2 and a['world'] == 2
    assert len(a['model']) > 10 and len(a['optimizer']['state']) > 10
    for key in ('model', 'optimizer', 'scheduler', 'rng', 'match_generator'):
        _assert_equal_nested(a[key], b[key], key)
    # rank 0 evaluated the gathered model (held-out figures, pictures, the best model)
    rows = [json.loads(line) for line in (tmp_path / 'b' / 'metrics.jsonl').read_text()
            .splitlines()]
    assert any('eval/cos_clip' in r and 'eval/rot_vs_initial_deg' in r for r in rows)
    assert (tmp_path / 'b' / 'pictures' / 'step_00000002.png').is_file()
    assert json.loads((tmp_path / 'b' / 'best' / 'best.json').read_text())['step'] == 2
    straight = load_network(tmp_path / 'a' / 'export' / 'toy_cpu.safetensors')
    resumed = load_network(tmp_path / 'b' / 'export' / 'toy_cpu.safetensors')
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_pca_picture_shows_teacher_and_student_in_one_basis():
    from ros2_sab3r.train.evaluation import pca_picture

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    teacher = rng.normal(size=(8, 12, 16))
    same = pca_picture(image, teacher, teacher.copy())
    assert same.shape == (32, 144, 3) and same.dtype == np.uint8
    assert np.array_equal(same[:, :48], image)
    assert np.array_equal(same[:, 48:96], same[:, 96:])  # equal maps, equal pictures
    assert same[:, 48:96].std() > 30  # the components spread over the colour range
    other = pca_picture(image, teacher, rng.normal(size=(8, 12, 16)))
    assert np.array_equal(other[:, 48:96], same[:, 48:96])
    assert np.abs(other[:, 96:].astype(int) - same[:, 96:]).mean() > 20


def test_pictures_every_k_steps_into_the_run_tensorboard_and_model_card(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = distil('run.steps=3', 'run.pictures_every=2', 'run.checkpoint_every=3',
                    'optim.warmup_steps=0', 'batch.accumulation=1')
    run_training(recipe, tmp_path, teachers=teachers(), progress=False)
    pictures = sorted(p.name for p in (tmp_path / 'pictures').glob('*.png'))
    assert pictures == ['step_00000002.png', 'step_00000003.png']  # every 2 and the end
    h, w = recipe.data.resolution
    with Image.open(tmp_path / 'pictures' / 'step_00000003.png') as im:
        assert im.size == (3 * w, 2 * 2 * h)  # 2 held-out pairs x 2 views, 1 head
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    assert [e.step for e in events.Images('pca')] == [2, 3]
    card = (tmp_path / 'export' / 'MODEL_CARD.md').read_text()
    assert '## Figures' in card and '| eval/cos_clip |' in card and '| total |' in card
    assert '![PCA](pca.png)' in card and (tmp_path / 'export' / 'pca.png').is_file()


def test_eval_bags_are_checked_and_a_failed_sab3r_eval_does_not_stop_training(tmp_path,
                                                                              monkeypatch,
                                                                              caplog):
    from ros2_sab3r.eval import cli as eval_cli
    from ros2_sab3r.train.data import DataError

    with pytest.raises(DataError, match='run.eval_bags: .*nowhere does not exist'):
        Trainer(toy(f'run.eval_bags=[{tmp_path / "nowhere"}]'), tmp_path / 'x', progress=False)
    bag = tmp_path / 'bag'
    bag.mkdir()
    calls = []

    def failing_eval(argv):  # fault injection: sab3r-eval cannot align a young student
        calls.append(argv)
        raise ValueError('the alignment view has fewer than 10 pixels')

    monkeypatch.setattr(eval_cli, 'main', failing_eval)
    recipe = toy('run.steps=2', 'run.eval_every=1', f'run.eval_bags=[{bag}]',
                 'run.eval_args=[--group-sizes, "2"]', 'batch.accumulation=1')
    trainer = run_training(recipe, tmp_path / 'run', progress=False)
    assert trainer.step == 2 and len(calls) == 2
    assert calls[0][:2] == [str(bag), '--checkpoint'] and calls[0][-2:] == ['--group-sizes', '2']
    assert 'sab3r-eval' in caplog.text and 'fewer than 10 pixels' in caplog.text
    assert (tmp_path / 'run' / 'eval' / 'step_00000001' / 'bag0' / 'student.safetensors').is_file()
