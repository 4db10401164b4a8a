"""ROS message <-> numpy conversions at the node boundary.

cv_bridge is not usable here (no ROS 2 wheel; the PyPI ``cv-bridge`` decodes 16UC1 wrongly and
fails on numpy >= 2.3), and ``sensor_msgs_py`` is not published as a wheel either, so images,
camera info and point clouds are converted with our own numpy code, covered by round-trip tests.
The functions on raw fields (``image_to_rgb``) carry the logic and need no message types.
"""

from __future__ import annotations

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


class ConversionError(ValueError):
    """A message that cannot be turned into a frame; the message says what is wrong."""


def image_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes | memoryview,
                 is_bigendian: int = 0) -> np.ndarray:
    """Decode the fields of a sensor_msgs/Image into a contiguous (H, W, 3) uint8 RGB array."""
    del is_bigendian  # irrelevant for 8-bit encodings, the only ones accepted
    if encoding not in _ENCODINGS:
        raise ConversionError(
            f'unsupported image encoding {encoding!r}; '
            f'supported: {", ".join(SUPPORTED_ENCODINGS)}')
    channels, order = _ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ConversionError(f'empty image: {width}x{height}')
    row_bytes = width * channels
    if step < row_bytes:
        raise ConversionError(
            f'step {step} is smaller than width*channels = {row_bytes} '
            f'for {encoding} {width}x{height}')
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != step * height:
        raise ConversionError(
            f'data has {buf.size} bytes but step*height = {step}*{height} = {step * height}')
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)  # (H, W, c)
    if order is None:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    return np.ascontiguousarray(pixels[:, :, list(order)])


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
