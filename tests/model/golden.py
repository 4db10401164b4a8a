"""The stored golden outputs of the tiny network (``data/golden_tiny.npz``) and how to remake them.

A fixed-seed random-weight ``tiny_cd`` network (feature heads included) runs one fixed image
pair at :data:`SIZE`; of every output (the encoder tokens and each decoder output under its
official name) the file keeps a summary small enough for the repository (a few KB, float32):

- ``<name>:sample``: the values at :data:`SAMPLE_PIXELS` pixels (tokens: :data:`SAMPLE_TOKENS`
  tokens), every channel;
- ``<name>:mean``: the mean over all pixels (tokens) of every channel.

``tests/model/test_golden.py`` checks the torch forward and the ONNX Runtime export against
them, so a change of the model's maths fails even when torch and the export move together.
After an intended change of the numbers, rewrite the file and say why in the commit::

    .venv/bin/python -m tests.model.golden --write
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

import numpy as np
import torch

from ros2_sab3r.model.network import Sab3rNet, create_network
from ros2_sab3r.model.outputs import ENCODER_OUTPUT, named_outputs
from tests.model.helpers import DATA, random_images

GOLDEN = DATA / 'golden_tiny.npz'
CONFIG = 'tiny_cd'
SEED = 0
SIZE = (32, 48)  # (H, W) network input: a 2x3 patch grid
IMAGE_SEEDS = (40, 41)
# 3 x 3 pixels spread over the image (rows, columns), and 3 of the 6 tokens.
SAMPLE_PIXELS = (np.array([1, 16, 30]), np.array([2, 25, 45]))
SAMPLE_TOKENS = np.array([0, 2, 5])
# Largest |got - stored| allowed per array, relative to its largest |stored| value. Measured:
# torch with another thread count 5e-7, the ONNX Runtime export 1.6e-6; a change of the maths
# moves far more (a doubled RoPE base in the encoder: 1.6e-3 on clip_2, 1.2e-2 on desc_2).
TOLERANCE = 1e-4


def golden_network() -> Sab3rNet:
    torch.manual_seed(SEED)
    return create_network(CONFIG)


def golden_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed pair, (1, 3, H, W) float32 in [-1, 1] each."""
    return tuple(random_images(1, *SIZE, seed=s) for s in IMAGE_SEEDS)


def torch_outputs(net: Sab3rNet) -> dict[str, np.ndarray]:
    """Tokens of image 1 and every decoder output by official name, batch first, float32."""
    img1, img2 = golden_images()
    with torch.inference_mode():
        tokens = net.encode(img1).tokens
        out = named_outputs(net(img1, img2))
    named = {ENCODER_OUTPUT: tokens, **out}
    return {k: v.detach().float().numpy() for k, v in named.items()}


def summarise(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batch-first outputs -> the stored summary ('<name>:sample', '<name>:mean')."""
    summary = {}
    for name, array in named.items():
        x = np.asarray(array[0], dtype=np.float32)  # (N, C) tokens or (H, W[, C]) maps
        if name == ENCODER_OUTPUT:
            sample, flat = x[SAMPLE_TOKENS], x
        else:
            rows, cols = SAMPLE_PIXELS
            sample = x[rows[:, None], cols[None, :]]  # (3, 3[, C])
            flat = x.reshape(x.shape[0] * x.shape[1], -1)
        summary[f'{name}:sample'] = sample.astype(np.float32)
        summary[f'{name}:mean'] = flat.mean(axis=0).astype(np.float32)
    return summary


def read_golden(path: Path = GOLDEN) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def mismatches(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
               tolerance: float = TOLERANCE) -> list[str]:
    """One line per array that is missing, extra, reshaped or off by more than ``tolerance``
    of its largest stored value; empty when everything matches."""
    lines = [f'{k}: not stored' for k in sorted(set(got) - set(want))]
    lines += [f'{k}: not computed' for k in sorted(set(want) - set(got))]
    for key in sorted(set(got) & set(want)):
        g, w = got[key], want[key]
        if g.shape != w.shape:
            lines.append(f'{key}: shape {g.shape}, stored {w.shape}')
            continue
        rel = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-12)
        if not rel <= tolerance:
            lines.append(f'{key}: off by {rel:.2e} of its range (tolerance {tolerance:.0e})')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--write', action='store_true',
                        help='rewrite the stored file (after an intended change of the numbers)')
    args = parser.parse_args(argv)
    summary = summarise(torch_outputs(golden_network()))
    if args.write:
        np.savez_compressed(GOLDEN, **summary)
        print(f'wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, {len(summary)} arrays)')
        return 0
    problems = mismatches(summary, read_golden())
    print('\n'.join(problems) or f'torch matches {GOLDEN}')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
