"""Preprocessing equals the official loader: sizes, crop, value range, EXIF, intrinsics."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from ros2_sab3r.model.preprocess import load_image, prepare_image, tensor_to_u8

pytestmark = pytest.mark.unit


def _image(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize('w, h, out_w, out_h', [
    (1920, 1080, 512, 288), (600, 600, 512, 384), (640, 480, 512, 384), (480, 640, 384, 512),
    (300, 200, 512, 336), (512, 384, 512, 384), (1000, 333, 512, 160)])
def test_output_sizes(w, h, out_w, out_h):
    prep = prepare_image(_image(w, h))
    assert prep.tensor.shape == (1, 3, out_h, out_w)
    assert prep.image_u8.shape == (out_h, out_w, 3)
    assert prep.size == (out_h, out_w)


def test_same_pixels_as_the_official_recipe():
    img = _image(1280, 720, seed=1)
    prep = prepare_image(img)
    # The recipe written out: LANCZOS to long side 512 -> 512x288, centre crop is a no-op.
    ref = np.asarray(img.resize((512, 288), PIL.Image.LANCZOS), dtype=np.float32)
    ref = (ref / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(prep.tensor[0].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-6)
    assert prep.tensor.min() >= -1.0 and prep.tensor.max() <= 1.0
    np.testing.assert_array_equal(tensor_to_u8(prep.tensor), prep.image_u8)


def test_upscaling_uses_bicubic_and_crops_centre():
    img = _image(200, 130, seed=2)  # long side 200 < 512: BICUBIC, 512x333 -> crop 512x320
    prep = prepare_image(img)
    resized = img.resize((512, round(130 * 512 / 200)), PIL.Image.BICUBIC)
    assert resized.size == (512, 333)
    cy = 333 // 2
    ref = np.asarray(resized.crop((0, cy - 160, 512, cy + 160)))
    np.testing.assert_array_equal(prep.image_u8, ref)
    assert prep.crop_offset == (cy - 160, 0)


def test_numpy_input_and_exif_orientation(tmp_path):
    arr = np.asarray(_image(640, 480, seed=3))
    from_array = prepare_image(arr)
    np.testing.assert_array_equal(from_array.image_u8, prepare_image(PIL.Image.fromarray(arr))
                                  .image_u8)
    # Stored landscape with EXIF orientation 6 (rotate 90 degrees): shown as portrait.
    path = tmp_path / 'rotated.jpg'
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(arr).save(path, exif=exif, quality=95)
    prep = load_image(path)
    assert prep.size == (512, 384)
    with pytest.raises(ValueError, match='uint8'):
        prepare_image(arr.astype(np.float32))


def test_adjust_intrinsics_maps_pixels():
    img = _image(1280, 720)
    prep = prepare_image(img)  # scale 0.4, no crop
    K = np.array([[600.0, 0, 639.5], [0, 600.0, 359.5], [0, 0, 1]])
    K2 = prep.adjust_intrinsics(K)
    np.testing.assert_allclose(K2[0, 0], 240.0)
    np.testing.assert_allclose(K2[:2, 2], [255.5, 143.5])  # centre stays the centre
    assert isinstance(prep.tensor, torch.Tensor) and prep.tensor.dtype == torch.float32
