"""Image preprocessing identical to the official MASt3R loader (long side 512 by default).

Resize so the long side is ``long_side`` with PIL (LANCZOS when shrinking, BICUBIC when
enlarging), centre-crop to multiples of the patch size (a square image becomes 4:3), scale to
[-1, 1]. Portrait images stay portrait: the network runs them natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


@dataclass(frozen=True)
class PreparedImage:
    """A network-ready image and how it was obtained from the original."""

    tensor: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1], RGB
    image_u8: np.ndarray  # (H, W, 3) uint8, the pixels the network sees
    original_size: tuple[int, int]  # (H1, W1) before resizing
    resized_size: tuple[int, int]  # (H2, W2) after resizing, before cropping
    crop_offset: tuple[int, int]  # (top, left) of the crop in the resized image

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the network input."""
        return self.image_u8.shape[0], self.image_u8.shape[1]

    def adjust_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """Map intrinsics of the original image onto the network input (pixel centres at
        integer coordinates, as OpenCV)."""
        K = np.asarray(K, dtype=np.float64)
        sy = self.resized_size[0] / self.original_size[0]
        sx = self.resized_size[1] / self.original_size[1]
        top, left = self.crop_offset
        out = K.copy()
        out[0, 0] = K[0, 0] * sx
        out[0, 1] = K[0, 1] * sx
        out[1, 1] = K[1, 1] * sy
        out[0, 2] = (K[0, 2] + 0.5) * sx - 0.5 - left
        out[1, 2] = (K[1, 2] + 0.5) * sy - 0.5 - top
        return out


def prepare_image(image: PIL.Image.Image | np.ndarray, long_side: int = 512,
                  patch_size: int = 16, square_ok: bool = False) -> PreparedImage:
    """Preprocess one RGB image (PIL image or (H, W, 3) uint8 array) like the official loader."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'expected an (H, W, 3) uint8 RGB array, got {image.shape} '
                             f'{image.dtype}')
        pil = PIL.Image.fromarray(image)
    else:
        pil = image.convert('RGB')
    w1, h1 = pil.size
    s = max(w1, h1)
    # Python round (half to even) on the scaled sizes, as the official code.
    new_size = (round(w1 * long_side / s), round(h1 * long_side / s))
    resample = PIL.Image.LANCZOS if s > long_side else PIL.Image.BICUBIC
    pil = pil.resize(new_size, resample)
    w2, h2 = pil.size
    cx, cy = w2 // 2, h2 // 2
    halfw = ((2 * cx) // patch_size) * patch_size // 2
    halfh = ((2 * cy) // patch_size) * patch_size // 2
    if w2 == h2 and not square_ok:
        halfh = 3 * halfw // 4
    box = (cx - halfw, cy - halfh, cx + halfw, cy + halfh)
    pil = pil.crop(box)
    u8 = np.asarray(pil, dtype=np.uint8).copy()  # (H, W, 3)
    # ToTensor then Normalize(0.5, 0.5), in float32 exactly as the official transform.
    t = torch.from_numpy(u8).permute(2, 0, 1).float().div(255.0)
    t = ((t - 0.5) / 0.5).unsqueeze(0)  # (1, 3, H, W)
    return PreparedImage(tensor=t, image_u8=u8, original_size=(h1, w1),
                         resized_size=(h2, w2), crop_offset=(box[1], box[0]))


def load_image(path: str | Path, long_side: int = 512, patch_size: int = 16,
               square_ok: bool = False) -> PreparedImage:
    """Open an image file (EXIF orientation applied) and preprocess it."""
    with PIL.Image.open(path) as img:
        pil = PIL.ImageOps.exif_transpose(img).convert('RGB')
    return prepare_image(pil, long_side, patch_size, square_ok)


def tensor_to_u8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> (H, W, 3) uint8 (for display and saving)."""
    if img.ndim == 4:
        img = img[0]
    x = ((img.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).numpy()
