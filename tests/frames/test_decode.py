"""numpy image/CameraInfo conversions of the ROS boundary (no message types needed)."""

import numpy as np
import pytest

from ros2_sab3r.frames.decode import (
    SUPPORTED_ENCODINGS,
    ConversionError,
    camera_info_to_K,
    image_to_rgb,
    rgb_to_image_fields,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', [e for e in SUPPORTED_ENCODINGS if e != 'mono8'])
def test_colour_round_trip(rgb, encoding):
    h, w, step, data = rgb_to_image_fields(rgb, encoding)
    out = image_to_rgb(encoding, h, w, step, data)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.c_contiguous


def test_bgr_really_swaps_channels():
    px = np.array([[[10, 20, 30]]], np.uint8)  # RGB
    assert image_to_rgb('bgr8', 1, 1, 3, bytes([30, 20, 10])).tolist() == px.tolist()


def test_mono_is_replicated(rgb):
    grey = rgb[:, :, 0]
    out = image_to_rgb('mono8', 5, 7, 7, grey.tobytes())
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_row_padding_is_skipped(rgb):
    padded = np.zeros((5, 7 * 3 + 11), np.uint8)
    padded[:, :21] = rgb.reshape(5, 21)
    np.testing.assert_array_equal(image_to_rgb('rgb8', 5, 7, 32, padded.tobytes()), rgb)


@pytest.mark.parametrize('args, message', [
    (('yuv422', 2, 2, 4, bytes(8)), 'unsupported image encoding'),
    (('rgb8', 0, 0, 0, b''), 'empty image'),
    (('rgb8', 2, 2, 5, bytes(10)), 'step 5 is smaller'),
    (('rgb8', 2, 2, 6, bytes(11)), 'data has 11 bytes'),
])
def test_bad_images_raise_clear_errors(args, message):
    with pytest.raises(ConversionError, match=message):
        image_to_rgb(*args)


def test_camera_info():
    k = [500.0, 0, 320, 0, 510.0, 240, 0, 0, 1]
    np.testing.assert_array_equal(camera_info_to_K(k, 640, 480), np.reshape(k, (3, 3)))
    assert camera_info_to_K([0.0] * 9, 640, 480) is None  # uncalibrated
    with pytest.raises(ConversionError, match='non-finite'):
        camera_info_to_K([float('nan')] + k[1:], 640, 480)
    with pytest.raises(ConversionError, match='not a pinhole'):
        camera_info_to_K([-5.0] + k[1:], 640, 480)
    with pytest.raises(ConversionError, match='but the image is'):
        camera_info_to_K(k, 640, 480, image_shape=(240, 320))
