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
    """DPT adapter over four token layers (hooks), output channels-last (B, H / s, W / s,
    out_channels)."""

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

    def forward(self, layers: Sequence[torch.Tensor], grid: tuple[int, int],
                stride: int = 1) -> torch.Tensor:
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
        out_hw = (h * self.patch_size // stride, w * self.patch_size // stride)
        x = _resize(self.head[0](p1), out_hw)
        x = self.head[3](self.head[2](x)).permute(0, 2, 3, 1)  # (B, H/s, W/s, last_dim)
        # The last 1x1 conv as a matmul on channels-last pixels: same weights and numbers, but
        # the wide output (512 channels for CLIP) is written once in the layout the callers
        # want, instead of NCHW (or ONNX Runtime's blocked layout) followed by a transpose.
        proj: nn.Conv2d = self.head[4]
        return F.linear(x, proj.weight.flatten(1), proj.bias)  # (B, H/s, W/s, out_channels)


def expm1(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1, accurate near 0; ONNX (opset 17) has no Expm1, so exported graphs use a
    cubic Taylor series below 0.01 (relative error < 1e-7) and exp(d) - 1 above (< 2e-5)."""
    if not torch.onnx.is_in_onnx_export():
        return torch.expm1(d)
    taylor = d * (1.0 + d * (0.5 + d / 6.0))
    return torch.where(d.abs() < 0.01, taylor, torch.exp(d) - 1.0)


def reg_dense_depth(xyz: torch.Tensor, mode: OutputMode) -> torch.Tensor:
    """Raw (..., 3) -> points; 'exp' keeps the direction and maps the norm d to expm1(d)."""
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


class PointDescHead(nn.Module):
    """MASt3R 'catmlp+dpt' head of one view: pointmap + confidence (DPT) and local descriptors +
    descriptor confidence (MLP on [encoder tokens, final decoder tokens], pixel-shuffled)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.dpt = DPT(cfg.dpt_hooks, (cfg.enc_embed_dim,) + (cfg.dec_embed_dim,) * 3, p,
                       out_channels=3 + 1, layer_dims=cfg.dpt_layer_dims,
                       feature_dim=cfg.dpt_feature_dim, last_dim=cfg.dpt_last_dim)
        in_dim = cfg.enc_embed_dim + cfg.dec_embed_dim
        self.local_channels = cfg.desc_dim + int(cfg.two_confs)
        self.head_local_features = Mlp(in_dim, int(in_dim * cfg.local_mlp_ratio),
                                       self.local_channels * p * p)

    def forward(self, layers: Sequence[torch.Tensor], grid: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return pts3d (B,H,W,3), conf (B,H,W), desc (B,H,W,D), desc_conf (B,H,W)."""
        h, w = grid
        p = self.cfg.patch_size
        dpt = self.dpt(layers, grid)  # (B, H, W, 4)
        cat = torch.cat([layers[0], layers[-1]], dim=-1)  # (B, N, enc + dec)
        local = self.head_local_features(cat)  # (B, N, c * p * p), index c*p*p + dy*p + dx
        local = local.transpose(1, 2).reshape(local.shape[0], -1, h, w)
        local = F.pixel_shuffle(local, p).permute(0, 2, 3, 1)  # (B, H, W, c)
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


class FeatureHead(nn.Module):
    """SAB3R 2D-feature head of one view (paper eq. 3-4): S = Head([H, H'])."""

    def __init__(self, cfg: NetworkConfig, head: FeatureHeadConfig) -> None:
        super().__init__()
        self.head_cfg = head
        self.patch_size = cfg.patch_size
        if head.head_type == 'dpt':
            # DPT reads the encoder tokens (hook 0) and decoder tokens (later hooks): [H, H'].
            self.dpt = DPT(cfg.dpt_hooks, (cfg.enc_embed_dim,) + (cfg.dec_embed_dim,) * 3,
                           cfg.patch_size, out_channels=head.out_dim, layer_dims=head.layer_dims,
                           feature_dim=head.feature_dim, last_dim=head.last_dim)
        else:
            in_dim = cfg.enc_embed_dim + cfg.dec_embed_dim
            up = cfg.patch_size // head.output_stride
            self.mlp = Mlp(in_dim, int(in_dim * head.mlp_ratio), head.out_dim * up * up)

    def forward(self, layers: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Return features (B, H / stride, W / stride, out_dim)."""
        h, w = grid
        stride = self.head_cfg.output_stride
        if self.head_cfg.head_type == 'dpt':
            feat = self.dpt(layers, grid, stride)  # (B, H/s, W/s, F)
        else:
            cat = torch.cat([layers[0], layers[-1]], dim=-1)  # (B, N, enc + dec)
            x = self.mlp(cat).transpose(1, 2).reshape(cat.shape[0], -1, h, w)
            x = F.pixel_shuffle(x, self.patch_size // stride)  # (B, F, H/s, W/s)
            feat = x.permute(0, 2, 3, 1)
        if self.head_cfg.postprocess == 'norm':
            feat = feat / feat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return feat
