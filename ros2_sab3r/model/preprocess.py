"""Image preprocessing: the one definition of how a camera image maps onto the network input.

Two ways to choose the network input size, one geometry (:class:`NetworkCrop`) for both:

- :func:`official_crop` (the official MASt3R loader, ``sab3r-infer``): resize so the long side is
  ``long_side``, centre-crop to multiples of the patch size (a square image becomes 4:3);
- :func:`fixed_crop` (backends with a static input size, e.g. an exported 512x384 graph): resize
  so the image covers the input, centre-crop to it.

Resizing uses PIL (LANCZOS when shrinking, BICUBIC when enlarging) and values are scaled to
[-1, 1], as the official loader. The pipeline maps frame intrinsics and colours onto the network
pixels with the same :class:`NetworkCrop` (:func:`intrinsics_to_network`,
:func:`resample_to_network`), so the map and the network see the same pixels. Portrait images stay
portrait. torch is imported only where a tensor is made: the pipeline uses the geometry without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageOps

if TYPE_CHECKING:
    import torch

PATCH_SIZE = 16  # of every shipped architecture (NetworkConfig.patch_size)


def check_patch_multiple(size: tuple[int, int], patch_size: int = PATCH_SIZE,
                         what: str = 'image size') -> None:
    """ValueError unless both sides of ``size`` (H, W) are multiples of ``patch_size``: the one
    check of a network input size (network, export, backends, parameters)."""
    h, w = size
    if h % patch_size or w % patch_size:
        raise ValueError(f'{what} {h}x{w} is not a multiple of the patch size {patch_size}')


@dataclass(frozen=True)
class NetworkCrop:
    """Resize an image of ``original_size`` to ``resized_size``, then crop ``size`` at
    ``crop_offset``. All sizes are (H, W) in pixels; the offset is (top, left)."""

    original_size: tuple[int, int]  # (H1, W1) of the camera image
    resized_size: tuple[int, int]  # (H2, W2) after resizing, before cropping
    crop_offset: tuple[int, int]  # (top, left) of the crop in the resized image
    size: tuple[int, int]  # (H, W) of the network input

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

    def resample_nearest(self, image: np.ndarray) -> np.ndarray:
        """(H1, W1, C) array -> (H, W, C), nearest pixel (cheap; for colours and label images)."""
        if tuple(image.shape[:2]) != self.original_size:
            raise ValueError(f'image is {image.shape[:2]}, this crop is for {self.original_size}')
        if self.original_size == self.size:
            return image
        (H1, W1), (H2, W2) = self.original_size, self.resized_size
        top, left = self.crop_offset
        ys = ((np.arange(self.size[0]) + top + 0.5) * H1 / H2).astype(np.int64)
        xs = ((np.arange(self.size[1]) + left + 0.5) * W1 / W2).astype(np.int64)
        return image[np.clip(ys, 0, H1 - 1)[:, None], np.clip(xs, 0, W1 - 1)[None, :]]

    def apply(self, image: PIL.Image.Image) -> np.ndarray:
        """The network's pixels: PIL resize (LANCZOS shrinking, BICUBIC enlarging) then crop.

        Returns (H, W, 3) uint8."""
        if (image.height, image.width) != self.original_size:
            raise ValueError(f'image is {(image.height, image.width)}, this crop is for '
                             f'{self.original_size}')
        H2, W2 = self.resized_size
        if (H2, W2) != self.original_size:
            shrink = max(self.original_size) > max(H2, W2)
            image = image.resize((W2, H2), PIL.Image.LANCZOS if shrink else PIL.Image.BICUBIC)
        top, left = self.crop_offset
        H, W = self.size
        if (top, left, H, W) != (0, 0, H2, W2):
            image = image.crop((left, top, left + W, top + H))
        return np.asarray(image, dtype=np.uint8).copy()


def _centre_crop(original: tuple[int, int], resized: tuple[int, int], size: tuple[int, int]
                 ) -> NetworkCrop:
    (H2, W2), (H, W) = resized, size
    if H > H2 or W > W2:
        raise ValueError(f'cannot crop {size} out of {resized}')
    # Floor-centred, as the official loader's (cx - half, cy - half) with even crop sizes.
    return NetworkCrop(tuple(original), (H2, W2), ((H2 - H) // 2, (W2 - W) // 2), (H, W))


def official_crop(image_hw: tuple[int, int], long_side: int = 512, patch_size: int = PATCH_SIZE,
                  square_ok: bool = False) -> NetworkCrop:
    """The official loader's geometry: long side to ``long_side``, crop to patch multiples."""
    h1, w1 = image_hw
    s = max(w1, h1)
    # Python round (half to even) on the scaled sizes, as the official code.
    w2, h2 = round(w1 * long_side / s), round(h1 * long_side / s)
    cx, cy = w2 // 2, h2 // 2
    halfw = ((2 * cx) // patch_size) * patch_size // 2
    halfh = ((2 * cy) // patch_size) * patch_size // 2
    if w2 == h2 and not square_ok:
        halfh = 3 * halfw // 4
    return _centre_crop((h1, w1), (h2, w2), (2 * halfh, 2 * halfw))


def fixed_crop(image_hw: tuple[int, int], net_hw: tuple[int, int]) -> NetworkCrop:
    """Geometry for a static network input ``net_hw``: scale to cover it, centre crop."""
    (H1, W1), (H, W) = image_hw, net_hw
    if min(H1, W1, H, W) <= 0:
        raise ValueError(f'empty image or network size: {image_hw} -> {net_hw}')
    if (H1, W1) == (H, W):
        return NetworkCrop((H1, W1), (H, W), (0, 0), (H, W))
    scale = max(H / H1, W / W1)
    # max() guards the exact side against float error (383.99999 must stay 384).
    resized = (max(H, round(H1 * scale)), max(W, round(W1 * scale)))
    return _centre_crop((H1, W1), resized, (H, W))


def intrinsics_to_network(K: np.ndarray, image_hw: tuple[int, int], net_hw: tuple[int, int]
                          ) -> np.ndarray:
    """Intrinsics of a camera image -> intrinsics of the static network input (fixed_crop)."""
    return fixed_crop(image_hw, net_hw).adjust_intrinsics(K)


def resample_to_network(image: np.ndarray, net_hw: tuple[int, int]) -> np.ndarray:
    """(H1, W1, 3) image -> (H, W, 3) at network resolution (fixed_crop, nearest pixel)."""
    return fixed_crop(image.shape[:2], net_hw).resample_nearest(image)


@dataclass(frozen=True)
class PreparedImage:
    """A network-ready image and how it was obtained from the original."""

    tensor: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1], RGB
    image_u8: np.ndarray  # (H, W, 3) uint8, the pixels the network sees
    crop: NetworkCrop

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the network input."""
        return self.image_u8.shape[0], self.image_u8.shape[1]

    @property
    def original_size(self) -> tuple[int, int]:
        return self.crop.original_size

    @property
    def resized_size(self) -> tuple[int, int]:
        return self.crop.resized_size

    @property
    def crop_offset(self) -> tuple[int, int]:
        return self.crop.crop_offset

    def adjust_intrinsics(self, K: np.ndarray) -> np.ndarray:
        return self.crop.adjust_intrinsics(K)


def _as_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'expected an (H, W, 3) uint8 RGB array, got {image.shape} '
                             f'{image.dtype}')
        return PIL.Image.fromarray(image)
    return image.convert('RGB')


def u8_to_tensor(u8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5),
    in float32 exactly as the official transform)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1).float().div(255.0)
    return ((t - 0.5) / 0.5).unsqueeze(0)


def u8_to_array(u8: np.ndarray) -> np.ndarray:
    """The same values as :func:`u8_to_tensor` as a numpy (1, 3, H, W) float32 array (for ONNX
    Runtime and TensorRT, without torch)."""
    x = np.ascontiguousarray(u8.transpose(2, 0, 1)[None]).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def prepare_image(image: PIL.Image.Image | np.ndarray, long_side: int = 512,
                  patch_size: int = PATCH_SIZE, square_ok: bool = False) -> PreparedImage:
    """Preprocess one RGB image (PIL image or (H, W, 3) uint8 array) like the official loader."""
    pil = _as_pil(image)
    crop = official_crop((pil.height, pil.width), long_side, patch_size, square_ok)
    u8 = crop.apply(pil)
    return PreparedImage(tensor=u8_to_tensor(u8), image_u8=u8, crop=crop)


def prepare_fixed(image: PIL.Image.Image | np.ndarray, net_hw: tuple[int, int]) -> PreparedImage:
    """Preprocess one RGB image for a static network input of ``net_hw`` (H, W)."""
    pil = _as_pil(image)
    crop = fixed_crop((pil.height, pil.width), net_hw)
    u8 = crop.apply(pil)
    return PreparedImage(tensor=u8_to_tensor(u8), image_u8=u8, crop=crop)


def load_image(path: str | Path, long_side: int = 512, patch_size: int = PATCH_SIZE,
               square_ok: bool = False) -> PreparedImage:
    """Open an image file (EXIF orientation applied) and preprocess it."""
    with PIL.Image.open(path) as img:
        pil = PIL.ImageOps.exif_transpose(img).convert('RGB')
    return prepare_image(pil, long_side, patch_size, square_ok)


def tensor_to_u8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> (H, W, 3) uint8 (for display and saving)."""
    import torch

    if img.ndim == 4:
        img = img[0]
    x = ((img.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).numpy()
