"""Prediction heads: the MASt3R 'catmlp+dpt' head and the SAB3R 2D-feature heads.

All heads read a view's token list ``layers`` of length dec_depth + 1: index 0 is the encoder
output after enc_norm (enc_dim wide), index i the output of decoder block i (dec_dim wide), and the
last entry has dec_norm applied. Heads run in float32 whatever the backbone dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ros2_sab3r.model.arch import FeatureHeadConfig, NetworkConfig, OutputMode
from ros2_sab3r.model.layers import Mlp


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Bilinear with align_corners=True: for an exact doubling this equals scale_factor=2, and a
    # static size keeps exported graphs free of shape arithmetic.
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


class ResidualConvUnit(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU before each conv; the residual adds the un-activated input (no in-place ReLU).
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Registration order = official state-dict order.
        self.out_conv = nn.Conv2d(dim, dim, 1)
        self.resConfUnit1 = ResidualConvUnit(dim)  # noqa: N815 - official weight name
        self.resConfUnit2 = ResidualConvUnit(dim)  # noqa: N815 - official weight name

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        h, w = x.shape[-2:]
        # The official order is upsample, then out_conv. A 1x1 conv commutes with bilinear
        # resampling (both linear, interpolation weights sum to 1, so the bias passes through):
        # convolving first does the same arithmetic on a quarter of the pixels.
        return _resize(self.out_conv(x), (2 * h, 2 * w))


class Scratch(nn.Module):
    def __init__(self, layer_dims: Sequence[int], feature_dim: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(c, feature_dim, 3, padding=1, bias=False) for c in layer_dims]
        # The official network registers these four convs under two names each, so checkpoints
        # hold both 'layerK_rn' and 'layer_rn.{K-1}' for the same tensor; we do the same.
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = convs
        self.layer_rn = nn.ModuleList(convs)
        self.refinenet1 = FusionBlock(feature_dim)
        self.refinenet2 = FusionBlock(feature_dim)
        self.refinenet3 = FusionBlock(feature_dim)
        self.refinenet4 = FusionBlock(feature_dim)


class _Resample(nn.Module):
    """Placeholder at index 1 of the head so weight indices (0, 2, 4) match the official ones;
    the resampling itself is done in :meth:`DPT.forward` with a static output size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DPT(nn.Module):
    """DPT adapter over four token layers (hooks), output channels-last (B, H, W, out_channels)."""

    def __init__(self, hooks: Sequence[int], token_dims: Sequence[int], patch_size: int,
                 out_channels: int, layer_dims: Sequence[int] = (96, 192, 384, 768),
                 feature_dim: int = 256, last_dim: int = 128) -> None:
        super().__init__()
        self.hooks = tuple(hooks)
        self.patch_size = patch_size
        self.scratch = Scratch(layer_dims, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            _Resample(),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, out_channels, 1),
        )
        d0, d1, d2, d3 = layer_dims
        t0, t1, t2, t3 = token_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(t0, d0, 1), nn.ConvTranspose2d(d0, d0, 4, stride=4)),
            nn.Sequential(nn.Conv2d(t1, d1, 1), nn.ConvTranspose2d(d1, d1, 2, stride=2)),
            nn.Sequential(nn.Conv2d(t2, d2, 1)),
            nn.Sequential(nn.Conv2d(t3, d3, 1), nn.Conv2d(d3, d3, 3, stride=2, padding=1)),
        ])

    def forward(self, layers: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        maps = []
        for k, hook in enumerate(self.hooks):
            tokens = layers[hook]  # (B, N, C_k)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
            maps.append(self.scratch.layer_rn[k](self.act_postprocess[k](x)))
        # maps: (B, 256, 4h, 4w), (B, 256, 2h, 2w), (B, 256, h, w), (B, 256, ceil(h/2), ceil(w/2))
        p4 = self.scratch.refinenet4(maps[3])[:, :, :h, :w]  # crop: odd h or w
        p3 = self.scratch.refinenet3(p4, maps[2])  # (B, 256, 2h, 2w)
        p2 = self.scratch.refinenet2(p3, maps[1])  # (B, 256, 4h, 4w)
        p1 = self.scratch.refinenet1(p2, maps[0])  # (B, 256, 8h, 8w) = H/2, W/2
        out_hw = (h * self.patch_size, w * self.patch_size)
        x = _resize(self.head[0](p1), out_hw)
        x = self.head[3](self.head[2](x)).permute(0, 2, 3, 1)  # (B, H, W, last_dim)
        # The last 1x1 conv as a matmul on channels-last pixels: same weights and numbers, but
        # the wide output (512 channels for CLIP) is written once in the layout the callers
        # want, instead of NCHW (or ONNX Runtime's blocked layout) followed by a transpose.
        proj: nn.Conv2d = self.head[4]
        return F.linear(x, proj.weight.flatten(1), proj.bias)  # (B, H, W, out_channels)


def expm1(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1, accurate near 0; ONNX (opset 17) has no Expm1, so exported graphs use a
    cubic Taylor series below 0.01 (relative error < 1e-7) and exp(d) - 1 above (< 2e-5)."""
    if not torch.onnx.is_in_onnx_export():
        return torch.expm1(d)
    taylor = d * (1.0 + d * (0.5 + d / 6.0))
    return torch.where(d.abs() < 0.01, taylor, torch.exp(d) - 1.0)


def reg_dense_depth(xyz: torch.Tensor, mode: OutputMode) -> torch.Tensor:
    """Raw (..., C) -> values; 'exp' keeps the direction and maps the norm d over the last axis
    to expm1(d). The released model applies the same mapping to its CLIP and DINO features."""
    if mode.kind == 'linear':
        return xyz
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clamp(min=1e-8)
    if mode.kind == 'square':
        return direction * d.square()
    return direction * expm1(d)


def reg_dense_conf(x: torch.Tensor, mode: OutputMode) -> torch.Tensor:
    """Raw confidence -> vmin + exp(x) (clipped) or a scaled sigmoid."""
    if mode.kind == 'sigmoid':
        return (mode.vmax - mode.vmin) * torch.sigmoid(x) + mode.vmin
    e = torch.exp(x)
    if mode.vmax != float('inf'):
        e = e.clamp(max=mode.vmax - mode.vmin)
    return mode.vmin + e


def _dpt_token_dims(cfg: NetworkConfig) -> tuple[int, int, int, int]:
    # Hook 0 is the encoder output, the later hooks are decoder layers: [H, H'].
    return (cfg.enc_embed_dim,) + (cfg.dec_embed_dim,) * 3


def _pixel_shuffle_tokens(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, N, c * p * p) per-token MLP output -> (B, H, W, c); index c*p*p + dy*p + dx goes to
    channel c, pixel (p*y + dy, p*x + dx)."""
    h, w = grid
    x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return F.pixel_shuffle(x, p).permute(0, 2, 3, 1)


class DPTFeatureHead(DPT):
    """SAB3R 'dpt' feature head: the point DPT's layout with ``out_dim`` output channels.

    Its parameters sit directly under the head's name (``clip_head.scratch...``, no extra level).
    """

    def __init__(self, cfg: NetworkConfig, head: FeatureHeadConfig) -> None:
        super().__init__(cfg.dpt_hooks, _dpt_token_dims(cfg), cfg.patch_size,
                         out_channels=head.out_dim, layer_dims=head.layer_dims,
                         feature_dim=head.feature_dim, last_dim=head.last_dim)


class LinearFeatureHead(Mlp):
    """SAB3R 'linear' feature head: an MLP on [encoder tokens, final decoder tokens] (hidden width
    1 x (enc + dec), exact GELU) whose out_dim * p * p outputs are pixel-shuffled per token."""

    def __init__(self, cfg: NetworkConfig, head: FeatureHeadConfig) -> None:
        in_dim = cfg.enc_embed_dim + cfg.dec_embed_dim
        super().__init__(in_dim, in_dim, head.out_dim * cfg.patch_size ** 2)
        self.patch_size = cfg.patch_size

    def forward(self, layers: Sequence[torch.Tensor],  # type: ignore[override]
                grid: tuple[int, int]) -> torch.Tensor:
        cat = torch.cat([layers[0], layers[-1]], dim=-1)  # (B, N, enc + dec)
        return _pixel_shuffle_tokens(super().forward(cat), grid, self.patch_size)  # (B,H,W,F)


FEATURE_HEAD_CLASSES = {'dpt': DPTFeatureHead, 'linear': LinearFeatureHead}


class DownstreamHead(nn.Module):
    """Everything one view predicts, under the official names and registration order:
    ``dpt`` (pointmap + confidence), ``head_local_features`` (descriptors + descriptor
    confidence), then the SAB3R feature heads ``clip_head`` and ``dino_head`` when configured."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.dpt = DPT(cfg.dpt_hooks, _dpt_token_dims(cfg), p, out_channels=3 + 1,
                       layer_dims=cfg.dpt_layer_dims, feature_dim=cfg.dpt_feature_dim,
                       last_dim=cfg.dpt_last_dim)
        in_dim = cfg.enc_embed_dim + cfg.dec_embed_dim
        self.local_channels = cfg.desc_dim + int(cfg.two_confs)
        self.head_local_features = Mlp(in_dim, int(in_dim * cfg.local_mlp_ratio),
                                       self.local_channels * p * p)
        for head in cfg.feature_heads:
            self.add_module(f'{head.name}_head', FEATURE_HEAD_CLASSES[head.head_type](cfg, head))

    def geometry(self, layers: Sequence[torch.Tensor], grid: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return pts3d (B,H,W,3), conf (B,H,W), desc (B,H,W,D), desc_conf (B,H,W)."""
        dpt = self.dpt(layers, grid)  # (B, H, W, 4)
        cat = torch.cat([layers[0], layers[-1]], dim=-1)  # (B, N, enc + dec)
        local = _pixel_shuffle_tokens(self.head_local_features(cat), grid,
                                      self.cfg.patch_size)  # (B, H, W, c)
        out = torch.cat([dpt, local], dim=-1)  # (B, H, W, 4 + c)
        pts3d = reg_dense_depth(out[..., 0:3], self.cfg.depth_mode)
        conf = reg_dense_conf(out[..., 3], self.cfg.conf_mode)
        d = self.cfg.desc_dim
        desc_raw = out[..., 4:4 + d]
        desc = desc_raw / desc_raw.norm(dim=-1, keepdim=True)  # official: no epsilon
        if self.cfg.two_confs:
            desc_conf = reg_dense_conf(out[..., 4 + d], self.cfg.desc_conf_mode)
        else:
            desc_conf = conf
        return pts3d, conf, desc, desc_conf

    def feature(self, name: str, layers: Sequence[torch.Tensor], grid: tuple[int, int]
                ) -> torch.Tensor:
        """Post-processed features of head ``name``: (B, H, W, out_dim), float32."""
        head = self.cfg.feature_head(name)
        if head is None:
            raise KeyError(f'{self.cfg.name} has no {name} head')
        raw = getattr(self, f'{name}_head')(layers, grid)  # (B, H, W, out_dim)
        return reg_dense_depth(raw, head.mode)
