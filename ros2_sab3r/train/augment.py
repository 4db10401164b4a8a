"""Training augmentation: one resize-and-crop per view, applied to image, depth and intrinsics.

As the official recipe ('auto' random crops at the training resolution, colour jitter): each view
is resized by a scale ``s`` (at least the cover scale, times a factor drawn from
``scale_range``), then cut to the network resolution at a random (or the central) offset. The
image goes through PIL's Lanczos resize (the official resampler), the depth through nearest
sampling of the same pixel-centre mapping (never blending depths across edges), and the
intrinsics by the same affine map::

    u = (x + 0.5) * s_x - 0.5 - x0        (pixel centres at integer coordinates)
    fx' = fx * s_x,  cx' = (cx + 0.5) * s_x - 0.5 - x0          (likewise for y)

The crop is ONE array: the student and the teachers are given the same pixels (the student in
[-1, 1], the teachers in [0, 1]); colour jitter is applied to that array before either sees it.

Reproduction only (``teachers.<head>.uncropped_input``): :func:`plan_principal_crop` is our
analogue of the official reader's view (cover rescale, crop centred on the principal point), which
the official teachers saw instead of the student's random crop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropTransform:
    """Resize to ``resized`` (H, W) then cut ``size`` (H, W) at ``offset`` (y0, x0)."""

    source: tuple[int, int]  # (H, W) of the view
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(s_y, s_x): resized over source size per axis."""
        return (self.resized[0] / self.source[0], self.resized[1] / self.source[1])

    def intrinsics(self, K: np.ndarray) -> np.ndarray:
        """(3, 3) intrinsics of the crop."""
        sy, sx = self.scale
        y0, x0 = self.offset
        out = np.array(K, dtype=np.float64, copy=True)
        out[0, 0], out[0, 1] = K[0, 0] * sx, K[0, 1] * sx
        out[1, 1] = K[1, 1] * sy
        out[0, 2] = (K[0, 2] + 0.5) * sx - 0.5 - x0
        out[1, 2] = (K[1, 2] + 0.5) * sy - 0.5 - y0
        return out

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> the crop (h, w, 3) uint8 (Lanczos resize, then cut)."""
        if rgb.shape[:2] != self.source:
            raise ValueError(f'image {rgb.shape[:2]} is not the transform source {self.source}')
        resized = Image.fromarray(rgb).resize((self.resized[1], self.resized[0]),
                                              Image.Resampling.LANCZOS)
        y0, x0 = self.offset
        h, w = self.size
        return np.asarray(resized)[y0:y0 + h, x0:x0 + w].copy()

    def source_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Integer source rows (h,) and columns (w,) whose centres are nearest to the crop's."""
        sy, sx = self.scale
        y0, x0 = self.offset
        h, w = self.size
        rows = np.floor((np.arange(h) + y0 + 0.5) / sy).astype(np.int64)
        cols = np.floor((np.arange(w) + x0 + 0.5) / sx).astype(np.int64)
        return (np.clip(rows, 0, self.source[0] - 1), np.clip(cols, 0, self.source[1] - 1))

    def nearest(self, values: np.ndarray) -> np.ndarray:
        """(H, W, ...) per-pixel values (depth, masks) -> crop by nearest sampling."""
        rows, cols = self.source_pixels()
        return values[rows[:, None], cols[None, :]]


def plan_crop(source: tuple[int, int], size: tuple[int, int], scale_factor: float = 1.0,
              rng: np.random.Generator | None = None) -> CropTransform:
    """The resize+crop of a ``source`` (H, W) view to ``size`` (H, W).

    ``scale_factor`` >= 1 multiplies the cover scale (the smallest resize that covers ``size``);
    ``rng`` draws the offset (None: the centre crop).
    """
    if scale_factor < 1.0:
        raise ValueError(f'scale_factor {scale_factor} must be >= 1 (the crop must be covered)')
    (H, W), (h, w) = source, size
    s = max(h / H, w / W) * scale_factor
    resized = (max(h, int(round(H * s))), max(w, int(round(W * s))))
    room = (resized[0] - h, resized[1] - w)
    if rng is None:
        offset = (room[0] // 2, room[1] // 2)
    else:
        offset = (int(rng.integers(0, room[0] + 1)), int(rng.integers(0, room[1] + 1)))
    return CropTransform(source=tuple(source), resized=resized, offset=offset, size=tuple(size))


def plan_principal_crop(source: tuple[int, int], size: tuple[int, int],
                        K: np.ndarray | None = None) -> CropTransform:
    """The official reader's view of a ``source`` (H, W) image: cover scale, no random factor,
    a ``size`` crop centred on the principal point of ``K`` (clamped into the image; the image
    centre without ``K``). Its pixels are what the official teachers saw (see data.py)."""
    crop = plan_crop(source, size)
    if K is None:
        return crop
    sy, sx = crop.scale
    (h, w), (rh, rw) = size, crop.resized
    cx, cy = (K[0, 2] + 0.5) * sx - 0.5, (K[1, 2] + 0.5) * sy - 0.5  # in the resized image
    x0 = int(np.clip(round(cx - (w - 1) / 2), 0, rw - w))
    y0 = int(np.clip(round(cy - (h - 1) / 2), 0, rh - h))
    return replace(crop, offset=(y0, x0))


def color_jitter(rgb: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors in [1 - a, 1 + a] (torchvision's order)."""
    if amplitude <= 0:
        return rgb
    x = rgb.astype(np.float32) / 255.0
    b, c, s = rng.uniform(1 - amplitude, 1 + amplitude, 3)
    x = np.clip(x * b, 0, 1)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    x = np.clip((x - grey.mean()) * c + grey.mean(), 0, 1)
    grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = np.clip((x - grey) * s + grey, 0, 1)
    return np.round(x * 255.0).astype(np.uint8)
