"""sab3r-teacher: write one teacher's features for an image, to see what the student is taught.

    sab3r-teacher IMAGE --teacher maskclip|dinov2 --weights W [--upsampler none|bilinear|jbu]
                  [--upsampler-weights U] [--size HxW] --out OUT.npz

OUT.npz holds ``features``, float32: (h, w, C) on the teacher's patch grid (h, w = H/16, W/16)
for ``--upsampler none`` (the raw backbone features; no ChannelNorm), (H, W, C) otherwise
(``bilinear``: align_corners False; ``jbu``: FeatUp's weights U and, for DINOv2, U's
ChannelNorm). C = 512 (MaskCLIP) or 384 (DINOv2). Modules in eval mode: deterministic.

W: a full open_clip ViT-B-16 state dict (OpenAI weights; the text tower's keys are ignored) or a
timm ``vit_small_patch14_dinov2`` state dict. U: a FeatUp JBU checkpoint (Lightning-style dict;
only its ``upsampler.*`` tensors, and ``model.1.norm.*`` for DINOv2, are used).

Image size: ``--size HxW`` scales the image to cover H x W and crops the centre (an image already
H x W is used as is); without it the image's own size is used. H and W must be multiples of 16
(at least 32 for jbu).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import re
import sys
import time

import numpy as np
import torch

from ros2_sab3r.train.jbu import UpsamplerWeightsError
from ros2_sab3r.train.teachers import (
    TEACHERS,
    UPSAMPLERS,
    TeacherConfig,
    TeacherWeightsError,
    build_teacher,
    check_image_size,
)

PROG = 'sab3r-teacher'
logger = logging.getLogger(__name__)


class TeacherCliError(ValueError):
    """Bad input of sab3r-teacher (reported in one line, exit status 2)."""


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
    if not match:
        raise TeacherCliError(f'--size {text!r} is not HxW (e.g. 384x512)')
    return int(match.group(1)), int(match.group(2))


def load_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8 (H, W, 3): as is, or scaled to cover ``size`` and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise TeacherCliError(f'image {path} does not exist')
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')
            img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise TeacherCliError(f'cannot read image {path} ({exc})') from None
    if size is not None and (img.height, img.width) != size:
        height, width = size
        scale = max(height / img.height, width / img.width)
        new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        # Shrinking with Lanczos, enlarging with bicubic, as the training data are prepared.
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize(new, method)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return np.array(img, dtype=np.uint8)  # writable (torch.from_numpy)


def teacher_features(image: np.ndarray, config: TeacherConfig,
                     device: str = 'cpu') -> np.ndarray:
    """One image (H, W, 3) uint8 -> features float32, channels last (see the module doc)."""
    check_image_size(image.shape[0], image.shape[1], config.upsampler)
    teacher = build_teacher(config, device)
    x = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy
    x = x.permute(2, 0, 1)[None].float().div(255.0).to(device)
    return teacher(x)[0].float().cpu().numpy()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description='Write the features a SAB3R distillation teacher computes for '
        'an image (what the student is taught).')
    p.add_argument('image', type=Path, help='input image (any format Pillow reads)')
    p.add_argument('--teacher', required=True, choices=TEACHERS,
                   help='maskclip (CLIP targets, 512-d) or dinov2 (DINO targets, 384-d)')
    p.add_argument('--weights', required=True, type=Path,
                   help='backbone state dict: open_clip ViT-B-16 (OpenAI) or timm '
                   'vit_small_patch14_dinov2')
    p.add_argument('--upsampler', choices=UPSAMPLERS, default='jbu',
                   help='jbu (FeatUp weights, the training targets; default), bilinear, or '
                   'none (the patch grid)')
    p.add_argument('--upsampler-weights', type=Path,
                   help='FeatUp JBU checkpoint for --upsampler jbu (e.g. '
                   'maskclip_jbu_stack_cocostuff.ckpt / dinov2_jbu_stack_cocostuff.ckpt)')
    p.add_argument('--size', help='HxW: scale to cover and centre-crop (multiples of 16)')
    p.add_argument('--out', required=True, type=Path, help='output .npz (key "features")')
    p.add_argument('--device', default='cpu', help='torch device (default cpu)')
    return p


def _run(args: argparse.Namespace) -> Path:
    size = parse_size(args.size) if args.size is not None else None
    if size is not None:
        try:
            check_image_size(*size, args.upsampler)
        except ValueError as exc:
            raise TeacherCliError(f'--size {args.size}: {exc}') from None
    if args.upsampler == 'jbu' and args.upsampler_weights is None:
        raise TeacherCliError(
            f"--upsampler jbu (the default) needs --upsampler-weights, FeatUp's "
            f"{'maskclip' if args.teacher == 'maskclip' else 'dinov2'}_jbu_stack_cocostuff.ckpt;"
            ' or choose --upsampler bilinear|none')
    if not args.weights.is_file():
        raise TeacherCliError(f'--weights {args.weights} does not exist')
    if args.upsampler_weights is not None and not args.upsampler_weights.is_file():
        raise TeacherCliError(f'--upsampler-weights {args.upsampler_weights} does not exist')
    image = load_image(args.image, size)
    try:
        check_image_size(image.shape[0], image.shape[1], args.upsampler)
    except ValueError as exc:
        raise TeacherCliError(f'image {args.image}: {exc}; pass --size HxW (e.g. 384x512)'
                              ) from None
    config = TeacherConfig(kind=args.teacher, weights=args.weights, upsampler=args.upsampler,
                           upsampler_weights=(args.upsampler_weights
                                              if args.upsampler == 'jbu' else None))
    start = time.perf_counter()
    features = teacher_features(image, config, args.device)
    logger.info('%s + %s on %dx%d: features %s in %.1f s', args.teacher, args.upsampler,
                image.shape[0], image.shape[1], 'x'.join(map(str, features.shape)),
                time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + '.partial')
    with open(tmp, 'wb') as f:
        np.savez(f, features=features.astype(np.float32))
    tmp.replace(args.out)
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        out = _run(args)
    except (TeacherCliError, TeacherWeightsError, UpsamplerWeightsError) as exc:
        print(f'{PROG}: error: {exc}', file=sys.stderr)
        return 2
    logger.info('wrote %s', out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
