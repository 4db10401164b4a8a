"""Decoding of image and camera-info message fields into numpy, without message types.

Both the ROS node (``ros/perception_node.py``) and the rosbag reader of the
evaluation (``eval/bag.py``, which must not import the ROS layer) decode the same
``sensor_msgs/Image`` fields, so the logic lives here once. cv_bridge is not usable (no ROS 2
wheel; the PyPI ``cv-bridge`` decodes 16UC1 wrongly and fails on numpy >= 2.3).
"""

from __future__ import annotations

import io
import math

import numpy as np

# encoding -> (channels, order of R, G, B in the pixel, or None for grey)
_ENCODINGS: dict[str, tuple[int, tuple[int, int, int] | None]] = {
    'rgb8': (3, (0, 1, 2)),
    'bgr8': (3, (2, 1, 0)),
    'rgba8': (4, (0, 1, 2)),
    'bgra8': (4, (2, 1, 0)),
    'mono8': (1, None),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)

# single-channel encodings of depth and label images -> numpy element type
_SCALAR_ENCODINGS: dict[str, str] = {
    '32FC1': 'f4', '64FC1': 'f8', '16UC1': 'u2', 'mono16': 'u2', '8UC1': 'u1', 'mono8': 'u1',
    '32SC1': 'i4', '16SC1': 'i2',
}
SCALAR_ENCODINGS = tuple(_SCALAR_ENCODINGS)


class ConversionError(ValueError):
    """A message that cannot be turned into a frame; the message says what is wrong."""


def check_image_size(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image larger than `max_pixels` (camera.max_image_pixels) before decoding it."""
    if max_pixels is not None and width * height > max_pixels:
        raise ConversionError(
            f'image of {width}x{height} = {width * height} pixels is larger than '
            f'camera.max_image_pixels = {max_pixels}; raise it for such a camera')


def image_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes | memoryview,
                 is_bigendian: int = 0, max_pixels: int | None = None) -> np.ndarray:
    """Decode the fields of a sensor_msgs/Image into a contiguous (H, W, 3) uint8 RGB array."""
    del is_bigendian  # irrelevant for 8-bit encodings, the only ones accepted
    check_image_size(width, height, max_pixels)
    if encoding not in _ENCODINGS:
        raise ConversionError(
            f'unsupported image encoding {encoding!r}; '
            f'supported: {", ".join(SUPPORTED_ENCODINGS)}')
    channels, order = _ENCODINGS[encoding]
    pixels = _pixels(encoding, height, width, step, data, channels, np.dtype(np.uint8))
    if order is None:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    return np.ascontiguousarray(pixels[:, :, list(order)])


def compressed_to_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """JPEG/PNG bytes (sensor_msgs/CompressedImage) -> (H, W, 3) uint8 RGB via Pillow.

    The size is read from the header and checked against `max_pixels` before any pixel is
    decoded: a few hundred bytes of PNG can declare 20000x20000 (1.2 GB as RGB). Pillow's own
    bomb check (an exception that is not an OSError) is turned into the same ConversionError.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(data), formats=('JPEG', 'PNG')) as img:
            check_image_size(img.width, img.height, max_pixels)
            return np.asarray(img.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            PILImage.DecompressionBombError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f'compressed image could not be decoded: {err}') from err


def image_to_scalar(encoding: str, height: int, width: int, step: int,
                    data: bytes | memoryview, is_bigendian: int = 0) -> np.ndarray:
    """Decode a single-channel image (depth, class or instance ids) into an (H, W) array."""
    if encoding not in _SCALAR_ENCODINGS:
        raise ConversionError(
            f'unsupported single-channel encoding {encoding!r}; '
            f'supported: {", ".join(SCALAR_ENCODINGS)}')
    dtype = np.dtype(_SCALAR_ENCODINGS[encoding]).newbyteorder('>' if is_bigendian else '<')
    pixels = _pixels(encoding, height, width, step, data, 1, dtype)
    return np.ascontiguousarray(pixels[:, :, 0].astype(dtype.newbyteorder('=')))


def depth_to_metres(encoding: str, depth: np.ndarray) -> np.ndarray:
    """(H, W) decoded depth -> float32 metres; 0 and non-finite become NaN (no measurement).

    REP 118: 32FC1 is metres, 16UC1 millimetres.
    """
    if encoding in ('16UC1', 'mono16'):
        out = depth.astype(np.float32) / 1000.0
    elif encoding in ('32FC1', '64FC1'):
        out = depth.astype(np.float32)
    else:
        raise ConversionError(f'depth images must be 32FC1 (m) or 16UC1 (mm), got {encoding!r}')
    out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out


def _pixels(encoding: str, height: int, width: int, step: int, data, channels: int,
            dtype: np.dtype) -> np.ndarray:
    if height <= 0 or width <= 0:
        raise ConversionError(f'empty image: {width}x{height}')
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ConversionError(
            f'step {step} is smaller than width*channels = {row_bytes} '
            f'for {encoding} {width}x{height}')
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != step * height:
        raise ConversionError(
            f'data has {buf.size} bytes but step*height = {step}*{height} = {step * height}')
    rows = buf.reshape(height, step)[:, :row_bytes]
    return np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)  # (H, W, c)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> tuple[int, int, int, bytes]:
    """Encode (H, W, 3) uint8 RGB as (height, width, step, data) of a sensor_msgs/Image."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConversionError(f'expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}')
    if encoding not in _ENCODINGS:
        raise ConversionError(f'unsupported image encoding {encoding!r}')
    channels, order = _ENCODINGS[encoding]
    h, w = rgb.shape[:2]
    if order is None:
        # ITU-R BT.601 luma, the usual definition of mono8 from RGB
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        px = np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]
    else:
        px = np.empty((h, w, channels), np.uint8)
        px[:, :, list(order)] = rgb
        if channels == 4:
            px[:, :, 3] = 255
    return h, w, w * channels, px.tobytes()


def scalar_to_image_fields(image: np.ndarray, encoding: str) -> tuple[int, int, int, bytes]:
    """Encode an (H, W) array as (height, width, step, data) in a single-channel encoding."""
    if encoding not in _SCALAR_ENCODINGS:
        raise ConversionError(f'unsupported single-channel encoding {encoding!r}')
    if image.ndim != 2:
        raise ConversionError(f'expected an (H, W) array for {encoding}, got {image.shape}')
    px = np.ascontiguousarray(image, dtype=np.dtype(_SCALAR_ENCODINGS[encoding]).newbyteorder('<'))
    h, w = px.shape
    return h, w, w * px.itemsize, px.tobytes()


def camera_info_to_K(k: np.ndarray | list[float], width: int, height: int,
                     image_shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """3x3 intrinsics from CameraInfo.k; None when the camera is uncalibrated (k all zero).

    Raises ConversionError for NaN/inf or non-positive focal lengths, and when the CameraInfo size
    does not match the image it is meant for.
    """
    K = np.asarray(k, dtype=np.float64).reshape(3, 3)
    if not np.all(K == 0.0) and not np.all(np.isfinite(K)):
        raise ConversionError(f'CameraInfo.k has non-finite values: {K.ravel().tolist()}')
    if np.all(K == 0.0):
        return None
    if K[0, 0] <= 0 or K[1, 1] <= 0 or not math.isclose(K[2, 2], 1.0):
        raise ConversionError(f'CameraInfo.k is not a pinhole matrix: {K.ravel().tolist()}')
    if image_shape is not None and width and height and (height, width) != tuple(image_shape):
        raise ConversionError(
            f'CameraInfo is for {width}x{height} but the image is '
            f'{image_shape[1]}x{image_shape[0]}')
    return K
