"""Distillation teachers: MaskCLIP (CLIP targets) and DINOv2 ViT-S/14 (DINO targets), upsampled.

What the SAB3R student's CLIP and DINO heads regress, computed on the student's own crop, without
gradient, with every module in eval mode (deterministic) unless a reproduction option says
otherwise. Facts: ../shared/reference/teachers_spec.md (§0 pipeline, §1 MaskCLIP, §2 DINOv2,
§3-4 JBU and checkpoints, §5 how the official trainer ran them) and sab3r_spec.md §5.

- Input: the crop as RGB in [0, 1], (B, 3, H, W), H and W multiples of 16, then ImageNet
  normalisation (FeatUp's, not CLIP's mean/std).
- MaskCLIP: open_clip ViT-B-16 image tower (QuickGELU, OpenAI layout); blocks 0..10 as usual, block
  11 reduced to its value path (ln_1, value projection, output projection; no attention, residual
  or MLP); class token dropped; ln_post; visual projection -> (B, 512, H/16, W/16). No
  normalisation of any kind.
- DINOv2: the normalised crop resized bilinearly by 14/16 (align_corners False, no antialias) so
  the 14-px token grid equals the 16-px grid; timm ``vit_small_patch14_dinov2`` weights; final
  norm; class token dropped -> (B, 384, H/16, W/16). With the JBU: FeatUp's ChannelNorm (from the
  JBU file) before upsampling, and the resized image as guidance.
- Position tables of both backbones are resampled by FeatUp's/the DINOv2 hub's rule: bicubic with
  scale factors (g + 0.1) / G (not by size), unless the input is square at the native grid.
- Upsampler: ``jbu`` (FeatUp weights) -> (B, C, H, W); ``bilinear`` (align_corners False) to H x W;
  ``none`` leaves the patch grid.

Reproduction options (off by default; see :class:`TeacherConfig`): the official trainer left the
JBU's dropout active and showed the teachers the image before MASt3R's random crop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from ros2_sab3r.train.jbu import (
    DEFAULT_CHUNK_PIXELS,
    JBUStack,
    UpsamplerWeightsError,
    bilinear_upsample,
    channel_norm_state_dict,
    jbu_state_dict,
    read_featup_checkpoint,
)

TeacherKind = Literal['maskclip', 'dinov2']
UpsamplerKind = Literal['none', 'bilinear', 'jbu']
TEACHERS: tuple[str, ...] = ('maskclip', 'dinov2')
UPSAMPLERS: tuple[str, ...] = ('none', 'bilinear', 'jbu')

# FeatUp's ``norm``: ImageNet statistics, applied to the [0, 1] crop for both teachers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STUDENT_PATCH = 16  # the student's (and MaskCLIP's) patch; DINOv2 sees a 14/16-scaled image
POS_OFFSET = 0.1  # FeatUp / DINOv2-hub interpolation offset: scale factor (g + 0.1) / G

CLIP_MODEL = 'ViT-B-16'  # open_clip name; OpenAI layout, QuickGELU
CLIP_DIM = 512
CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_GRID = 14  # 224 / 16
DINO_MODEL = 'vit_small_patch14_dinov2'  # timm name (= torch-hub dinov2_vits14)
DINO_DIM = 384
DINO_PATCH = 14
DINO_GRID = 37  # 518 / 14
CHANNEL_NORM_EPS = 1e-5  # FeatUp's ChannelNorm (a LayerNorm over channels)


class TeacherWeightsError(ValueError):
    """A teacher weights file of the wrong model or layout: names the file and the expectation."""


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher: which backbone, its weights, the upsampler, and reproduction options.

    ``upsampler_dropout`` (reproduction only): run FeatUp's JBU with its Dropout2d layers active,
    as the official trainer did (its targets were stochastic). ``uncropped_input`` (reproduction
    only): the teacher is shown the view before MASt3R's random crop, as the official data
    pipeline did (targets not aligned with the student's pixels); see :func:`teacher_image`.
    """

    kind: TeacherKind
    weights: Path
    upsampler: UpsamplerKind = 'jbu'
    upsampler_weights: Path | None = None
    chunk_pixels: int | None = DEFAULT_CHUNK_PIXELS
    upsampler_dropout: bool = False
    uncropped_input: bool = False
    trusted_upsampler_file: bool = False  # full unpickling of the JBU file (trusted source)

    def validate(self) -> None:
        if self.kind not in TEACHERS:
            raise ValueError(f'teacher kind {self.kind!r} is not one of {TEACHERS}')
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f'upsampler {self.upsampler!r} is not one of {UPSAMPLERS}')
        if self.upsampler == 'jbu' and self.upsampler_weights is None:
            raise ValueError(f'the jbu upsampler of the {self.kind} teacher needs its FeatUp '
                             f'weights file ({_jbu_file(self.kind)})')
        if self.upsampler_dropout and self.upsampler != 'jbu':
            raise ValueError("upsampler_dropout reproduces the JBU's dropout; it needs "
                             "upsampler 'jbu'")
        if self.chunk_pixels is not None and self.chunk_pixels < 1:
            raise ValueError(f'chunk_pixels must be positive or None, got {self.chunk_pixels}')


def _jbu_file(kind: str) -> str:
    return {'maskclip': 'maskclip_jbu_stack_cocostuff.ckpt',
            'dinov2': 'dinov2_jbu_stack_cocostuff.ckpt'}[kind]


def teacher_image(crop: torch.Tensor, uncropped: torch.Tensor | None,
                  config: TeacherConfig) -> torch.Tensor:
    """The image a teacher is shown: the student's crop, or (reproduction) the uncropped view.

    Both (B, 3, H, W) in [0, 1] of the same size (the official pipeline took the teacher image
    after the resize to the training resolution, before the homography crop); the uncropped
    view is :func:`ros2_sab3r.train.data.teacher_view`.
    """
    if not config.uncropped_input:
        return crop
    if uncropped is None:
        raise ValueError('uncropped_input reproduces the official trainer and needs the view '
                         'before its random crop; the data pipeline gave none')
    if uncropped.shape != crop.shape:
        raise ValueError(f'uncropped view {tuple(uncropped.shape)} and crop '
                         f'{tuple(crop.shape)} differ in size')
    return uncropped


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised, same dtype."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def resample_position_grid(table: torch.Tensor, grid: int, size: tuple[int, int],
                           square_input: bool) -> torch.Tensor:
    """Grid rows of a position table (grid*grid, D) -> (h*w, D), row-major.

    The FeatUp / DINOv2-hub rule: the table as is when the input is square and at the native
    grid, otherwise bicubic (A = -0.75, align_corners False, no antialias) with the scale factors
    ((h + 0.1) / G, (w + 0.1) / G) used for sampling (so not equal to a resize by size).
    Computed in at least float32, whatever the weights' dtype (as the hub does).
    """
    h, w = size
    if h * w == grid * grid and square_input:
        return table
    work = torch.promote_types(table.dtype, torch.float32)
    t = table.to(work).reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t, scale_factor=((h + POS_OFFSET) / grid, (w + POS_OFFSET) / grid),
                      mode='bicubic', align_corners=False, recompute_scale_factor=False)
    if t.shape[-2:] != (h, w):  # floor(G * (g + 0.1) / G) == g; guard against rounding
        raise RuntimeError(f'position table resampled to {tuple(t.shape[-2:])}, expected {size}')
    return t.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)


def check_image_size(height: int, width: int, upsampler: str) -> None:
    """Both teachers land on the student grid only for multiples of 16; the JBU needs 2 cells."""
    if height % STUDENT_PATCH or width % STUDENT_PATCH:
        raise ValueError(f'teacher input {height}x{width} is not a multiple of 16 per side')
    low = 32 if upsampler == 'jbu' else 16
    if min(height, width) < low:
        raise ValueError(f'teacher input {height}x{width} is too small: at least {low} px per '
                         f"side{' for the jbu upsampler' if upsampler == 'jbu' else ''}")


# -- weights files -----------------------------------------------------------------------------

def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only), unwrapped and unprefixed."""
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f'{what} weights file {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: same message
        first = str(exc).splitlines()[0] if str(exc) else ''
        raise TeacherWeightsError(
            f'cannot read {what} weights file {path} ({type(exc).__name__}: {first}); expected '
            'a state dict saved with torch.save or safetensors') from None
    for key in ('state_dict', 'model'):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise TeacherWeightsError(f'{what} weights file {path} holds a {type(state).__name__}, '
                                  'not a state dict')
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key[len('module.'):] if key.startswith('module.') else key] = value
    return out


def _check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                source: Path, expectation: str, hint: str = '') -> None:
    missing = [k for k in expected if k not in state]
    if missing:
        raise TeacherWeightsError(
            f'{source} is not {expectation}: {len(missing)} of its {len(expected)} tensors '
            f'missing (e.g. {missing[0]}){hint}')
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise TeacherWeightsError(
                f'{source} is not {expectation}: {key} has shape {tuple(state[key].shape)}, '
                f'expected {shape}{hint}')


def _looks_like(state: Mapping[str, torch.Tensor]) -> str:
    if 'visual.conv1.weight' in state:
        return '; it looks like open_clip CLIP weights: use --teacher maskclip'
    if 'blocks.0.attn.qkv.weight' in state and 'patch_embed.proj.weight' in state:
        return '; it looks like timm/DINOv2 ViT weights: use --teacher dinov2'
    if any(k.startswith('upsampler.') for k in state):
        return '; it looks like a FeatUp JBU file: give it as --upsampler-weights'
    return ''


# -- backbones ---------------------------------------------------------------------------------

class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class MaskClipBackbone(nn.Module):
    """MaskCLIP on the open_clip ViT-B-16 image tower: (B, 3, H, W) -> (B, 512, H/16, W/16)."""

    dim = CLIP_DIM
    patch = STUDENT_PATCH

    def __init__(self) -> None:
        super().__init__()
        import open_clip

        # OpenAI's weights were trained with QuickGELU; open_clip's ViT-B-16 config uses GELU.
        # open_clip warns that no weights were loaded: ours are loaded next, so hide that line.
        quiet = _DropMessage('No pretrained weights loaded')
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(CLIP_MODEL, pretrained=None, force_quick_gelu=True)
        finally:
            logging.getLogger().removeFilter(quiet)
        self.visual = model.visual  # the text tower is not the teacher's
        self.visual.output_tokens = False

    @staticmethod
    def expected_shapes() -> dict[str, tuple[int, ...]]:
        """The image-tower tensors a ViT-B-16 state dict must hold (OpenAI / open_clip names)."""
        d, m = CLIP_WIDTH, 4 * CLIP_WIDTH
        shapes = {'visual.conv1.weight': (d, 3, STUDENT_PATCH, STUDENT_PATCH),
                  'visual.class_embedding': (d,),
                  'visual.positional_embedding': (CLIP_GRID * CLIP_GRID + 1, d),
                  'visual.ln_pre.weight': (d,), 'visual.ln_pre.bias': (d,)}
        for i in range(CLIP_LAYERS):
            p = f'visual.transformer.resblocks.{i}.'
            shapes |= {p + 'ln_1.weight': (d,), p + 'ln_1.bias': (d,),
                       p + 'attn.in_proj_weight': (3 * d, d), p + 'attn.in_proj_bias': (3 * d,),
                       p + 'attn.out_proj.weight': (d, d), p + 'attn.out_proj.bias': (d,),
                       p + 'ln_2.weight': (d,), p + 'ln_2.bias': (d,),
                       p + 'mlp.c_fc.weight': (m, d), p + 'mlp.c_fc.bias': (m,),
                       p + 'mlp.c_proj.weight': (d, m), p + 'mlp.c_proj.bias': (d,)}
        shapes |= {'visual.ln_post.weight': (d,), 'visual.ln_post.bias': (d,),
                   'visual.proj': (d, CLIP_DIM)}
        return shapes

    def load_weights(self, path: Path) -> None:
        """Load a full open_clip ViT-B-16 state dict (text-tower keys ignored)."""
        state = read_state_dict(path, 'MaskCLIP (open_clip ViT-B-16)')
        expectation = ('an open_clip ViT-B-16 state dict (OpenAI CLIP ViT-B/16 weights, e.g. '
                       'open_clip_model.safetensors of timm/vit_base_patch16_clip_224.openai)')
        expected = self.expected_shapes()
        _check_keys(state, expected, path, expectation, _looks_like(state))
        extra = sorted(k for k in state if k.startswith('visual.') and k not in expected)
        if extra:
            raise TeacherWeightsError(
                f'{path} is not {expectation}: its image tower has tensors ViT-B-16 lacks '
                f'(e.g. {extra[0]}), so it is another CLIP model')
        visual = {k[len('visual.'):]: state[k].float() for k in expected}
        self.visual.load_state_dict(visual, strict=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        v = self.visual
        b, _, height, width = image.shape
        x = v.conv1(image)  # (B, 768, h, w), 16-px patches, a remainder ignored
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, hw, 768), row-major
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + hw, 768)
        table = v.positional_embedding.to(x.dtype)
        grid_rows = resample_position_grid(table[1:], CLIP_GRID, (h, w), height == width)
        x = x + torch.cat([table[:1], grid_rows], dim=0)[None]
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, 'batch_first', True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        attn = last.attn
        d = x.shape[-1]
        y = last.ln_1(x)
        y = F.linear(y, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])  # values only
        y = attn.out_proj(y)  # no attention weights, no residual, no MLP
        y = v.ln_post(y[:, 1:])  # class token dropped
        y = y @ v.proj.to(y.dtype)  # (B, hw, 512)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)


class Dinov2Backbone(nn.Module):
    """DINOv2 ViT-S/14 (timm layout) on a 14/16-scaled image: -> (B, 384, H'/14, W'/14)."""

    dim = DINO_DIM
    patch = DINO_PATCH

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model(DINO_MODEL, pretrained=False, num_classes=0)
        # forward() below replaces timm's forward_features; these must be no-ops for DINOv2.
        for name in ('norm_pre', 'patch_drop', 'pos_drop'):
            module = getattr(self.vit, name, None)
            if module is not None and not isinstance(module, nn.Identity | nn.Dropout):
                raise RuntimeError(f'timm {DINO_MODEL}.{name} is {type(module).__name__}; the '
                                   'teacher expects the DINOv2 layout (update timm or this code)')

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.vit.state_dict().items()}

    def load_weights(self, path: Path) -> None:
        """Load a timm ``vit_small_patch14_dinov2`` (or torch-hub dinov2_vits14) state dict."""
        state = read_state_dict(path, 'DINOv2 ViT-S/14')
        expectation = (f'a DINOv2 ViT-S/14 state dict (timm {DINO_MODEL}.lvd142m or the torch-hub '
                       'dinov2_vits14 weights)')
        hint = _looks_like(state)
        if 'register_tokens' in state:
            hint = '; it has register tokens (dinov2_vits14_reg), which is not the teacher'
        expected = self.expected_shapes()
        _check_keys(state, expected, path, expectation, hint)
        extra = sorted(set(state) - set(expected) - {'mask_token'})  # hub-only, unused
        if extra:
            raise TeacherWeightsError(
                f'{path} is not {expectation}: unexpected tensors (e.g. {extra[0]}){hint}')
        self.vit.load_state_dict({k: state[k].float() for k in expected}, strict=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        b, _, height, width = image.shape
        if height % DINO_PATCH or width % DINO_PATCH:
            raise ValueError(f'DINOv2 input {height}x{width} is not a multiple of 14')
        x = vit.patch_embed.proj(image)  # (B, 384, h, w), conv with bias
        h, w = x.shape[-2:]
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))  # Identity for DINOv2
        cls = vit.cls_token.to(x.dtype).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        table = vit.pos_embed[0].to(x.dtype)  # (1370, 384)
        grid_rows = resample_position_grid(table[1:], DINO_GRID, (h, w), height == width)
        x = x + torch.cat([table[:1], grid_rows], dim=0)[None]
        for block in vit.blocks:
            x = block(x)
        x = vit.norm(x)  # final LayerNorm (eps 1e-6)
        return x[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2)


def dino_input(normalised: torch.Tensor) -> torch.Tensor:
    """The 14/16 resize: (B, 3, H, W) -> (B, 3, floor(14H/16), floor(14W/16)), bilinear."""
    height, width = normalised.shape[-2:]
    size = (height * DINO_PATCH // STUDENT_PATCH, width * DINO_PATCH // STUDENT_PATCH)
    return F.interpolate(normalised, size=size, mode='bilinear', align_corners=False,
                         antialias=False)


# -- the teacher -------------------------------------------------------------------------------

class Teacher(nn.Module):
    """A frozen teacher: [0, 1] crop (B, 3, H, W) -> target features, channels last.

    Output: (B, H, W, C) for ``jbu`` / ``bilinear``, (B, H/16, W/16, C) for ``none`` (the raw
    backbone features, no ChannelNorm). Always runs without gradient; stays in eval mode whatever
    ``train()`` is called with (the JBU's dropout is on only with ``upsampler_dropout``).
    """

    def __init__(self, kind: TeacherKind, upsampler: UpsamplerKind = 'jbu',
                 chunk_pixels: int | None = DEFAULT_CHUNK_PIXELS,
                 upsampler_dropout: bool = False) -> None:
        super().__init__()
        if kind not in TEACHERS:
            raise ValueError(f'teacher kind {kind!r} is not one of {TEACHERS}')
        if upsampler not in UPSAMPLERS:
            raise ValueError(f'upsampler {upsampler!r} is not one of {UPSAMPLERS}')
        self.kind = kind
        self.upsampler_kind = upsampler
        self.upsampler_dropout = upsampler_dropout
        self.backbone = MaskClipBackbone() if kind == 'maskclip' else Dinov2Backbone()
        self.dim = self.backbone.dim
        # FeatUp's ChannelNorm belongs to its DINOv2 JBU file, so only the jbu path has it.
        self.channel_norm = (nn.LayerNorm(self.dim, eps=CHANNEL_NORM_EPS)
                             if kind == 'dinov2' and upsampler == 'jbu' else None)
        self.jbu = JBUStack(self.dim, chunk_pixels) if upsampler == 'jbu' else None
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers never train: everything stays in eval mode, except the JBU's dropout when
        ``upsampler_dropout`` reproduces the official trainer."""
        super().train(False)
        if self.jbu is not None and self.upsampler_dropout:
            self.jbu.train(True)
        return self

    def load_weights(self, weights: Path, upsampler_weights: Path | None = None, *,
                     trusted_upsampler_file: bool = False) -> None:
        """Backbone weights, and for ``jbu`` FeatUp's file (its other tensors are ignored)."""
        self.backbone.load_weights(weights)
        if self.jbu is not None:
            if upsampler_weights is None:
                raise UpsamplerWeightsError(
                    f'the jbu upsampler of the {self.kind} teacher needs its FeatUp weights '
                    f'file ({_jbu_file(self.kind)})')
            self.load_upsampler_weights(upsampler_weights, trusted=trusted_upsampler_file)

    def load_upsampler_weights(self, path: Path, *, trusted: bool = False) -> None:
        """The JBU (and for DINOv2 the ChannelNorm) from a FeatUp checkpoint file."""
        if self.jbu is None:
            raise ValueError(f'the {self.upsampler_kind!r} upsampler has no weights')
        state = read_featup_checkpoint(path, trusted=trusted)
        source = f'upsampler weights file {path}'
        self.jbu.load_state_dict(jbu_state_dict(state, self.dim, source), strict=True)
        if self.channel_norm is not None:
            self.channel_norm.load_state_dict(channel_norm_state_dict(state, self.dim, source))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'teacher input must be (B, 3, H, W), got {tuple(images.shape)}')
        height, width = images.shape[-2:]
        check_image_size(height, width, self.upsampler_kind)
        with torch.no_grad():
            x = imagenet_normalise(images.to(self.dtype))
            if self.kind == 'dinov2':
                x = dino_input(x)  # the backbone's input is also the JBU's guidance
            features = self.backbone(x)  # (B, C, H/16, W/16)
            if self.upsampler_kind == 'jbu':
                if self.channel_norm is not None:
                    features = self.channel_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                features = self.jbu(features, x)
            elif self.upsampler_kind == 'bilinear':
                features = bilinear_upsample(features, (height, width))
            return features.permute(0, 2, 3, 1).contiguous()


def build_teacher(config: TeacherConfig, device: torch.device | str = 'cpu') -> Teacher:
    """A teacher with its weights loaded, on ``device``, float32, frozen."""
    config.validate()
    teacher = Teacher(config.kind, config.upsampler, config.chunk_pixels,
                      config.upsampler_dropout)
    teacher.load_weights(config.weights, config.upsampler_weights,
                         trusted_upsampler_file=config.trusted_upsampler_file)
    return teacher.to(device).train(False)
