"""numpy image/CameraInfo conversions of the ROS boundary (no message types needed)."""

import io
import tracemalloc

import numpy as np
from PIL import Image as PILImage
import pytest

from ros2_sab3r.frames.decode import (
    SUPPORTED_ENCODINGS,
    ConversionError,
    camera_info_to_K,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_image_fields,
)
from tests.ros.crafted import png_declaring

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


@pytest.mark.parametrize('size', [(12000, 12000), (20000, 20000)])
def test_compressed_image_size_is_checked_before_decoding(size):
    data = png_declaring(*size)
    assert len(data) < 2000
    tracemalloc.start()
    with pytest.raises(ConversionError, match='max_image_pixels|decompression bomb'):
        compressed_to_rgb(data, max_pixels=16_777_216)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # 12000x12000 RGB would be 432 MB


def test_compressed_images_decode_and_garbage_is_a_conversion_error():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format='PNG')
    np.testing.assert_array_equal(compressed_to_rgb(buf.getvalue(), max_pixels=48), rgb)
    with pytest.raises(ConversionError, match='max_image_pixels = 47'):
        compressed_to_rgb(buf.getvalue(), max_pixels=47)
    gif = io.BytesIO()
    PILImage.fromarray(rgb).save(gif, format='GIF')  # not a CompressedImage format
    for data in (b'', b'\xff\xd8 not a jpeg', gif.getvalue(), buf.getvalue()[:40]):
        with pytest.raises(ConversionError, match='could not be decoded'):
            compressed_to_rgb(data, max_pixels=10_000)


def test_raw_image_size_is_checked_before_decoding():
    with pytest.raises(ConversionError, match='camera.max_image_pixels'):
        image_to_rgb('rgb8', 4000, 5000, 15000, b'', max_pixels=16_777_216)
    assert image_to_rgb('mono8', 2, 3, 3, bytes(6), max_pixels=6).shape == (2, 3, 3)
