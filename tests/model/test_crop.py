"""One crop definition: the backends' pixels and the pipeline's intrinsics and colours agree."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from ros2_sab3r import pipeline
from ros2_sab3r.model.preprocess import (
    fixed_crop,
    intrinsics_to_network,
    official_crop,
    prepare_fixed,
    resample_to_network,
)

pytestmark = pytest.mark.unit


def test_pipeline_uses_the_single_definition():
    assert pipeline.intrinsics_to_network is intrinsics_to_network
    assert pipeline.resample_to_network is resample_to_network


@pytest.mark.parametrize('image_hw, net_hw', [
    ((480, 640), (384, 512)), ((720, 1280), (384, 512)), ((720, 1280), (288, 512)),
    ((333, 500), (384, 512)), ((640, 480), (384, 512)), ((384, 512), (384, 512))])
def test_fixed_crop_covers_and_centres(image_hw, net_hw):
    c = fixed_crop(image_hw, net_hw)
    (H2, W2), (top, left) = c.resized_size, c.crop_offset
    assert H2 >= net_hw[0] and W2 >= net_hw[1]
    assert min(H2 - net_hw[0], W2 - net_hw[1]) <= 1  # one side fits, the other is cropped
    assert top == (H2 - net_hw[0]) // 2 and left == (W2 - net_hw[1]) // 2


@pytest.mark.parametrize('w, h', [(640, 480), (1920, 1080), (300, 200), (1000, 333)])
def test_official_crop_is_a_fixed_crop_when_the_aspect_allows(w, h):
    # Where the official long-side rule ends at an exact size, the fixed crop to that size is
    # the same geometry (so sab3r-infer and the backends see the same pixels).
    off = official_crop((h, w))
    fix = fixed_crop((h, w), off.size)
    if off.resized_size == fix.resized_size:
        assert off == fix


def test_intrinsics_follow_the_pixels():
    """A 3D point projects onto the same content in the camera image and in the network input."""
    H1, W1, net = 720, 1280, (288, 512)
    K = np.array([[900.0, 0, 640.3], [0, 910.0, 355.2], [0, 0, 1]])
    image = np.zeros((H1, W1, 3), np.uint8)
    u, v = 700, 300  # a bright 9x9 block centred here
    image[v - 4:v + 5, u - 4:u + 5] = 255
    X = np.linalg.inv(K) @ np.array([u, v, 1.0]) * 3.0
    K2 = intrinsics_to_network(K, (H1, W1), net)
    uv2 = (K2 @ X)[:2] / X[2]
    pixels = prepare_fixed(image, net).image_u8.astype(float).sum(-1)
    ys, xs = np.nonzero(pixels > 0.5 * pixels.max())
    centre = np.array([xs.mean(), ys.mean()])
    np.testing.assert_allclose(uv2, centre, atol=0.6)
    colours = resample_to_network(image, net)
    assert colours.shape == (*net, 3)
    ys, xs = np.nonzero(colours.sum(-1) > 0)
    np.testing.assert_allclose([xs.mean(), ys.mean()], centre, atol=0.6)


def test_apply_uses_pil_filters_like_the_official_loader():
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), np.uint8))
    got = prepare_fixed(img, (384, 512)).image_u8
    np.testing.assert_array_equal(got, np.asarray(img.resize((512, 384), PIL.Image.LANCZOS)))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match='empty'):
        fixed_crop((0, 10), (16, 16))
    with pytest.raises(ValueError, match='this crop is for'):
        fixed_crop((10, 10), (16, 16)).resample_nearest(np.zeros((5, 5, 3), np.uint8))
