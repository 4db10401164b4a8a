"""Float64 numpy references of the teachers, written from teachers_spec.md alone.

Independent of ros2_sab3r.train: explicit resampling matrices, attention by hand, the JBU as
an explicit 49-tap sum. Slow but exact; used on toy sizes only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def imagenet(img01: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> normalised."""
    return (img01 - MEAN[:, None, None]) / STD[:, None, None]


def cubic_matrix(n_out: int, n_in: int, inv_scale: float, a: float = -0.75) -> np.ndarray:
    """Rows: torch's bicubic (align_corners False) with source = (dst + 0.5) * inv_scale - 0.5,
    Keys' kernel with A = -0.75, neighbour indices clamped to the border."""
    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        s = (d + 0.5) * inv_scale - 0.5
        f = math.floor(s)
        t = s - f
        for k, dist in zip(range(f - 1, f + 3), (1 + t, t, 1 - t, 2 - t)):
            m[d, min(max(k, 0), n_in - 1)] += kernel(dist)
    return m


def linear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """torch's bilinear (align_corners False, no antialias): source clamped at 0."""
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        f = min(int(math.floor(s)), n_in - 1)
        t = s - f
        m[d, f] += 1 - t
        m[d, min(f + 1, n_in - 1)] += t
    return m


def pool_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Adaptive average pooling: window [floor(i In/Out), ceil((i + 1) In/Out))."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def attention(x, qkv_w, qkv_b, out_w, out_b, heads):
    n, d = x.shape
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    hd = d // heads
    out = np.zeros((n, d))
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        out[:, sl] = (s / s.sum(-1, keepdims=True)) @ v[:, sl]
    return out @ out_w.T + out_b


def patchify(img: np.ndarray, weight: np.ndarray, bias, patch: int) -> tuple[np.ndarray, int, int]:
    """Non-overlapping patch conv: (3, H, W) -> (h*w, D) row-major."""
    h, w = img.shape[1] // patch, img.shape[2] // patch
    rows = []
    for y in range(h):
        for x in range(w):
            cell = img[:, y * patch:(y + 1) * patch, x * patch:(x + 1) * patch]
            rows.append(np.einsum('dchw,chw->d', weight, cell) + (0 if bias is None else bias))
    return np.array(rows), h, w


def position_rows(table: np.ndarray, grid: int, h: int, w: int, square: bool) -> np.ndarray:
    """The +0.1 scale-factor rule on the grid rows of a position table."""
    if h * w == grid * grid and square:
        return table
    p = table.reshape(grid, grid, -1)
    my = cubic_matrix(h, grid, grid / (h + 0.1))
    mx = cubic_matrix(w, grid, grid / (w + 0.1))
    return np.einsum('yi,xj,ijd->yxd', my, mx, p).reshape(h * w, -1)


def maskclip(sd: dict, img01: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (512, h, w): OpenAI ViT-B/16 image tower, last block value path."""
    g = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
    img = imagenet(img01)
    tokens, h, w = patchify(img, g['conv1.weight'], None, 16)
    x = np.concatenate([g['class_embedding'][None], tokens])
    pos = g['positional_embedding']
    square = img.shape[1] == img.shape[2]
    x = x + np.concatenate([pos[:1], position_rows(pos[1:], 14, h, w, square)])
    x = layer_norm(x, g['ln_pre.weight'], g['ln_pre.bias'], 1e-5)
    for i in range(12):
        p = f'transformer.resblocks.{i}.'
        y = layer_norm(x, g[p + 'ln_1.weight'], g[p + 'ln_1.bias'], 1e-5)
        if i == 11:
            v = y @ g[p + 'attn.in_proj_weight'][1536:].T + g[p + 'attn.in_proj_bias'][1536:]
            x = v @ g[p + 'attn.out_proj.weight'].T + g[p + 'attn.out_proj.bias']
            break
        x = x + attention(y, g[p + 'attn.in_proj_weight'], g[p + 'attn.in_proj_bias'],
                          g[p + 'attn.out_proj.weight'], g[p + 'attn.out_proj.bias'], 12)
        y = layer_norm(x, g[p + 'ln_2.weight'], g[p + 'ln_2.bias'], 1e-5)
        y = y @ g[p + 'mlp.c_fc.weight'].T + g[p + 'mlp.c_fc.bias']
        y = y / (1 + np.exp(-1.702 * y))  # QuickGELU
        x = x + y @ g[p + 'mlp.c_proj.weight'].T + g[p + 'mlp.c_proj.bias']
    x = layer_norm(x[1:], g['ln_post.weight'], g['ln_post.bias'], 1e-5) @ g['proj']
    return x.reshape(h, w, -1).transpose(2, 0, 1)


def dino_input(img01: np.ndarray) -> np.ndarray:
    """Normalised image resized by 14/16 (bilinear, align_corners False)."""
    img = imagenet(img01)
    hh, ww = img.shape[1] * 14 // 16, img.shape[2] * 14 // 16
    return np.einsum('yi,xj,cij->cyx', linear_matrix(hh, img.shape[1]),
                     linear_matrix(ww, img.shape[2]), img)


def dinov2(sd: dict, img01: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (384, H/16, W/16): DINOv2 ViT-S/14 after its final norm."""
    img = dino_input(img01)
    tokens, h, w = patchify(img, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], 14)
    x = np.concatenate([sd['cls_token'][0], tokens])
    pos = sd['pos_embed'][0]
    x = x + np.concatenate([pos[:1], position_rows(pos[1:], 37, h, w,
                                                   img.shape[1] == img.shape[2])])
    for i in range(12):
        p = f'blocks.{i}.'
        y = layer_norm(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        x = x + sd[p + 'ls1.gamma'] * attention(
            y, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias'], sd[p + 'attn.proj.weight'],
            sd[p + 'attn.proj.bias'], 6)
        y = layer_norm(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        y = y @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias']
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))  # exact GELU
        x = x + sd[p + 'ls2.gamma'] * (y @ sd[p + 'mlp.fc2.weight'].T + sd[p + 'mlp.fc2.bias'])
    x = layer_norm(x, sd['norm.weight'], sd['norm.bias'], 1e-6)[1:]
    return x.reshape(h, w, -1).transpose(2, 0, 1)


def channel_norm(f: np.ndarray, w, b) -> np.ndarray:
    """LayerNorm over the channels of each cell, eps 1e-5: (C, h, w)."""
    return layer_norm(f.transpose(1, 2, 0), w, b, 1e-5).transpose(2, 0, 1)


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _conv1x1(x, w, b):
    return np.einsum('oc,chw->ohw', w[:, :, 0, 0], x) + b[:, None, None]


def jbu_stage(src: np.ndarray, guide: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    """One FeatUp JBU stage: src (C, h, w), guide (3, 2h, 2w) -> (C, 2h, 2w)."""
    c, h, w = src.shape
    hh, ww = 2 * h, 2 * w

    def p(name):
        return sd[prefix + name]

    keys = _conv1x1(_gelu(_conv1x1(guide, p('range_proj.0.weight'), p('range_proj.0.bias'))),
                    p('range_proj.3.weight'), p('range_proj.3.bias'))
    kpad = np.pad(keys, ((0, 0), (3, 3), (3, 3)), mode='reflect')
    tau = min(max(math.exp(float(p('range_temp'))), 1e-4), 1e4)
    t = np.linspace(-1, 1, 7)
    sigma = float(p('sigma_spatial'))
    logits = np.zeros((49, hh, ww))
    spatial = np.zeros(49)
    for i in range(7):
        for j in range(7):
            logits[i * 7 + j] = (kpad[:, i:i + hh, j:j + ww] * keys).sum(0)
            spatial[i * 7 + j] = math.exp(-(t[i] ** 2 + t[j] ** 2) / (2 * sigma ** 2))
    z = tau * logits
    r = np.exp(z - z.max(0))
    r = r / r.sum(0)
    k = r * spatial[:, None, None]
    k = k / np.maximum(k.sum(0), 1e-7)
    fix = _conv1x1(np.concatenate([k, guide]), p('fixup_proj.0.weight'), p('fixup_proj.0.bias'))
    k = k + 0.1 * _conv1x1(_gelu(fix), p('fixup_proj.3.weight'), p('fixup_proj.3.bias'))
    up = np.einsum('yi,xj,cij->cyx', cubic_matrix(hh, h, 0.5), cubic_matrix(ww, w, 0.5), src)
    upad = np.pad(up, ((0, 0), (3, 3), (3, 3)), mode='reflect')
    out = np.zeros((c, hh, ww))
    for i in range(7):
        for j in range(7):
            out += k[i * 7 + j] * upad[:, i:i + hh, j:j + ww]
    return out


def jbu_stack(src: np.ndarray, guide: np.ndarray, sd: dict, prefix: str = '') -> np.ndarray:
    """Four stages guided by the pooled full guidance image, then x + 0.1 (W x + b)."""
    x = src
    for name in ('up1', 'up2', 'up3', 'up4'):
        hh, ww = 2 * x.shape[1], 2 * x.shape[2]
        g = np.einsum('yi,xj,cij->cyx', pool_matrix(hh, guide.shape[1]),
                      pool_matrix(ww, guide.shape[2]), guide)
        x = jbu_stage(x, g, sd, f'{prefix}{name}.')
    return x + 0.1 * _conv1x1(x, sd[prefix + 'fixup_proj.1.weight'],
                              sd[prefix + 'fixup_proj.1.bias'])
