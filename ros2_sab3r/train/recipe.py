"""Training recipes: typed, validated, frozen data read from YAML, with typed overrides.

A recipe is a :class:`Recipe` of sections (model, teachers, loss, data, optim, batch, precision,
run). :func:`load_recipe` reads a YAML file (``yaml.safe_load``: data only, nothing evaluated),
refuses unknown keys and wrong types naming the dotted key, applies ``--set key=value`` overrides
typed by the field they set, and validates every range. Shipped recipes live in
``ros2_sab3r/train/recipes/*.yaml`` and are loaded by name (``toy_cpu``) or by path.

The loss section is :class:`ros2_sab3r.train.losses.LossWeights` itself (one name per fact):
``sab3r_official.yaml`` holds the official full recipe of sab3r_spec.md section 5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
import math
from pathlib import Path
import types
import typing
from typing import Any, get_type_hints

from ros2_sab3r.train.losses import LossWeights
from ros2_sab3r.train.teachers import TEACHERS, UPSAMPLERS

RECIPE_DIR = Path(__file__).resolve().parent / 'recipes'

TRAINABLE = ('all', 'decoder_heads', 'heads')
SOURCE_KINDS = ('synthetic', 'bag')
CROPS = ('random', 'centre')
GEOMETRY_GUARDS = ('auto', 'none', 'heads_only', 'self_distill')
OPTIMISERS = ('adamw',)
SCHEDULES = ('constant', 'cosine')
WARMUP_SHAPES = ('linear', 'log')
PRECISIONS = ('fp32', 'bf16')
PARALLELISMS = ('ddp', 'fsdp2')
FEATURE_TEACHERS = {'clip': 'maskclip', 'dino': 'dinov2'}  # loss term -> teacher kind


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key (dotted) and the fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f'recipe key {key}: {message}')


@dataclass(frozen=True)
class ModelSection:
    """The student: architecture, initial weights and what trains."""

    architecture: str = 'sab3r_cd'  # shipped name (model/configs) or a JSON path
    init: str = ''  # checkpoint in any layout model/checkpoint.py reads; '' = random init
    trainable: str = 'all'  # all | decoder_heads (decoders + heads) | heads (heads only)
    activation_checkpointing: bool = False  # recompute encoder/decoder blocks in backward

    def validate(self, key: str = 'model') -> None:
        _check(bool(self.architecture), f'{key}.architecture', 'must name an architecture')
        _check(self.trainable in TRAINABLE, f'{key}.trainable',
               f'{self.trainable!r} is not one of {TRAINABLE}')


@dataclass(frozen=True)
class TeacherSection:
    """One feature teacher (see :class:`ros2_sab3r.train.teachers.TeacherConfig`)."""

    kind: str = 'maskclip'  # maskclip (CLIP head) | dinov2 (DINO head)
    weights: str = ''  # open_clip ViT-B-16 or timm vit_small_patch14_dinov2 state dict
    upsampler: str = 'jbu'  # none | bilinear | jbu
    upsampler_weights: str = ''  # FeatUp JBU checkpoint (jbu only)
    chunk_pixels: int = 65536  # JBU band size in output pixels (memory)
    upsampler_dropout: bool = False  # reproduction only: the official trainer's active dropout
    uncropped_input: bool = False  # reproduction only: teacher sees the centred view, not the crop

    def validate(self, key: str) -> None:
        _check(self.kind in TEACHERS, f'{key}.kind', f'{self.kind!r} is not one of {TEACHERS}')
        _check(self.upsampler in UPSAMPLERS, f'{key}.upsampler',
               f'{self.upsampler!r} is not one of {UPSAMPLERS}')
        _check(bool(self.weights), f'{key}.weights', f'the {self.kind} teacher needs its '
               'weights file')
        _check(self.upsampler != 'jbu' or bool(self.upsampler_weights),
               f'{key}.upsampler_weights', 'the jbu upsampler needs its FeatUp checkpoint')
        _check(self.chunk_pixels >= 1, f'{key}.chunk_pixels', 'must be >= 1')


@dataclass(frozen=True)
class TeachersSection:
    clip: TeacherSection | None = None  # target of the CLIP head (kind maskclip)
    dino: TeacherSection | None = None  # target of the DINO head (kind dinov2)

    def validate(self, key: str = 'teachers') -> None:
        for name, kind in FEATURE_TEACHERS.items():
            section = getattr(self, name)
            if section is not None:
                section.validate(f'{key}.{name}')
                _check(section.kind == kind, f'{key}.{name}.kind',
                       f'the {name} head is taught by {kind!r}, got {section.kind!r}')


@dataclass(frozen=True)
class DataSource:
    """One source of views: a synthetic scene or a rosbag (as sab3r-convert writes)."""

    kind: str = 'synthetic'  # synthetic | bag
    path: str = ''  # bag folder (bag only)
    seed: int = 0  # synthetic scene seed
    frames: int = 24  # synthetic: views rendered; bag: at most this many read (0 = all)
    stride: int = 1  # bag: keep every n-th image
    trajectory: str = 'handheld'  # synthetic camera path: handheld | robot | rotation
    render_size: tuple[int, int] = (96, 128)  # synthetic (H, W) rendered before augmentation
    is_metric: bool = True  # metric-scale depth: the 3D term learns the scale
    pose_topic: str = '/gt/pose'  # bag poses: this PoseStamped topic, or TF when '' ...
    tf_map_frame: str = ''  # ... from this frame to the image's frame_id

    def validate(self, key: str) -> None:
        _check(self.kind in SOURCE_KINDS, f'{key}.kind',
               f'{self.kind!r} is not one of {SOURCE_KINDS}')
        _check(self.kind != 'bag' or bool(self.path), f'{key}.path', 'a bag source needs a path')
        _check(self.frames >= (0 if self.kind == 'bag' else 2), f'{key}.frames',
               'a synthetic source needs at least 2 frames' if self.kind == 'synthetic'
               else 'must be >= 0')
        _check(self.stride >= 1, f'{key}.stride', 'must be >= 1')
        _check(self.trajectory in ('handheld', 'robot', 'rotation'), f'{key}.trajectory',
               f'{self.trajectory!r} is not one of handheld, robot, rotation')
        _check(all(v >= 16 for v in self.render_size), f'{key}.render_size',
               'both sides must be >= 16 pixels')


@dataclass(frozen=True)
class DataSection:
    sources: tuple[DataSource, ...] = (DataSource(),)
    resolution: tuple[int, int] = (384, 512)  # network input (H, W), multiples of the patch
    crop: str = 'random'  # random crop ('auto' of the official recipe) | centre
    scale_range: tuple[float, float] = (1.0, 1.3)  # resize factor over the cover size before crop
    color_jitter: float = 0.0  # brightness/contrast/saturation amplitude in [0, 1)
    correspondences: int = 8192  # sampled per pair (at most 50 % negatives)
    negatives: float = 0.5  # share of the correspondences that are not true matches
    min_overlap: float = 0.1  # co-visible fraction of view 1 a pair needs
    max_overlap: float = 0.95
    held_out: float = 0.0  # share of each source's pairs kept for evaluation
    geometry_guard: str = 'auto'  # without depth/poses: heads_only | self_distill | none

    def validate(self, key: str = 'data') -> None:
        _check(len(self.sources) >= 1, f'{key}.sources', 'needs at least one source')
        for i, source in enumerate(self.sources):
            source.validate(f'{key}.sources.{i}')
        _check(all(v >= 16 and v % 16 == 0 for v in self.resolution), f'{key}.resolution',
               f'{self.resolution} must be multiples of 16 (the patch size)')
        _check(self.crop in CROPS, f'{key}.crop', f'{self.crop!r} is not one of {CROPS}')
        lo, hi = self.scale_range
        _check(1.0 <= lo <= hi <= 4.0, f'{key}.scale_range', 'needs 1 <= min <= max <= 4')
        _check(0.0 <= self.color_jitter < 1.0, f'{key}.color_jitter', 'must be in [0, 1)')
        _check(self.correspondences >= 1, f'{key}.correspondences', 'must be >= 1')
        _check(0.0 <= self.negatives < 1.0, f'{key}.negatives', 'must be in [0, 1)')
        _check(0.0 <= self.min_overlap < self.max_overlap <= 1.0, f'{key}.min_overlap',
               'needs 0 <= min_overlap < max_overlap <= 1')
        _check(0.0 <= self.held_out < 1.0, f'{key}.held_out', 'must be in [0, 1)')
        _check(self.geometry_guard in GEOMETRY_GUARDS, f'{key}.geometry_guard',
               f'{self.geometry_guard!r} is not one of {GEOMETRY_GUARDS}')


@dataclass(frozen=True)
class OptimSection:
    name: str = 'adamw'
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    no_decay_norms_biases: bool = False  # the official recipe decays every parameter
    warmup_steps: int = 4000  # warm-up from 0 to lr (optimiser steps)
    warmup_shape: str = 'linear'  # linear | log (DeepSpeed WarmupLR's default)
    schedule: str = 'constant'  # after warm-up: constant | cosine (to min_lr at run.steps)
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    def validate(self, key: str = 'optim') -> None:
        _check(self.name in OPTIMISERS, f'{key}.name', f'{self.name!r} not in {OPTIMISERS}')
        _check(math.isfinite(self.lr) and self.lr > 0, f'{key}.lr', 'must be > 0')
        _check(all(0.0 <= b < 1.0 for b in self.betas), f'{key}.betas', 'must be in [0, 1)')
        _check(self.weight_decay >= 0, f'{key}.weight_decay', 'must be >= 0')
        _check(self.warmup_steps >= 0, f'{key}.warmup_steps', 'must be >= 0')
        _check(self.warmup_shape in WARMUP_SHAPES, f'{key}.warmup_shape',
               f'{self.warmup_shape!r} is not one of {WARMUP_SHAPES}')
        _check(self.schedule in SCHEDULES, f'{key}.schedule',
               f'{self.schedule!r} is not one of {SCHEDULES}')
        _check(0.0 <= self.min_lr <= self.lr, f'{key}.min_lr', 'needs 0 <= min_lr <= lr')
        _check(self.grad_clip >= 0, f'{key}.grad_clip', 'must be >= 0 (0 = off)')


@dataclass(frozen=True)
class BatchSection:
    micro_batch: int = 1  # pairs per process per forward
    accumulation: int = 8  # micro-batches per optimiser step
    symmetrise: bool = True  # each pair also in the other order (official)

    def validate(self, key: str = 'batch') -> None:
        _check(self.micro_batch >= 1, f'{key}.micro_batch', 'must be >= 1')
        _check(self.accumulation >= 1, f'{key}.accumulation', 'must be >= 1')


def _check_eval_args(args: tuple[str, ...], key: str) -> None:
    """sab3r-eval's own parser reads ``args`` (after a bag), so a typo fails at load."""
    import contextlib
    import io

    from ros2_sab3r.eval.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = build_parser().parse_args(['BAG', *args])
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise RecipeError(f'recipe key {key}: sab3r-eval refuses {list(args)}: '
                          f'{message[-1] if message else "bad arguments"}') from None
    _check(not (parsed.out or parsed.checkpoint or parsed.mode == 'live'), key,
           'the training run sets --out and --checkpoint and evaluates offline; drop them')


@dataclass(frozen=True)
class RunSection:
    steps: int = 1000  # optimiser steps
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10
    eval_every: int = 0  # held-out evaluation every N steps; 0 = only at the end
    eval_bags: tuple[str, ...] = ()  # bags mapped and queried by sab3r-eval at each evaluation
    eval_args: tuple[str, ...] = ()  # their sab3r-eval options (--param model.text_encoder=...)
    best_metric: str = ''  # keep the best model by this logged figure (eval/...); '' = none
    best_mode: str = 'max'  # max | min: which way best_metric is better
    pictures_every: int = 0  # PCA pictures of teacher vs student every N steps; 0 = at the end
    seed: int = 8  # rank r uses seed + r (official)
    parallelism: str = 'ddp'  # ddp | fsdp2 (under torchrun)
    device: str = 'auto'  # auto | cpu | cuda

    def validate(self, key: str = 'run') -> None:
        for name in ('steps', 'checkpoint_every', 'keep_last', 'log_every'):
            _check(getattr(self, name) >= 1, f'{key}.{name}', 'must be >= 1')
        _check(self.eval_every >= 0, f'{key}.eval_every', 'must be >= 0')
        _check(self.pictures_every >= 0, f'{key}.pictures_every', 'must be >= 0')
        _check(all(bool(b) for b in self.eval_bags), f'{key}.eval_bags', 'a bag path is empty')
        if self.eval_args:
            _check_eval_args(self.eval_args, f'{key}.eval_args')
        _check(not self.best_metric or self.best_metric.startswith('eval/'),
               f'{key}.best_metric', f'{self.best_metric!r} is not an evaluation figure: '
               "name one logged with the 'eval/' prefix, e.g. eval/cos_clip")
        _check(self.best_mode in ('max', 'min'), f'{key}.best_mode',
               f'{self.best_mode!r} is not one of max, min')
        _check(self.seed >= 0, f'{key}.seed', 'must be >= 0')
        _check(self.parallelism in PARALLELISMS, f'{key}.parallelism',
               f'{self.parallelism!r} is not one of {PARALLELISMS}')
        _check(self.device in ('auto', 'cpu', 'cuda'), f'{key}.device',
               f'{self.device!r} is not one of auto, cpu, cuda')


@dataclass(frozen=True)
class Recipe:
    name: str = 'recipe'
    model: ModelSection = field(default_factory=ModelSection)
    teachers: TeachersSection = field(default_factory=TeachersSection)
    loss: LossWeights = field(default_factory=LossWeights)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    precision: str = 'fp32'  # fp32 | bf16 (autocast; heads, losses, teachers fp32)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> Recipe:
        _check(bool(self.name), 'name', 'must not be empty')
        for section in (self.model, self.teachers, self.data, self.optim, self.batch, self.run):
            section.validate()
        try:
            self.loss.validate()
        except ValueError as exc:
            raise RecipeError(f'recipe section loss: {exc}') from None
        _check(self.precision in PRECISIONS, 'precision',
               f'{self.precision!r} is not one of {PRECISIONS}')
        for name in FEATURE_TEACHERS:
            _check(getattr(self.loss, name) == 0 or getattr(self.teachers, name) is not None,
                   f'teachers.{name}', f'loss.{name} is {getattr(self.loss, name)} but no '
                   f'{name} teacher is configured (add one or set loss.{name}: 0)')
        _check(self.loss.match_block >= self.data.correspondences
               or self.data.correspondences % self.loss.match_block == 0,
               'data.correspondences', f'{self.data.correspondences} is not a multiple of '
               f'loss.match_block {self.loss.match_block}')
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# -- typed conversion ------------------------------------------------------------------------

def _to_plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` (plain YAML data) as type ``tp``, or a RecipeError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(value, inner, key)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f'recipe key {key}: expected a mapping of {tp.__name__} fields, '
                              f'got {value!r}')
        return _build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise RecipeError(f'recipe key {key}: expected a list, got {value!r}')
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f'{key}.{i}') for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f'recipe key {key}: expected {len(args)} values, got {value!r}')
        return tuple(_convert(v, t, f'{key}.{i}') for i, (v, t) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f'recipe key {key}: expected true or false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f'recipe key {key}: expected an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f'recipe key {key}: expected a number, got {value!r}')
        if not math.isfinite(float(value)):
            raise RecipeError(f'recipe key {key}: must be finite, got {value!r}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f'recipe key {key}: expected a string, got {value!r}')
        return value
    raise RecipeError(f'recipe key {key}: unsupported type {_type_name(tp)}')


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        where = f'{prefix}.' if prefix else ''
        raise RecipeError(f'unknown recipe keys {[where + k for k in unknown]}; known '
                          f'{"in " + prefix if prefix else "at the top"}: {known}')
    kwargs = {name: _convert(data[name], hints[name], f'{prefix}.{name}' if prefix else name)
              for name in known if name in data}
    return cls(**kwargs)


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """A validated recipe from plain data (what YAML gives); missing keys keep their defaults."""
    if not isinstance(data, Mapping):
        raise RecipeError(f'a recipe is a mapping of sections, got {type(data).__name__}')
    return _build(Recipe, data, '').validate()


# -- overrides -------------------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ''
    except yaml.YAMLError:
        return text


def _set_path(value: Any, hint: Any, path: list[str], raw: str, key: str) -> Any:
    """``value`` with the field at ``path`` replaced by ``raw`` typed by that field."""
    if not path:
        parsed = _parse_value(raw)
        if hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and str in typing.get_args(hint)):
            parsed = raw  # strings stay as written ('1e-4' as a path, 'true' as a name)
        elif hint is float and isinstance(parsed, str):
            try:  # YAML 1.1 reads '2e-3' (no dot) as a string
                parsed = float(parsed)
            except ValueError:
                pass
        elif typing.get_origin(hint) is tuple and isinstance(parsed, str):
            parsed = [_parse_value(v) for v in parsed.split(',')]  # --set data.resolution=32,64
        return _convert(parsed, hint, key)
    head, rest = path[0], path[1:]
    if is_dataclass(value):
        hints = get_type_hints(type(value))
        if head not in hints:
            raise RecipeError(f'--set {key}: {type(value).__name__} has no key {head!r}; known: '
                              f'{[f.name for f in fields(value)]}')
        current = getattr(value, head)
        if current is None and rest:
            inner = [t for t in typing.get_args(hints[head]) if t is not type(None)]
            current = inner[0]() if inner and is_dataclass(inner[0]) else None
        return replace(value, **{head: _set_path(current, hints[head], rest, raw, key)})
    if isinstance(value, tuple) and typing.get_origin(hint) is tuple:
        if not head.isdigit() or int(head) >= len(value):
            raise RecipeError(f'--set {key}: {head!r} is not an index below {len(value)}')
        index = int(head)
        args = typing.get_args(hint)
        item_hint = args[0] if len(args) == 2 and args[1] is Ellipsis else args[index]
        items = list(value)
        items[index] = _set_path(items[index], item_hint, rest, raw, key)
        return tuple(items)
    raise RecipeError(f'--set {key}: cannot descend into {head!r}')


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """``key=value`` strings (dotted keys, list items by index) applied and validated.

    The value is read as YAML data and typed by the field (``run.steps=5``,
    ``optim.betas=0.9,0.99``, ``data.sources.0.path=/bags/lab``).
    """
    for item in overrides:
        key, sep, raw = item.partition('=')
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f'--set {item!r}: expected key=value (e.g. run.steps=100)')
        recipe = _set_path(recipe, Recipe, key.split('.'), raw, key)
    return recipe.validate()


# -- files -----------------------------------------------------------------------------------

def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob('*.yaml'))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f'{name_or_path}.yaml'
    if not path.is_file():
        raise RecipeError(f'recipe {name_or_path} not found; give a YAML file or a shipped name '
                          f'({", ".join(shipped_recipes())})')
    return path


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, type-check, override and validate a recipe (shipped name or YAML path)."""
    import yaml

    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as exc:
        raise RecipeError(f'recipe {path} is not valid YAML: {exc}') from None
    data = {} if data is None else data
    try:
        recipe = recipe_from_dict(data)
        return apply_overrides(recipe, overrides) if overrides else recipe
    except RecipeError as exc:
        raise RecipeError(f'{path}: {exc}') from None


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML (every key, resolved values): what a run directory records."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
