"""Command-line tools for checking the network by hand.

``sab3r-infer``: run one pair and write the official output names to an .npz file.
``sab3r-convert-checkpoint``: turn any loadable checkpoint into our safetensors format.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import sys
import time

import numpy as np
import torch

from ros2_sab3r.model.checkpoint import CheckpointError, load_network, save_network
from ros2_sab3r.model.network import BACKBONE_DTYPES
from ros2_sab3r.model.outputs import PairOutput, named_outputs
from ros2_sab3r.model.preprocess import load_image, tensor_to_u8


def _add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True,
                        help='official MASt3R/SAB3R .pth, the SAB3R release base.pt, a '
                             'ros2_sab3r .safetensors, a directory, or a Hugging Face repo id '
                             '(optionally with a file: uva-cv-lab/SAB3R/demo_ckpt/base/base.pt)')
    parser.add_argument('--config', default=None,
                        help='architecture name or JSON file overriding the stored one (the '
                             'release file defaults to sab3r_cd)')
    parser.add_argument('--trusted', action='store_true',
                        help='allow full unpickling of a .pth you trust (can run code)')


def pair_output_arrays(out: PairOutput) -> dict[str, np.ndarray]:
    """Official output names, arrays with the batch dimension kept."""
    return {name: t.detach().float().cpu().numpy() for name, t in named_outputs(out).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='sab3r-infer', description='Run the SAB3R/MASt3R network on one image pair.')
    _add_loading_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--image1', help='first image file (needs --image2)')
    src.add_argument('--pair', help='.npz with img1, img2 as (1, 3, H, W) float32 in [-1, 1]')
    parser.add_argument('--image2', help='second image file')
    parser.add_argument('--out', required=True, help='output .npz')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtype', default='fp32', choices=tuple(BACKBONE_DTYPES),
                        help='backbone precision; heads and post-processing stay fp32')
    parser.add_argument('--long-side', type=int, default=512, help='network input long side')
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    args = parser.parse_args(argv)
    if args.image1 and not args.image2:
        parser.error('--image1 needs --image2')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        net = load_network(args.checkpoint, config=args.config, device=args.device,
                           trusted=args.trusted)
    except CheckpointError as exc:
        print(f'sab3r-infer: {exc}', file=sys.stderr)
        return 2
    if args.dtype != 'fp32':
        net.set_backbone_dtype(BACKBONE_DTYPES[args.dtype])
    if args.pair:
        with np.load(args.pair) as data:
            img1 = torch.from_numpy(np.asarray(data['img1'], dtype=np.float32))
            img2 = torch.from_numpy(np.asarray(data['img2'], dtype=np.float32))
        for name, img in (('img1', img1), ('img2', img2)):
            if img.ndim != 4 or img.shape[:2] != (1, 3):
                parser.error(f'{args.pair}: {name} must be (1, 3, H, W), got {tuple(img.shape)}')
    else:
        img1 = load_image(args.image1, long_side=args.long_side).tensor
        img2 = load_image(args.image2, long_side=args.long_side).tensor
    start = time.perf_counter()
    with torch.inference_mode():
        out = net(img1.to(args.device), img2.to(args.device))
    elapsed = time.perf_counter() - start
    arrays = pair_output_arrays(out)
    arrays['img1_u8'] = tensor_to_u8(img1)
    arrays['img2_u8'] = tensor_to_u8(img2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f'{tuple(img1.shape[2:])} + {tuple(img2.shape[2:])} on {args.device}/{args.dtype}: '
          f'{elapsed:.2f} s; wrote {args.out} ({", ".join(sorted(arrays))})')
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='sab3r-convert-checkpoint',
        description='Convert a checkpoint into the ros2_sab3r safetensors format (no pickle).')
    _add_loading_args(parser)
    parser.add_argument('--out', required=True, help='output .safetensors (a .json goes beside)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        net = load_network(args.checkpoint, config=args.config, trusted=args.trusted)
    except CheckpointError as exc:
        print(f'sab3r-convert-checkpoint: {exc}', file=sys.stderr)
        return 2
    path = save_network(net, args.out)
    print(f'wrote {path} and {path.with_suffix(".json")} ({net.cfg.name})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
