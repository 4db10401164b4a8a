"""FeatUp's joint-bilateral upsampler stack ("jbu_stack"), our implementation, and its checkpoints.

Four learned joint-bilateral x2 stages guided by the teacher's (normalised) input image, then a
residual 1x1 fix-up scaled by 0.1: a (B, C, h, w) patch map becomes (B, C, 16h, 16w). Module
and parameter names follow FeatUp's checkpoints (``up1`` .. ``up4``, ``fixup_proj.1``), so a
FeatUp file's ``upsampler.*`` tensors load as they are. Facts: teachers_spec.md §3, §4.

Memory: the adaptive convolution is a plain 49-tap weighted sum, computed tap by tap in place,
so the 19.7 GB "unfold" of a naive implementation at 512x384 never exists; the C-channel work
(the adaptive convolution and the final C x C fix-up) runs over bands of output rows
(``chunk_pixels`` output pixels per band, ``None`` = the whole map at once), bounding its
temporaries. The 49-channel kernels are computed whole (about 0.2 GB at 512x384). Banded steps
are per pixel (element-wise products, 1x1 convolutions as per-pixel matrix products), so a banded
run gives the same numbers as an unbanded one.

Dropout: FeatUp's stages carry Dropout2d layers. In eval mode (the default, deterministic) they do
nothing. The official SAB3R trainer left them active (teachers_spec §5); putting this module in
training mode reproduces that: one channel mask per sample and layer, drawn once per forward and
shared by every band.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

RADIUS = 3
TAPS = (2 * RADIUS + 1) ** 2  # 49 taps of the 7x7 window, p = i * 7 + j
KEY_DIM = 32
GUIDANCE_CHANNELS = 3
STAGE_NAMES = ('up1', 'up2', 'up3', 'up4')
FIXUP_SCALE = 0.1  # both the per-stage kernel fix-up and the final residual fix-up
DEFAULT_CHUNK_PIXELS = 1 << 16  # output pixels per band: (C + 49 + 32) x 65536 floats at most


def _channel_dropout_mask(x: torch.Tensor, channels: int, p: float, enabled: bool
                          ) -> torch.Tensor | None:
    """Dropout2d's mask for (B, channels, 1, 1): whole channels zeroed, survivors scaled."""
    if not enabled or p <= 0.0:
        return None
    keep = torch.rand(x.shape[0], channels, 1, 1, device=x.device) >= p
    return keep.to(x.dtype) / (1.0 - p)


def _apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a per-pixel matrix product over channels (channels last): its value
    at a pixel does not depend on how many rows are computed together, unlike a conv kernel's."""
    y = F.linear(x.permute(0, 2, 3, 1), conv.weight[:, :, 0, 0], conv.bias)
    return y.permute(0, 3, 1, 2)


def _bands(rows: int, cols: int, chunk_pixels: int | None) -> list[tuple[int, int]]:
    """Row bands [y0, y1) of an output map with ``cols`` columns."""
    step = rows if chunk_pixels is None else max(1, chunk_pixels // max(cols, 1))
    return [(y0, min(rows, y0 + step)) for y0 in range(0, rows, step)]


class JointBilateralStage(nn.Module):
    """One x2 stage (FeatUp's JBULearnedRange, radius 3, 32-d learned range keys)."""

    def __init__(self) -> None:
        super().__init__()
        # Index layout as in the checkpoints: conv, GELU, Dropout2d, conv.
        self.range_temp = nn.Parameter(torch.zeros(()))  # log temperature of the range softmax
        self.range_proj = nn.Sequential(
            nn.Conv2d(GUIDANCE_CHANNELS, KEY_DIM, 1), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(KEY_DIM, KEY_DIM, 1))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(TAPS + GUIDANCE_CHANNELS, TAPS, 1), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(TAPS, TAPS, 1))
        self.sigma_spatial = nn.Parameter(torch.ones(()))

    def _spatial_kernel(self, like: torch.Tensor) -> torch.Tensor:
        t = torch.linspace(-1.0, 1.0, 2 * RADIUS + 1, dtype=like.dtype, device=like.device)
        d2 = t[:, None] ** 2 + t[None, :] ** 2  # (7, 7), offsets in units of the radius
        sp = torch.exp(-d2 / (2.0 * self.sigma_spatial.to(like.dtype) ** 2))
        return sp.reshape(1, TAPS, 1, 1)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor,
                chunk_pixels: int | None = DEFAULT_CHUNK_PIXELS) -> torch.Tensor:
        """source (B, C, h, w), guidance (B, 3, 2h, 2w) -> (B, C, 2h, 2w)."""
        b, c, h, w = source.shape
        rows, cols = 2 * h, 2 * w
        if guidance.shape[-2:] != (rows, cols):
            raise ValueError(f'JBU stage guidance is {tuple(guidance.shape[-2:])}, expected '
                             f'{(rows, cols)} (twice the source grid {(h, w)})')
        r = RADIUS
        key_drop = _channel_dropout_mask(guidance, KEY_DIM, self.range_proj[2].p, self.training)
        fix_drop = _channel_dropout_mask(guidance, TAPS, self.fixup_proj[2].p, self.training)

        keys = self.range_proj[0](guidance)
        keys = self.range_proj[3](_apply_mask(self.range_proj[1](keys), key_drop))  # (B,32,2h,2w)
        keys_pad = F.pad(keys, (r, r, r, r), mode='reflect')
        tau = torch.exp(self.range_temp.to(keys.dtype)).clamp(1e-4, 1e4)
        spatial = self._spatial_kernel(keys)  # (1, 49, 1, 1)

        # The per-pixel 7x7 kernel, on the whole map: 49 channels, small next to the C-channel
        # source, and computed whole so that banding cannot change its reductions.
        logits = torch.stack(
            [(keys_pad[:, :, i:i + rows, j:j + cols] * keys).sum(1)
             for i in range(2 * r + 1) for j in range(2 * r + 1)], dim=1)  # (B, 49, 2h, 2w)
        kernel = torch.softmax(tau * logits, dim=1) * spatial
        del logits, keys_pad
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        fix = _conv1x1(self.fixup_proj[0], torch.cat([kernel, guidance], dim=1))
        fix = _conv1x1(self.fixup_proj[3], _apply_mask(self.fixup_proj[1](fix), fix_drop))
        kernel = kernel + FIXUP_SCALE * fix  # not renormalised (as released)
        del fix

        up = F.interpolate(source, size=(rows, cols), mode='bicubic', align_corners=False)
        up_pad = F.pad(up, (r, r, r, r), mode='reflect')  # (B, C, 2h + 6, 2w + 6)
        del up
        out = source.new_zeros(b, c, rows, cols)
        # The adaptive convolution: out(c, y, x) = sum_p K_p(y, x) * up(c, y + i, x + j), tap by
        # tap in place over bands of rows (no unfold, no C-sized temporary).
        for y0, y1 in _bands(rows, cols, chunk_pixels):
            band = out[:, :, y0:y1]
            for i in range(2 * r + 1):
                for j in range(2 * r + 1):
                    p = i * (2 * r + 1) + j
                    band.addcmul_(kernel[:, p:p + 1, y0:y1],
                                  up_pad[:, :, y0 + i:y1 + i, j:j + cols])
        return out


class JBUStack(nn.Module):
    """Four x2 joint-bilateral stages and the final residual fix-up, for ``dim`` channels."""

    def __init__(self, dim: int, chunk_pixels: int | None = DEFAULT_CHUNK_PIXELS) -> None:
        super().__init__()
        if chunk_pixels is not None and chunk_pixels < 1:
            raise ValueError(f'chunk_pixels must be positive or None, got {chunk_pixels}')
        self.dim = dim
        self.chunk_pixels = chunk_pixels
        self.up1 = JointBilateralStage()
        self.up2 = JointBilateralStage()
        self.up3 = JointBilateralStage()
        self.up4 = JointBilateralStage()
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1))

    @torch.no_grad()
    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w), guidance (B, 3, Hg, Wg) -> (B, C, 16h, 16w).

        Each stage's guidance is pooled from the full guidance image (adaptive average pooling
        to the stage's output size), never from the previous stage's. Teacher use only: runs
        without autograd and updates its last map in place.
        """
        if features.shape[1] != self.dim:
            raise ValueError(f'JBU for {self.dim} channels got {features.shape[1]}')
        if min(features.shape[-2:]) < 2:
            raise ValueError(f'JBU needs a feature grid of at least 2x2 cells (images of at '
                             f'least 32 px per side), got {tuple(features.shape[-2:])}')
        x = features
        for stage in (self.up1, self.up2, self.up3, self.up4):
            g = F.adaptive_avg_pool2d(guidance, (2 * x.shape[-2], 2 * x.shape[-1]))
            x = stage(x, g, self.chunk_pixels)
        drop = _channel_dropout_mask(x, self.dim, self.fixup_proj[0].p, self.training)
        conv = self.fixup_proj[1]
        # out = x + 0.1 * conv(dropout(x)), band by band in place (a 1x1 conv reads its own band).
        for y0, y1 in _bands(x.shape[-2], x.shape[-1], self.chunk_pixels):
            band = x[:, :, y0:y1]
            band.add_(_conv1x1(conv, _apply_mask(band, drop)), alpha=FIXUP_SCALE)
        return x


# -- checkpoints -------------------------------------------------------------------------------

UPSAMPLER_PREFIX = 'upsampler.'
CHANNEL_NORM_PREFIX = 'model.1.norm.'  # FeatUp's DINOv2 file: the ChannelNorm before the JBU


class UpsamplerWeightsError(ValueError):
    """A JBU checkpoint that cannot be used: names the file and what was expected."""


def read_featup_checkpoint(path, *, trusted: bool = False) -> Mapping[str, torch.Tensor]:
    """The ``state_dict`` of a FeatUp (PyTorch Lightning) JBU checkpoint file.

    Loaded with ``weights_only=True`` unless ``trusted`` (full unpickling, for a file from a
    source you trust whose Lightning bookkeeping holds other Python objects).
    """
    path = Path(path)
    if not path.is_file():
        raise UpsamplerWeightsError(f'upsampler weights file {path} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not trusted)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        hint = ('' if trusted else '; if it is a genuine FeatUp file whose bookkeeping holds '
                'pickled objects, re-save torch.load(f)["state_dict"] as {"state_dict": ...} '
                'on a machine you trust')
        raise UpsamplerWeightsError(
            f'cannot read upsampler weights file {path} ({type(exc).__name__}: '
            f'{str(exc).splitlines()[0] if str(exc) else ""}){hint}') from None
    state = ckpt.get('state_dict') if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise UpsamplerWeightsError(
            f"upsampler weights file {path} has no 'state_dict'; expected a FeatUp JBU "
            'checkpoint such as maskclip_jbu_stack_cocostuff.ckpt or '
            'dinov2_jbu_stack_cocostuff.ckpt')
    return state


def jbu_state_dict(state: Mapping[str, torch.Tensor], dim: int, source: str
                   ) -> dict[str, torch.Tensor]:
    """The JBU stack's own tensors (``upsampler.*`` without the prefix), shapes checked.

    Everything else in a FeatUp file (downsampler, scale_net, backbone copies under
    ``model.0``, the DINO ChannelNorm) is not the upsampler's and is ignored here.
    """
    expected = {k: tuple(v.shape) for k, v in JBUStack(dim).state_dict().items()}
    found = {k[len(UPSAMPLER_PREFIX):]: v for k, v in state.items()
             if k.startswith(UPSAMPLER_PREFIX)}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise UpsamplerWeightsError(
            f'{source} is not a FeatUp JBU-stack checkpoint: {len(missing)} upsampler tensors '
            f'missing (e.g. {UPSAMPLER_PREFIX}{missing[0]}); expected the 42 '
            f"{UPSAMPLER_PREFIX}up1..up4 / fixup_proj tensors of FeatUp's jbu_stack")
    got_dim = tuple(found['fixup_proj.1.weight'].shape)
    if got_dim != expected['fixup_proj.1.weight']:
        raise UpsamplerWeightsError(
            f'{source} is a JBU for {got_dim[0]}-channel features, but this teacher has {dim} '
            f'channels ({_teacher_for_dim(dim)} needs {_file_for_dim(dim)})')
    out = {}
    for name, shape in expected.items():
        tensor = found[name]
        if tuple(tensor.shape) != shape:
            raise UpsamplerWeightsError(
                f'{source}: {UPSAMPLER_PREFIX}{name} has shape {tuple(tensor.shape)}, expected '
                f'{shape}')
        out[name] = tensor.detach().float()
    return out


def channel_norm_state_dict(state: Mapping[str, torch.Tensor], dim: int, source: str
                            ) -> dict[str, torch.Tensor]:
    """The DINO ChannelNorm (LayerNorm over channels) stored beside the JBU in FeatUp's file."""
    out = {}
    for name in ('weight', 'bias'):
        tensor = state.get(CHANNEL_NORM_PREFIX + name)
        if tensor is None:
            raise UpsamplerWeightsError(
                f'{source} has no {CHANNEL_NORM_PREFIX}{name}: the DINOv2 teacher needs the '
                "ChannelNorm of FeatUp's normed DINOv2 file (dinov2_jbu_stack_cocostuff.ckpt, "
                'not the no_norm one)')
        if tuple(tensor.shape) != (dim,):
            raise UpsamplerWeightsError(
                f'{source}: {CHANNEL_NORM_PREFIX}{name} has shape {tuple(tensor.shape)}, '
                f'expected ({dim},)')
        out[name] = tensor.detach().float()
    return out


def _teacher_for_dim(dim: int) -> str:
    return {512: 'MaskCLIP', 384: 'DINOv2 ViT-S/14'}.get(dim, f'a {dim}-channel teacher')


def _file_for_dim(dim: int) -> str:
    return {512: 'maskclip_jbu_stack_cocostuff.ckpt',
            384: 'dinov2_jbu_stack_cocostuff.ckpt'}.get(dim, f'a JBU trained on {dim} channels')


def bilinear_upsample(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``bilinear`` fallback: (B, C, h, w) -> (B, C, H, W), align_corners False."""
    return F.interpolate(features, size=size, mode='bilinear', align_corners=False)

