"""The SAB3R network: MASt3R's AsymmetricMASt3R (Siamese ViT encoder with RoPE2D, two cross-
attending decoders, 'catmlp+dpt' heads) plus optional CLIP/DINO feature heads.

Staged use, matching the two exported graphs (encoder; decoder + heads)::

    a, b = net.encode(img_a), net.encode(img_b)   # once per frame
    out = net.decode(a, b)                        # per ordered pair -> PairOutput

``net(img1, img2)`` is the same computation with both images in one encoder batch.
Module and parameter names equal the official ones, so official state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging

import torch
from torch import nn

from ros2_sab3r.model.arch import NetworkConfig
from ros2_sab3r.model.heads import DownstreamHead
from ros2_sab3r.model.layers import DecoderBlock, EncoderBlock, rope_tables
from ros2_sab3r.model.outputs import (
    DECODER_INPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    VIEWS,
    EncodedImage,
    PairOutput,
    ViewOutput,
    ViewTokens,
    feature_input_name,
    named_outputs,
    output_name,
    output_names,
)
from ros2_sab3r.model.preprocess import check_patch_multiple

logger = logging.getLogger(__name__)

# Backbone precisions by the names used in parameters and on command lines (model.dtype).
BACKBONE_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}

BACKBONE_MODULES = ('patch_embed', 'enc_blocks', 'enc_norm', 'decoder_embed', 'dec_blocks',
                    'dec_norm', 'dec_blocks2')


class PatchEmbed(nn.Module):
    """Plain 16x16 patch projection (the official inference path; no norm, no position table)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.proj(img)  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), n = y * w + x


class Sab3rNet(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.enc_embed_dim, cfg.dec_embed_dim
        # Unused at inference (a CroCo pre-training leftover) but part of official checkpoints.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.patch_embed = PatchEmbed(cfg.patch_size, enc)
        self.enc_blocks = nn.ModuleList([
            EncoderBlock(enc, cfg.enc_num_heads, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.enc_depth)])
        self.enc_norm = nn.LayerNorm(enc, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.dec_blocks = nn.ModuleList([self._decoder_block() for _ in range(cfg.dec_depth)])
        self.dec_norm = nn.LayerNorm(dec, eps=cfg.norm_eps)  # shared by both views
        self.dec_blocks2 = nn.ModuleList([self._decoder_block() for _ in range(cfg.dec_depth)])
        # Each view's head holds its point/descriptor parts and its own CLIP/DINO heads.
        self.downstream_head1 = DownstreamHead(cfg)
        self.downstream_head2 = DownstreamHead(cfg)
        self.reset_parameters()

    def _decoder_block(self) -> DecoderBlock:
        c = self.cfg
        return DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio, c.norm_eps,
                            c.norm_im2_in_dec)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official-style initialisation (xavier linears, zero biases); relevant only for random
        weights, which must still give finite outputs through the exp post-processing."""
        if self.mask_token.device.type == 'meta':
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def set_backbone_dtype(self, dtype: torch.dtype) -> Sab3rNet:
        """Run encoder and decoders in ``dtype`` (fp16/bf16); heads stay float32."""
        for name in BACKBONE_MODULES:
            getattr(self, name).to(dtype)
        return self

    def heads(self) -> list[DownstreamHead]:
        """The prediction heads of view 1 and view 2 (each with its feature heads)."""
        return [self.downstream_head1, self.downstream_head2]

    # ---------------------------------------------------------------- stages
    def encode(self, img: torch.Tensor) -> EncodedImage:
        """Encode images (B, 3, H, W) in [-1, 1], H and W multiples of the patch size."""
        tracing = torch.jit.is_tracing()
        if not tracing and (img.ndim != 4 or img.shape[1] != 3):
            raise ValueError(f'encode expects (B, 3, H, W) images, got {tuple(img.shape)}')
        # Image sizes are static by design (ints, constants in an exported graph).
        big_h, big_w = int(img.shape[2]), int(img.shape[3])
        p = self.cfg.patch_size
        check_patch_multiple((big_h, big_w), p)
        grid = (big_h // p, big_w // p)
        x = self.patch_embed(img.to(self.backbone_dtype))  # (B, N, enc)
        rope = rope_tables(grid, self.cfg.enc_head_dim, self.cfg.rope_base, x.device, x.dtype)
        for block in self.enc_blocks:
            x = block(x, rope)
        return EncodedImage(tokens=self.enc_norm(x), grid=grid, image_size=(big_h, big_w))

    def decode_tokens(self, a: EncodedImage, b: EncodedImage) -> tuple[ViewTokens, ViewTokens]:
        """Run both decoders; view 1 (a) uses dec_blocks, view 2 (b) dec_blocks2."""
        if not torch.jit.is_tracing() and a.tokens.shape[0] != b.tokens.shape[0]:
            raise ValueError(
                f'batch sizes differ: {a.tokens.shape[0]} and {b.tokens.shape[0]}')
        c = self.cfg
        dtype = self.backbone_dtype
        ta, tb = a.tokens.to(dtype), b.tokens.to(dtype)
        rope_a = rope_tables(a.grid, c.dec_head_dim, c.rope_base, ta.device, dtype)
        rope_b = rope_tables(b.grid, c.dec_head_dim, c.rope_base, tb.device, dtype)
        f1, f2 = self.decoder_embed(ta), self.decoder_embed(tb)  # (B, N, dec)
        layers1, layers2 = [ta], [tb]
        for block1, block2 in zip(self.dec_blocks, self.dec_blocks2):
            # Both branches read the previous layer's pair (simultaneous update).
            f1, f2 = block1(f1, f2, rope_a, rope_b), block2(f2, f1, rope_b, rope_a)
            layers1.append(f1)
            layers2.append(f2)
        layers1[-1] = self.dec_norm(layers1[-1])
        layers2[-1] = self.dec_norm(layers2[-1])
        return (ViewTokens(tuple(layers1), a.grid, a.image_size),
                ViewTokens(tuple(layers2), b.grid, b.image_size))

    def _view_head(self, view: int) -> DownstreamHead:
        if view not in VIEWS:
            raise ValueError(f'view must be 1 or 2, got {view}')
        return self.heads()[view - 1]

    def run_geometry(self, tokens: ViewTokens, view: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Geometry heads of view 1 or 2, float32: pts3d, conf, desc, desc_conf."""
        head = self._view_head(view)
        return head.geometry(tuple(t.float() for t in tokens.layers), tokens.grid)

    def run_features(self, tokens: ViewTokens, view: int) -> dict[str, torch.Tensor]:
        """Feature heads (CLIP, DINO) of view 1 or 2, float32, by head name."""
        head = self._view_head(view)
        layers = tuple(t.float() for t in tokens.layers)
        return {fh.name: head.feature(fh.name, layers, tokens.grid)
                for fh in self.cfg.feature_heads}

    def run_heads(self, tokens: ViewTokens, view: int, features: bool = True) -> ViewOutput:
        """Heads of view 1 or 2 on that view's token list, in float32; ``features=False``
        leaves the feature heads out (their fields None)."""
        pts3d, conf, desc, desc_conf = self.run_geometry(tokens, view)
        named = self.run_features(tokens, view) if features else {}
        return ViewOutput(pts3d=pts3d, conf=conf, desc=desc, desc_conf=desc_conf, **named)

    def decode(self, a: EncodedImage, b: EncodedImage,
               features: Sequence[int] = VIEWS) -> PairOutput:
        """Decoder + heads of the ordered pair (a, b); view 2's points are in view 1's frame.
        The feature heads run only for the views in ``features`` (geometry always)."""
        t1, t2 = self.decode_tokens(a, b)
        return PairOutput(view1=self.run_heads(t1, 1, 1 in features),
                          view2=self.run_heads(t2, 2, 2 in features))

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> PairOutput:
        if img1.shape == img2.shape:
            # One encoder batch for both views (Siamese): same numbers, better throughput.
            both = self.encode(torch.cat([img1, img2], dim=0))
            n = img1.shape[0]
            a = EncodedImage(both.tokens[:n], both.grid, both.image_size)
            b = EncodedImage(both.tokens[n:], both.grid, both.image_size)
        else:
            a, b = self.encode(img1), self.encode(img2)
        return self.decode(a, b)


class EncoderGraph(nn.Module):
    """Export wrapper: images (B, 3, H, W) -> encoder tokens (B, N, enc_dim)."""

    input_names = (ENCODER_INPUT,)
    output_names = (ENCODER_OUTPUT,)

    def __init__(self, net: Sab3rNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net.encode(img).tokens


class DecoderGraph(nn.Module):
    """Export wrapper: (tokens1, tokens2) -> flat tuple of per-view outputs, in
    :attr:`output_names` order. Image sizes are fixed at construction (static shapes), and so
    are the views whose feature heads run (``features``, default both)."""

    input_names = DECODER_INPUTS

    def __init__(self, net: Sab3rNet, image_size1: tuple[int, int],
                 image_size2: tuple[int, int] | None = None,
                 features: Sequence[int] = VIEWS) -> None:
        super().__init__()
        self.net = net
        p = net.cfg.patch_size
        self.image_size1 = tuple(image_size1)
        self.image_size2 = tuple(image_size2 or image_size1)
        self.grid1 = (self.image_size1[0] // p, self.image_size1[1] // p)
        self.grid2 = (self.image_size2[0] // p, self.image_size2[1] // p)
        self.features = tuple(features)  # views whose feature heads run
        self.output_names = output_names([h.name for h in net.cfg.feature_heads],
                                         self.features)

    def forward(self, tokens1: torch.Tensor, tokens2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net.decode(EncodedImage(tokens1, self.grid1, self.image_size1),
                              EncodedImage(tokens2, self.grid2, self.image_size2),
                              self.features)
        named = named_outputs(out)
        return tuple(named[name] for name in self.output_names)


def feature_layers(cfg: NetworkConfig) -> tuple[int, ...]:
    """Indices into a view's (dec_depth + 1) token list that its feature heads read: the DPT
    hooks ('dpt' heads), the encoder output and the last decoder layer ('linear' heads)."""
    used: set[int] = set()
    for head in cfg.feature_heads:
        used |= set(cfg.dpt_hooks) if head.head_type == 'dpt' else {0, cfg.dec_depth}
    return tuple(sorted(used))


class GeometryGraph(DecoderGraph):
    """Split export, part 1: (tokens1, tokens2) -> both views' geometry outputs, then the token
    layers their feature heads read (:func:`feature_layers`, per view, float32), named by
    :func:`~ros2_sab3r.model.outputs.feature_input_name`."""

    def __init__(self, net: Sab3rNet, image_size: tuple[int, int]) -> None:
        super().__init__(net, image_size, features=())
        self.layers = feature_layers(net.cfg) if net.cfg.feature_heads else ()
        self.geometry_names = self.output_names
        self.output_names = (*self.geometry_names, *(
            feature_input_name(i, v) for v in VIEWS for i in self.layers))

    def forward(self, tokens1: torch.Tensor, tokens2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        views = self.net.decode_tokens(EncodedImage(tokens1, self.grid1, self.image_size1),
                                       EncodedImage(tokens2, self.grid2, self.image_size2))
        geometry = [t for v, tokens in zip(VIEWS, views)
                    for t in self.net.run_geometry(tokens, v)]
        hooks = [tokens.layers[i].float() for tokens in views for i in self.layers]
        return (*geometry, *hooks)


class FeatureGraph(nn.Module):
    """Split export, part 2: the feature heads of one view on its token layers (inputs named
    by :func:`~ros2_sab3r.model.outputs.feature_input_name`) -> that view's feature outputs."""

    def __init__(self, net: Sab3rNet, image_size: tuple[int, int], view: int) -> None:
        super().__init__()
        self.net = net
        self.view = view
        p = net.cfg.patch_size
        self.grid = (image_size[0] // p, image_size[1] // p)
        self.layers = feature_layers(net.cfg)
        self.input_names = tuple(feature_input_name(i, view) for i in self.layers)
        self.output_names = tuple(output_name(h.name, view) for h in net.cfg.feature_heads)

    def forward(self, *layers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full: list[torch.Tensor | None] = [None] * (self.net.cfg.dec_depth + 1)
        for i, t in zip(self.layers, layers):
            full[i] = t
        head = self.net.heads()[self.view - 1]
        return tuple(head.feature(h.name, full, self.grid) for h in self.net.cfg.feature_heads)


def create_network(cfg: NetworkConfig | str, device: torch.device | str = 'cpu') -> Sab3rNet:
    """Build a network from a config or a shipped config name, randomly initialised, in eval mode.

    ``device='meta'`` builds it without allocating weights (shape checks, deferred loading).
    """
    if isinstance(cfg, str):
        from ros2_sab3r.model.arch import load_config
        cfg = load_config(cfg)
    with torch.device(device):
        net = Sab3rNet(cfg)
    return net.eval()
