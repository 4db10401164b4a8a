"""The training loop: one loop for one process, DDP or FSDP2 (a recipe setting, not a fork).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is gloo on CPUs and NCCL on GPUs;
``run.parallelism`` wraps the student in DDP (default) or FSDP2 (``fully_shard`` per transformer
block, then the root). Per optimiser step each rank runs ``batch.accumulation`` micro-batches of
``batch.micro_batch`` pairs (gradients synchronised on the last one only), clips the global norm
and steps AdamW and the schedule. Global sample k of micro-batch m of step s on rank r is
``((s * accumulation + m) * world + r) * micro_batch + b`` (:mod:`.data`), so a resumed run reads
exactly the samples an uninterrupted one would have.

Precision: ``bf16`` autocasts the encoder and decoders; the heads, the losses and the teachers
(their upsampling included) run in float32. The student sees the crop in [-1, 1] (the official
ToTensor + Normalize(0.5, 0.5)), the teachers the same crop in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
import datetime
import functools
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import shutil
import time
from typing import Any

import torch
from torch import nn
import torch.distributed as dist

from ros2_sab3r.model.checkpoint import alias_groups, load_network
from ros2_sab3r.model.network import Sab3rNet, create_network
from ros2_sab3r.model.outputs import PairOutput
from ros2_sab3r.train.checkpoint import (
    export_model,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ros2_sab3r.train.data import (
    Batch,
    DataError,
    PairDataset,
    SceneViews,
    collate,
    load_source,
    select_pairs,
    split_held_out,
    student_input,
)
from ros2_sab3r.train.evaluation import (
    evaluate_batches,
    held_out_batches,
    initial_depths,
    initial_poses,
    map_and_locate,
    pca_pictures,
)
from ros2_sab3r.train.losses import (
    LossTerms,
    NonFiniteLossError,
    PairTargets,
    ViewTargets,
    sab3r_loss,
)
from ros2_sab3r.train.recipe import FEATURE_TEACHERS, Recipe, dump_recipe
from ros2_sab3r.train.teachers import TeacherConfig, build_teacher, teacher_image

logger = logging.getLogger(__name__)

FEATURE_HEADS = tuple(FEATURE_TEACHERS)  # ('clip', 'dino')
ENCODER_MODULES = ('mask_token', 'patch_embed', 'enc_blocks', 'enc_norm')
LICENCES = ('The network and its initial weights build on MASt3R/DUSt3R (Naver) and SAB3R '
            '(UVA-Computer-Vision-Lab), published under CC BY-NC-SA 4.0 (non-commercial); the '
            'CLIP teacher uses OpenAI CLIP weights (MIT), the DINO teacher DINOv2 (Apache-2.0), '
            'the upsamplers FeatUp (MIT). A model trained from those weights or distilled from '
            'those teachers inherits their terms; check them before deployment.')


class TrainingError(RuntimeError):
    """Training cannot go on; names the step, the term or the setting, and the fix."""


# -- distributed ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """The process group torchrun describes in the environment (none for one process)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0)))


def close_distributed(*, completed: bool) -> None:
    """Leave the process group (if any) at the end of a run.

    completed: every rank reached the end, so they first meet at a barrier. Without it, a rank
    that exits while its peer still tears down its connections can make gloo's background
    thread abort the peer (SIGABRT; seen once in CI at the end of a two-process test). After an
    error no barrier: the other ranks may never arrive.
    """
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def resolve_device(recipe: Recipe, info: DistInfo | None = None) -> torch.device:
    want = recipe.run.device
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    if want == 'cuda':
        if not torch.cuda.is_available():
            raise TrainingError('run.device is cuda but no CUDA device is visible; set '
                                'run.device=cpu')
        local = int(os.environ.get('LOCAL_RANK', 0)) if info is None else info.local_rank
        torch.cuda.set_device(local)
        return torch.device('cuda', local)
    return torch.device('cpu')


# -- the student ------------------------------------------------------------------------------

def build_student(recipe: Recipe) -> Sab3rNet:
    """The architecture with the init checkpoint's matching keys copied in (name and shape),
    the rest at its default initialisation (the official initialisation rule)."""
    net = create_network(recipe.model.architecture)
    if recipe.model.init:
        path = Path(recipe.model.init).expanduser()
        source = load_network(path)
        own = net.state_dict()
        matched = {k: v for k, v in source.state_dict().items()
                   if k in own and own[k].shape == v.shape}
        if not matched:
            raise TrainingError(f'model.init {path}: no weight matches the '
                                f'{recipe.model.architecture} architecture by name and shape')
        net.load_state_dict(matched, strict=False)
        logger.info('initialised %d of %d tensors from %s', len(matched), len(own), path)
    return net


def unused_parameters(net: Sab3rNet) -> set[str]:
    """Parameters no output depends on (found by one small forward and backward), e.g. the
    mask token and the first residual unit of each DPT's deepest fusion block, which has no
    skip input. They are never trained, so DDP/FSDP see a gradient for every trained one."""
    p = net.cfg.patch_size
    probe = torch.zeros(1, 3, 2 * p, 2 * p, device=next(net.parameters()).device)
    flags = {n: q.requires_grad for n, q in net.named_parameters()}
    net.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    try:
        out = net(probe, probe)
        total = sum(v.float().sum() for view in (out.view1, out.view2)
                    for v in vars(view).values() if isinstance(v, torch.Tensor))
        total.backward()
        return {n for n, q in net.named_parameters() if q.grad is None}
    finally:
        net.zero_grad(set_to_none=True)
        for n, q in net.named_parameters():
            q.requires_grad_(flags[n])


def trainable_names(net: Sab3rNet, recipe: Recipe) -> list[str]:
    """Parameters that train: the recipe's part, minus feature heads without a loss and the
    parameters no output uses (so DDP sees a gradient for every trained parameter)."""
    mode = recipe.model.trainable
    unused = unused_parameters(net)
    names = []
    for name, _ in net.named_parameters():
        top = name.split('.')[0]
        if name in unused:
            continue
        head = next((h for h in FEATURE_HEADS if f'.{h}_head.' in name), None)
        if head is not None and getattr(recipe.loss, head) == 0:
            continue
        if mode == 'heads' and head is None:
            continue
        if mode == 'decoder_heads' and top in ENCODER_MODULES:
            continue
        names.append(name)
    if not names:
        raise TrainingError(f'model.trainable={mode} leaves nothing to train (feature heads '
                            'train only with a loss weight > 0 and a teacher)')
    return names


def enable_activation_checkpointing(net: Sab3rNet) -> None:
    """Recompute every encoder and decoder block in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for blocks in (net.enc_blocks, net.dec_blocks, net.dec_blocks2):
        for block in blocks:
            inner = block.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward


class StudentStep(nn.Module):
    """The student's forward as DDP/FSDP see it: backbone under autocast, heads in float32."""

    def __init__(self, net: Sab3rNet, precision: str) -> None:
        super().__init__()
        self.net = net
        self.precision = precision

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> PairOutput:
        device = img1.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == 'bf16'):
            x = student_input(torch.cat([img1, img2]))
            both = self.net.encode(x)
            n = img1.shape[0]
            a = replace(both, tokens=both.tokens[:n])
            b = replace(both, tokens=both.tokens[n:])
            t1, t2 = self.net.decode_tokens(a, b)
        with torch.autocast(device, enabled=False):
            return PairOutput(view1=self.net.run_heads(t1, 1), view2=self.net.run_heads(t2, 2))


def wrap_parallel(step: StudentStep, recipe: Recipe, info: DistInfo, device: torch.device
                  ) -> nn.Module:
    if info.world <= 1:
        return step
    if recipe.run.parallelism == 'fsdp2':
        from torch.distributed.fsdp import fully_shard

        for blocks in (step.net.enc_blocks, step.net.dec_blocks, step.net.dec_blocks2):
            for block in blocks:
                fully_shard(block)
        return fully_shard(step)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[device.index] if device.type == 'cuda'
                                   else None)


# -- schedule ---------------------------------------------------------------------------------

def lr_factor(step: int, recipe: Recipe) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based)."""
    o = recipe.optim
    if step < o.warmup_steps:
        if o.warmup_shape == 'log':  # DeepSpeed WarmupLR's default: log(s + 1) / log(W)
            return math.log(step + 1) / math.log(o.warmup_steps) if o.warmup_steps > 1 else 1.0
        return step / o.warmup_steps
    if o.schedule == 'constant':
        return 1.0
    span = max(1, recipe.run.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(net: Sab3rNet, names: list[str], recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    params = dict(net.named_parameters())
    decay, no_decay = [], []
    for name in names:
        p = params[name]
        (no_decay if o.no_decay_norms_biases and p.ndim <= 1 else decay).append(p)
    groups = [{'params': decay, 'weight_decay': o.weight_decay}]
    if no_decay:
        groups.append({'params': no_decay, 'weight_decay': 0.0})
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


# -- one run ----------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as fh:
        for block in iter(lambda: fh.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def teacher_configs(recipe: Recipe) -> dict[str, TeacherConfig]:
    out = {}
    for head in FEATURE_HEADS:
        section = getattr(recipe.teachers, head)
        if section is None or getattr(recipe.loss, head) == 0:
            continue
        out[head] = TeacherConfig(
            kind=section.kind, weights=Path(section.weights).expanduser(),
            upsampler=section.upsampler,
            upsampler_weights=(Path(section.upsampler_weights).expanduser()
                               if section.upsampler_weights else None),
            chunk_pixels=section.chunk_pixels, upsampler_dropout=section.upsampler_dropout,
            uncropped_input=section.uncropped_input)
    return out


class Trainer:
    """One training run. ``teachers`` replaces the recipe's teachers by modules mapping a [0, 1]
    crop (B, 3, H, W) to (B, H, W, C) targets (tests use random ones)."""

    def __init__(self, recipe: Recipe, run_dir: Path, *,
                 teachers: dict[str, nn.Module] | None = None, progress: bool = True) -> None:
        self.recipe = recipe.validate()
        self.run_dir = Path(run_dir)
        self.info = init_distributed(resolve_device(recipe))
        self.device = resolve_device(recipe, self.info)
        self.progress = progress and self.info.main

        self.scenes = [load_source(s) for s in recipe.data.sources]
        pairs = select_pairs(self.scenes, recipe.data.min_overlap, recipe.data.max_overlap)
        train_pairs, self.held_out_pairs = split_held_out(pairs, recipe.data.held_out,
                                                          recipe.run.seed)
        self.teacher_cfgs = teacher_configs(recipe)
        uncropped = sorted(h for h, c in self.teacher_cfgs.items() if c.uncropped_input)
        if uncropped and self.info.main:
            logger.warning('teachers.%s.uncropped_input: REPRODUCTION ONLY, the teachers see the '
                           "official reader's centred view, not the student's random crop "
                           '(targets not aligned with its pixels); held-out figures stay aligned',
                           '/'.join(uncropped))
        self.dataset = PairDataset(self.scenes, train_pairs, recipe.data, recipe.run.seed,
                                   recipe.batch.symmetrise, teacher_views=bool(uncropped))
        self.guard = self._geometry_guard(self.scenes)
        for bag in recipe.run.eval_bags:
            if not Path(bag).expanduser().exists():
                raise DataError(f'run.eval_bags: {bag} does not exist; give a bag folder that '
                                'sab3r-eval reads (as sab3r-convert writes)')

        # Every rank builds the same initial weights (FSDP2 shards each rank's own copy; DDP
        # would broadcast rank 0's), then draws its own random stream (seed + rank, official).
        torch.manual_seed(recipe.run.seed)
        self.net = build_student(recipe).to(self.device)
        torch.manual_seed(recipe.run.seed + self.info.rank)
        self.reference = None
        if self.guard == 'self_distill':  # the frozen initial model teaches the geometry
            self.reference = copy.deepcopy(self.net).eval().requires_grad_(False)
        names = trainable_names(self.net, recipe)
        wanted = set(names)
        for name, p in self.net.named_parameters():
            p.requires_grad_(name in wanted)
        self.net.train()
        if recipe.model.activation_checkpointing:
            enable_activation_checkpointing(self.net)
        self.model = wrap_parallel(StudentStep(self.net, recipe.precision), recipe, self.info,
                                   self.device)
        self.optimizer = build_optimizer(self.net, names, recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, recipe=recipe))
        self.teachers = self._teachers(teachers)
        self.step = 0
        # The initial model's held-out depths and poses (forgetting), before any step.
        self._full: Sab3rNet | None = None  # the gathered FSDP2 copy of the last full_network
        self._full_current = False  # whether _full (every rank: its gather) has the weights now
        self._initial_depths = self._initial_poses = None
        if self.held_out_pairs:
            net = self.full_network()  # a collective under FSDP2: every rank calls it
            if net is not None:
                held_out = self.held_out_batches()
                self._initial_depths = initial_depths(net, held_out)
                self._initial_poses = initial_poses(net, held_out)
        self.match_generator = torch.Generator().manual_seed(recipe.run.seed + self.info.rank)
        self._tb = None

    # -- setup
    def _geometry_guard(self, scenes: list[SceneViews]) -> str:
        bare = [s.name for s in scenes if not s.has_geometry]
        guard = self.recipe.data.geometry_guard
        if not bare:
            return 'none'
        if guard == 'none':
            raise DataError(f'sources {bare} have no depth or poses, so their geometry cannot '
                            'be supervised; set data.geometry_guard to heads_only or '
                            'self_distill')
        if guard == 'auto':
            guard = 'heads_only' if self.recipe.model.trainable == 'heads' else 'self_distill'
        if guard == 'heads_only' and self.recipe.model.trainable != 'heads':
            raise DataError(f'sources {bare} have no depth or poses and data.geometry_guard is '
                            'heads_only; set model.trainable=heads')
        return guard

    def _teachers(self, given: dict[str, nn.Module] | None) -> dict[str, nn.Module]:
        teachers = dict(given) if given is not None else {
            head: build_teacher(cfg, self.device) for head, cfg in
            teacher_configs(self.recipe).items()}
        for head in FEATURE_HEADS:
            if getattr(self.recipe.loss, head) == 0:
                teachers.pop(head, None)
                continue
            head_cfg = self.net.cfg.feature_head(head)
            if head_cfg is None:
                raise TrainingError(f'loss.{head} > 0 but architecture '
                                    f'{self.net.cfg.name} has no {head} head')
            if head not in teachers:
                raise TrainingError(f'loss.{head} > 0 but no {head} teacher was given')
            dim = getattr(teachers[head], 'dim', None)
            if dim is not None and dim != head_cfg.out_dim:
                raise TrainingError(f'the {head} teacher gives {dim} channels but the '
                                    f'{self.net.cfg.name} {head} head {head_cfg.out_dim}')
        return {k: v.to(self.device) for k, v in teachers.items()}

    # -- data
    def sample_indices(self, step: int, micro: int) -> list[int]:
        r, b = self.recipe, self.recipe.batch.micro_batch
        first = ((step * r.batch.accumulation + micro) * self.info.world + self.info.rank) * b
        return list(range(first, first + b))

    def batch(self, step: int, micro: int) -> Batch:
        return collate([self.dataset[k] for k in self.sample_indices(step, micro)]).to(
            self.device)

    # -- loss
    def targets(self, batch: Batch, out: PairOutput | None = None) -> PairTargets:
        """The batch's targets with the teachers' maps (and the guard's geometry) added."""
        t = batch.targets
        maps: dict[str, list[torch.Tensor | None]] = {h: [None, None] for h in FEATURE_HEADS}
        for head, teacher in self.teachers.items():
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                cfg = self.teacher_cfgs[head]
                maps[head] = [teacher(teacher_image(img, seen, cfg).float()).float()
                              for img, seen in ((batch.img1, batch.teacher1),
                                                (batch.img2, batch.teacher2))]
        views = []
        for v, view in enumerate((t.view1, t.view2)):
            views.append(ViewTargets(view.pts3d, view.valid, None, maps['clip'][v],
                                     maps['dino'][v]))
        targets = PairTargets(views[0], views[1], t.is_metric, t.corres1, t.corres2,
                              t.corres_valid)
        if self.reference is not None and not bool(batch.has_geometry.all()):
            targets = self._self_distilled(batch, targets)
        return targets

    def _self_distilled(self, batch: Batch, targets: PairTargets) -> PairTargets:
        with torch.no_grad():
            ref = StudentStep(self.reference, 'fp32')(batch.img1, batch.img2)
        keep = batch.has_geometry[:, None, None]
        views = []
        for view, ref_view in ((targets.view1, ref.view1), (targets.view2, ref.view2)):
            views.append(replace(view, pts3d=torch.where(keep[..., None], view.pts3d,
                                                         ref_view.pts3d),
                                 valid=torch.where(keep, view.valid, True)))
        # The initial model's pointmaps are targets in its own scale: regressed unnormalised
        # (as metric), so the scale is kept too (normalised, it drifted by 50 % in 100 steps).
        return replace(targets, view1=views[0], view2=views[1],
                       is_metric=targets.is_metric | ~batch.has_geometry)

    def loss(self, batch: Batch) -> LossTerms:
        out = self.model(batch.img1, batch.img2)
        return sab3r_loss(out.view1, out.view2, self.targets(batch), self.recipe.loss,
                          generator=self.match_generator)

    def accumulate(self, step: int) -> dict[str, float]:
        """Forward and backward of every micro-batch of ``step``; gradients left in .grad."""
        acc = self.recipe.batch.accumulation
        sums: dict[str, float] = {}
        for micro in range(acc):
            batch = self.batch(step, micro)
            last = micro == acc - 1
            sync = self.model.no_sync() if hasattr(self.model, 'no_sync') and not last \
                else contextlib.nullcontext()
            with sync:
                try:
                    terms = self.loss(batch)
                except NonFiniteLossError as exc:
                    raise TrainingError(f'step {step}: loss term {exc.term!r} is {exc.value}; '
                                        'training stopped (checkpoints so far are kept: lower '
                                        'optim.lr or check the data)') from None
                (terms.total / acc).backward()
            for k, v in terms.as_floats().items():
                sums[k] = sums.get(k, 0.0) + v / acc
        return sums

    def optimise(self, step: int) -> dict[str, float]:
        """One optimiser step (accumulation, clipping, AdamW, schedule)."""
        self._full_current = False  # the weights change
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.accumulate(step)
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        if not torch.isfinite(norm):
            raise TrainingError(f'step {step}: gradient norm is {float(norm)}; training '
                                'stopped (lower optim.lr)')
        metrics['grad_norm'] = float(norm)
        metrics['lr'] = self.optimizer.param_groups[0]['lr']
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    # -- state
    def state(self) -> dict[str, Any]:
        ranks = [rng_state()]
        if self.info.world > 1:
            ranks = [None] * self.info.world
            dist.all_gather_object(ranks, rng_state())
        if self.recipe.run.parallelism == 'fsdp2' and self.info.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(self.model, options=opts)
            model = {k[len('net.'):] if k.startswith('net.') else k: v for k, v in model.items()}
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        else:
            model = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            optim = self.optimizer.state_dict()
        return {'step': self.step, 'model': model, 'optimizer': optim,
                'scheduler': self.scheduler.state_dict(), 'rng': ranks,
                'match_generator': self.match_generator.get_state(),
                'recipe': dump_recipe(self.recipe), 'world': self.info.world,
                'initial_depths': self._initial_depths, 'initial_poses': self._initial_poses}

    def save(self) -> Path | None:
        state = self.state()
        path = None
        if self.info.main:
            path = save_checkpoint(self.run_dir, self.step, state, self.recipe.run.keep_last)
        if self.info.world > 1:
            dist.barrier()
        return path

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        self._full_current = False  # the weights change
        if state['world'] != self.info.world:
            raise TrainingError(f'{path} was written by {state["world"]} process(es), this run '
                                f'has {self.info.world}; resume with --nproc {state["world"]}')
        if self.recipe.run.parallelism == 'fsdp2' and self.info.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            # Aliased names ('layer_rn.0' = 'layer1_rn') are one tensor: FSDP2 fills the first
            # name and would refuse the plain tensor of the second, so only the first is given.
            aliases = {n for names in alias_groups(self.net) for n in names[1:]}
            result = set_model_state_dict(
                self.model, {'net.' + k: v for k, v in state['model'].items()
                             if k not in aliases},
                options=StateDictOptions(full_state_dict=True, strict=False))
            missing = {k[len('net.'):] for k in result.missing_keys} - aliases
            if missing or result.unexpected_keys:
                raise TrainingError(f'{path}: the model state does not fit this network '
                                    f'(missing {sorted(missing)[:5]}, unexpected '
                                    f'{sorted(result.unexpected_keys)[:5]})')
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state['optimizer'],
                                     options=opts)
        else:
            self.net.load_state_dict(state['model'])
            self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.step = int(state['step'])
        set_rng_state(state['rng'][self.info.rank])
        self.match_generator.set_state(state['match_generator'])
        if self.info.main:
            self._initial_depths = state.get('initial_depths')
            self._initial_poses = state.get('initial_poses')
        logger.info('resumed from %s at step %d', path, self.step)

    # -- the loop
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``run.steps`` (or stop after ``stop_at``), checkpointing on the way."""
        r = self.recipe.run
        end = min(r.steps, stop_at) if stop_at is not None else r.steps
        if self.info.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / 'recipe.yaml').write_text(dump_recipe(self.recipe), encoding='utf-8')
        pairs_per_step = (self.recipe.batch.micro_batch * self.recipe.batch.accumulation
                          * self.info.world)
        from tqdm import tqdm

        bar = tqdm(total=r.steps, initial=self.step, desc=self.recipe.name, unit='step',
                   disable=not self.progress, dynamic_ncols=True)
        metrics: dict[str, float] = {}
        started, first = time.perf_counter(), self.step
        try:
            while self.step < end:
                metrics = self.optimise(self.step)
                self.step += 1
                rate = (self.step - first) * pairs_per_step / (time.perf_counter() - started)
                metrics['pairs_per_s'] = rate
                bar.update()
                bar.set_postfix(loss=f'{metrics["total"]:.4g}', pairs_s=f'{rate:.2f}')
                if self.info.main and (self.step % r.log_every == 0 or self.step == end):
                    self.log(metrics)
                if (r.eval_every and self.step % r.eval_every == 0) or self.step == r.steps:
                    figures = self.evaluate()
                    self.log(figures, prefix='eval/')
                    self.track_best(figures)
                if (r.pictures_every and self.step % r.pictures_every == 0) \
                        or self.step == r.steps:
                    self.pictures()
                if self.step % r.checkpoint_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
            if self._tb:
                self._tb.flush()
        return metrics

    def log(self, metrics: dict[str, float], prefix: str = '') -> None:
        if not self.info.main or not metrics:
            return
        row = {'step': self.step, 'time': datetime.datetime.now(datetime.timezone.utc)
               .isoformat(timespec='seconds')}
        row.update({prefix + k: v for k, v in metrics.items()})
        with open(self.run_dir / 'metrics.jsonl', 'a', encoding='utf-8') as fh:
            fh.write(json.dumps(row) + '\n')
        writer = self._tensorboard()
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(prefix + k, v, self.step)

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                self._tb = False
                logger.warning('tensorboard is not installed; metrics go to metrics.jsonl '
                               'only (pip install tensorboard)')
            else:
                self._tb = SummaryWriter(str(self.run_dir / 'tensorboard'))
        return self._tb or None

    # -- evaluation
    def held_out_batches(self, max_pairs: int = 8) -> list[Batch]:
        """Held-out pairs, centre-cropped without jitter (the same every time)."""
        return held_out_batches(self.scenes, self.held_out_pairs[:max_pairs], self.recipe,
                                self.device)

    def evaluate(self, max_pairs: int = 8) -> dict[str, float]:
        """Held-out pairs: teacher cosine per head, depth error, depth and pose against the
        initial model (forgetting), figures of :func:`.evaluation.evaluate_batches`; then
        Map-and-Locate by sab3r-eval on each of ``run.eval_bags`` (rank 0)."""
        figures = {}
        if not (self.held_out_pairs or self.recipe.run.eval_bags):
            return figures
        net = self.full_network()  # every rank calls it; under FSDP2 rank 0 gets the model
        if net is None:
            return figures
        if self.held_out_pairs:
            figures = evaluate_batches(net, self.teachers, self.held_out_batches(max_pairs),
                                       self._initial_depths, self._initial_poses)
        if self.info.main:
            for i, bag in enumerate(self.recipe.run.eval_bags):
                out = self.run_dir / 'eval' / f'step_{self.step:08d}' / f'bag{i}'
                for k, v in map_and_locate(net, Path(bag).expanduser(),
                                           self.recipe.run.eval_args, out).items():
                    figures[f'bag{i}/{k}'] = v
        return figures

    def full_network(self) -> Sab3rNet | None:
        """The whole student for evaluation and export: the network itself, except under
        FSDP2 where its shards are gathered into a plain copy on rank 0 (a collective every
        rank must call; the other ranks get None). The copy is gathered once per set of weights:
        evaluation, pictures and export at the end of a run share it."""
        if not (self.recipe.run.parallelism == 'fsdp2' and self.info.world > 1):
            self._full = None
            return self.net
        if self._full_current:  # every rank knows it: no rank enters the collective
            return self._full
        self._full = None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        self._full_current = True
        if not self.info.main:
            return None
        net = create_network(self.recipe.model.architecture)
        net.load_state_dict({k[len('net.'):] if k.startswith('net.') else k: v
                             for k, v in state.items()})
        self._full = net.to(self.device).eval()
        return self._full

    def pictures(self, max_pairs: int = 2) -> Path | None:
        """PCA pictures of teacher vs student on held-out pairs: ``run_dir/pictures/
        step_N.png`` and TensorBoard's ``pca`` image (rank 0; None without teachers or held-out
        pairs)."""
        if not (self.teachers and self.held_out_pairs):
            return None
        net = self.full_network()
        if net is None:
            return None
        picture = pca_pictures(net, self.teachers, self.held_out_batches(max_pairs))
        if picture is None:
            return None
        from PIL import Image

        path = self.run_dir / 'pictures' / f'step_{self.step:08d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image('pca', picture, self.step, dataformats='HWC')
        return path

    def track_best(self, figures: dict[str, float]) -> Path | None:
        """Export the model to ``run_dir/best`` when ``run.best_metric`` improved (the figure
        and its step in ``best/best.json``); returns the export when it did."""
        r = self.recipe.run
        if not r.best_metric or not self.info.main:
            return None
        name = r.best_metric[len('eval/'):]
        if name not in figures:
            raise TrainingError(f'run.best_metric {r.best_metric} was not computed at step '
                                f'{self.step}; evaluation figures: '
                                f'{sorted("eval/" + k for k in figures)}')
        value = figures[name]
        best = self.run_dir / 'best' / 'best.json'
        if best.is_file():
            previous = json.loads(best.read_text(encoding='utf-8'))['value']
            if not (value > previous if r.best_mode == 'max' else value < previous):
                return None
        if not math.isfinite(value):
            return None
        ours, _ = export_model(self.net if self._full is None else self._full,
                               self.run_dir / 'best', self.recipe.name)
        best.write_text(json.dumps({'metric': r.best_metric, 'mode': r.best_mode,
                                    'value': value, 'step': self.step}) + '\n',
                        encoding='utf-8')
        logger.info('best %s = %.4g at step %d: %s', r.best_metric, value, self.step, ours)
        return ours

    # -- the end
    def export(self) -> tuple[Path, Path] | None:
        """Exports and MODEL_CARD.md on rank 0 (every rank calls it: FSDP2 gathers)."""
        net = self.full_network()
        if net is None or not self.info.main:
            return None
        ours, official = export_model(net, self.run_dir / 'export', self.recipe.name)
        self.write_model_card(ours)
        return ours, official

    def write_model_card(self, weights: Path) -> Path:
        r = self.recipe
        lines = [f'# {r.name}', '', f'Trained with `sab3r-train` to step {self.step} of '
                 f'{r.run.steps}.', '', f'- Architecture: `{r.model.architecture}`; trained: '
                 f'`{r.model.trainable}`; precision {r.precision}',
                 f'- Initial weights: {r.model.init or "random initialisation"}'
                 + (f' (sha256 {file_sha256(Path(r.model.init).expanduser())})'
                    if r.model.init else '')]
        for head, cfg in teacher_configs(r).items():
            files = [cfg.weights] + ([cfg.upsampler_weights] if cfg.upsampler_weights else [])
            hashes = ', '.join(f'{p.name} sha256 {file_sha256(p)}' for p in files
                               if Path(p).is_file())
            lines.append(f'- {head} teacher: {cfg.kind}, upsampler {cfg.upsampler} ({hashes})')
        lines.append(f'- Data: {", ".join(s.name for s in self.scenes)}; '
                     f'{len(self.dataset.pairs)} training pairs, {len(self.held_out_pairs)} '
                     f'held out; geometry guard {self.guard}')
        lines.append(f'- Loss weights: {r.loss}')
        lines.append(f'- Optimiser: {r.optim}')
        lines += self._card_figures(weights.parent)
        lines += ['', '## Files', '', f'- `{weights.name}`: ros2_sab3r safetensors '
                  '(model.checkpoint of the node, sab3r-export)',
                  f'- `{weights.with_suffix(".pth").name}`: the official training layout',
                  '', '## Licences', '', LICENCES, '']
        path = weights.parent / 'MODEL_CARD.md'
        path.write_text('\n'.join(lines), encoding='utf-8')
        return path

    def _card_figures(self, export_dir: Path) -> list[str]:
        """The card's figures: the last training and evaluation figures (metrics.jsonl),
        the best model (run.best_metric) and the last PCA picture (copied beside the card)."""
        train: dict[str, Any] = {}
        evaluation: dict[str, Any] = {}
        metrics_file = self.run_dir / 'metrics.jsonl'
        if metrics_file.is_file():
            for line in metrics_file.read_text(encoding='utf-8').splitlines():
                row = json.loads(line)
                target = evaluation if any(k.startswith('eval/') for k in row) else train
                target.clear()
                target.update(row)
        lines = ['', '## Figures', '']
        for title, row in (('Training', train), ('Evaluation (held-out pairs, eval bags)',
                                                 evaluation)):
            figures = {k: v for k, v in row.items() if isinstance(v, (int, float))
                       and k != 'step'}
            if not figures:
                continue
            lines += [f'{title}, step {row["step"]}:', '', '| figure | value |', '|---|---|']
            lines += [f'| {k} | {v:.4g} |' for k, v in sorted(figures.items())] + ['']
        best = self.run_dir / 'best' / 'best.json'
        if best.is_file():
            b = json.loads(best.read_text(encoding='utf-8'))
            lines += [f'Best model (`../best/`): {b["metric"]} = {b["value"]:.4g} ({b["mode"]}) '
                      f'at step {b["step"]}.', '']
        pictures = sorted((self.run_dir / 'pictures').glob('step_*.png'))
        if pictures:
            shutil.copyfile(pictures[-1], export_dir / 'pca.png')
            lines += ['Teacher vs student features (per row: held-out crop, teacher, student; '
                      "the teacher's first three principal components as RGB), "
                      f'{pictures[-1].stem.replace("_", " ")}:', '', '![PCA](pca.png)', '']
        if len(lines) == 3:
            lines.append('No figures were logged.')
        return lines

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def run_training(recipe: Recipe, run_dir: Path, *, resume: str | None = None,
                 teachers: dict[str, nn.Module] | None = None, stop_at: int | None = None,
                 progress: bool = True) -> Trainer:
    """Train (resuming from ``'auto'`` = the run's latest checkpoint, or a path) and export."""
    trainer = Trainer(recipe, run_dir, teachers=teachers, progress=progress)
    if resume:
        path = latest_checkpoint(run_dir) if resume == 'auto' else Path(resume)
        if path is not None:
            trainer.resume(path)
    try:
        trainer.fit(stop_at)
        if trainer.step >= recipe.run.steps:
            trainer.export()
    finally:
        trainer.close()
    return trainer
