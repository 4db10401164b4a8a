"""Transformer building blocks of the MASt3R encoder and decoder, with 2D rotary embeddings.

Everything here is written for export: positions are not data but a static patch grid known from
the input shape, so the RoPE tables are built from Python integers (constants in a traced graph),
and no operation is in-place or has a data-dependent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RopeTables:
    """cos/sin of RoPE2D for one patch grid, broadcastable over (B, heads, N, head_dim)."""

    cos: torch.Tensor  # (1, 1, N, head_dim)
    sin: torch.Tensor  # (1, 1, N, head_dim)


def rope_tables(grid: tuple[int, int], head_dim: int, base: float, device: torch.device | str,
                dtype: torch.dtype) -> RopeTables:
    """Build the RoPE2D tables of an (h, w) patch grid; tokens are row-major (n = y * w + x).

    The first half of every head is rotated by the row y, the second half by the column x, each
    with the rotate-half convention (pairs j, j + q) and frequencies base^(-j / q),
    q = head_dim / 4.
    """
    h, w = grid
    quarter = head_dim // 4
    # Angles in at least float32 whatever the token dtype: fp16 cannot hold 63 * 1.0 accurately.
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(quarter, device=device, dtype=adt) / quarter)
    ys = torch.arange(h, device=device, dtype=adt)
    xs = torch.arange(w, device=device, dtype=adt)
    ang_y = (ys[:, None] * inv_freq[None, :])[:, None, :].expand(h, w, quarter)  # (h, w, q)
    ang_x = (xs[:, None] * inv_freq[None, :])[None, :, :].expand(h, w, quarter)  # (h, w, q)
    ang = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1).reshape(1, 1, h * w, head_dim)
    return RopeTables(cos=ang.cos().to(dtype), sin=ang.sin().to(dtype))


def apply_rope(t: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate q or k, (B, heads, N, head_dim), by the tables of its own patch grid."""
    q = t.shape[-1] // 4
    # rotate-half inside each of the y and x halves: (a, b) -> (-b, a)
    rotated = torch.cat(
        [-t[..., q:2 * q], t[..., :q], -t[..., 3 * q:], t[..., 2 * q:3 * q]], dim=-1)
    return t * tables.cos + rotated * tables.sin


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as the official network
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # (B, heads, N, Dh)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, heads, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * dh)  # (B, N, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE2D on q and k; qkv laid out as [q | k | v]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, Dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Attention of x's tokens to y's tokens; q rotated by x's grid, k by y's grid."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                qrope: RopeTables, krope: RopeTables) -> torch.Tensor:
        q = apply_rope(_split_heads(self.projq(query), self.num_heads), qrope)  # (B, h, Nq, Dh)
        k = apply_rope(_split_heads(self.projk(key), self.num_heads), krope)  # (B, h, Nk, Dh)
        v = _split_heads(self.projv(value), self.num_heads)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view, MLP; all pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float,
                 norm_other: bool) -> None:
        super().__init__()
        # Registration order = official state-dict order.
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=eps) if norm_other else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, xrope: RopeTables,
                yrope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), xrope)
        y_n = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y_n, y_n, xrope, yrope)
        return x + self.mlp(self.norm3(x))
