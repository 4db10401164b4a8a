"""Training pairs: ground truth from a synthetic bag, crops aligned with their intrinsics,
correspondences that reproject, deterministic and symmetric sampling."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ros2_sab3r.eval.bag import GroundTruthBagWriter
from ros2_sab3r.sim.synthetic import make_scene
from ros2_sab3r.train.augment import plan_crop
from ros2_sab3r.train.data import (
    DataError,
    PairDataset,
    View,
    collate,
    load_source,
    make_pair,
    select_pairs,
    teacher_view,
)
from ros2_sab3r.train.recipe import DataSection, DataSource

pytestmark = pytest.mark.train

SRC_HW = (72, 64)
NET_HW = (48, 64)


@pytest.fixture(scope='module')
def scene_bag(tmp_path_factory):
    """A bag written from 8 rendered frames (depth, K, /gt/pose), and the frames themselves."""
    frames = make_scene(0).sequence(8, width=SRC_HW[1], height=SRC_HW[0])
    path = tmp_path_factory.mktemp('bags') / 'scene0'
    with GroundTruthBagWriter(path) as writer:
        for f in frames:
            writer.write_frame(f.stamp_ns, f.rgb, f.K, f.depth, T_WC=f.T_WC)
    return path, frames


def _data(**kw) -> DataSection:
    base = DataSection(sources=(DataSource(),), resolution=NET_HW, scale_range=(1.0, 1.0),
                       correspondences=256, min_overlap=0.05)
    return replace(base, **kw)


def _in_view1(frame1, frame2):
    """World points of frame 2's pixels expressed in frame 1's camera (independent of train/)."""
    P = frame2.points_world().astype(np.float64)
    T_C1W = np.linalg.inv(frame1.T_WC)
    return P @ T_C1W[:3, :3].T + T_C1W[:3, 3]


def test_bag_pairs_hold_the_backprojected_ground_truth(scene_bag):
    path, frames = scene_bag
    scene = load_source(DataSource(kind='bag', path=str(path), frames=0))
    assert scene.has_geometry and len(scene.views) == len(frames)
    data = _data()
    pairs = select_pairs([scene], data.min_overlap, data.max_overlap)
    assert pairs
    rng = np.random.default_rng(3)
    for spec in pairs[:4]:
        pair = make_pair(scene.views[spec.first], scene.views[spec.second], data, rng)
        f1, f2 = frames[spec.first], frames[spec.second]
        for X, frame, valid in ((pair.X1, f1, pair.valid1), (pair.X2, f2, pair.valid2)):
            expected = _in_view1(f1, frame)  # (72, 64, 3): scale 1, the crop is a row window
            offsets = [y0 for y0 in range(SRC_HW[0] - NET_HW[0] + 1)
                       if np.allclose(expected[y0:y0 + NET_HW[0]], X, atol=1e-4)]
            assert len(offsets) == 1, 'the pointmap is no window of the ground truth'
            assert valid.all()


def test_correspondences_reproject_within_half_a_pixel(scene_bag):
    path, frames = scene_bag
    scene = load_source(DataSource(kind='bag', path=str(path), frames=0))
    data = _data(scale_range=(1.0, 1.6), negatives=0.5)
    pairs = select_pairs([scene], data.min_overlap, data.max_overlap)
    rng = np.random.default_rng(5)
    checked = 0
    for spec in pairs[:4]:
        pair = make_pair(scene.views[spec.first], scene.views[spec.second], data, rng)
        ok = pair.corres_valid
        assert ok.sum() == 128 and (~ok).sum() == 128  # 50 % negatives
        f1, f2 = frames[spec.first], frames[spec.second]
        x1, y1 = pair.corres1[ok].T
        X = pair.X1[y1, x1].astype(np.float64)  # view 1 frame
        T_C2C1 = np.linalg.inv(f2.T_WC) @ f1.T_WC  # from the renderer's poses
        Xc2 = X @ T_C2C1[:3, :3].T + T_C2C1[:3, 3]
        uv = (pair.K2 @ (Xc2 / Xc2[:, 2:]).T).T[:, :2]
        assert np.abs(uv - pair.corres2[ok]).max() <= 0.5 + 1e-6
        # and both ends hold the same surface point (within a few pixel footprints)
        x2, y2 = pair.corres2[ok].T
        gap = np.linalg.norm(pair.X2[y2, x2] - pair.X1[y1, x1], axis=-1)
        footprint = X[:, 2] / pair.K1[0, 0]
        assert np.median(gap / footprint) < 2.0
        checked += int(ok.sum())
    assert checked > 0


def test_crop_matches_a_camera_with_the_crop_intrinsics():
    """The teachers' crop (the student's pixels) is what a camera with the crop's K sees."""
    scene = make_scene(1)
    (frame,) = scene.sequence(1, width=128, height=96)
    rng = np.random.default_rng(0)
    exact = plan_crop((96, 128), (48, 64), 2.0, rng)  # resize x1: an exact pixel window
    assert exact.scale == (1.0, 1.0)
    K = exact.intrinsics(frame.K)
    seen = scene.render(frame.T_WC, K, 64, 48)
    assert np.mean(np.all(exact.image(frame.rgb) == seen.rgb, axis=-1)) > 0.99
    np.testing.assert_allclose(exact.nearest(frame.depth), seen.depth, rtol=1e-5)
    for factor in (1.0, 1.37, 1.9):
        crop = plan_crop((96, 128), (48, 64), factor, rng)
        seen = scene.render(frame.T_WC, crop.intrinsics(frame.K), 64, 48)
        rel = np.abs(crop.nearest(frame.depth) - seen.depth) / seen.depth
        assert np.median(rel) < 0.01, factor
        mine = crop.image(frame.rgb).astype(float)
        assert np.abs(mine - seen.rgb).mean() < 25  # Lanczos vs point sampling of a texture
        shifted = np.roll(seen.rgb, 3, axis=1).astype(float)
        assert np.abs(mine - seen.rgb).mean() < np.abs(mine - shifted).mean()


def test_stream_is_deterministic_and_symmetric():
    source = DataSource(frames=6, render_size=(48, 64))
    scene = load_source(source)
    data = _data(sources=(source,), resolution=(32, 48), scale_range=(1.0, 1.5),
                 color_jitter=0.3)
    pairs = select_pairs([scene], data.min_overlap, data.max_overlap)
    ds = PairDataset([scene], pairs, data, seed=4)
    a, b = ds[6], ds[7]  # one pair in both orders
    assert np.array_equal(a.rgb1, b.rgb2) and np.array_equal(a.rgb2, b.rgb1)
    np.testing.assert_array_equal(a.corres1, b.corres2)
    # a's view 1 points, moved into view 2's frame, are b's view 2 points
    assert np.linalg.norm(b.X2 - a.X1, axis=-1).max() > 0.01  # another frame,
    pts_a, pts_b = a.X1[a.valid1], b.X2[b.valid2]  # the same rigid shape
    pick = np.random.default_rng(0).integers(0, len(pts_a), (200, 2))
    np.testing.assert_allclose(np.linalg.norm(pts_a[pick[:, 0]] - pts_a[pick[:, 1]], axis=-1),
                               np.linalg.norm(pts_b[pick[:, 0]] - pts_b[pick[:, 1]], axis=-1),
                               atol=1e-4)
    again = PairDataset([scene], pairs, data, seed=4)[6]
    np.testing.assert_array_equal(again.rgb1, a.rgb1)
    np.testing.assert_array_equal(again.X2, a.X2)
    other = PairDataset([scene], pairs, data, seed=5)[6]
    assert not np.array_equal(other.rgb1, a.rgb1)
    batch = collate([a, b])
    assert batch.img1.shape == (2, 3, 32, 48) and float(batch.img1.max()) <= 1.0
    assert batch.targets.corres1.shape == (2, 256, 2)


def test_views_without_geometry_carry_none(scene_bag, tmp_path):
    path, frames = scene_bag
    bare = tmp_path / 'bare'
    with GroundTruthBagWriter(bare) as writer:
        for f in frames[:4]:
            writer.write_frame(f.stamp_ns, f.rgb, f.K)
    scene = load_source(DataSource(kind='bag', path=str(bare), frames=0))
    assert not scene.has_geometry
    pairs = select_pairs([scene], 0.1, 0.9)
    assert len(pairs) == 6  # every view with its next three
    pair = make_pair(scene.views[0], scene.views[1], _data(), np.random.default_rng(0))
    assert not pair.has_geometry and not pair.valid1.any() and not pair.corres_valid.any()
    with pytest.raises(DataError, match='does not exist'):
        load_source(DataSource(kind='bag', path=str(tmp_path / 'nope')))
    with pytest.raises(DataError, match='no training pairs'):
        PairDataset([scene], [], _data(), seed=0)


@pytest.mark.parametrize('cy, y0', [(35.5, 12), (45.0, 22), (60.0, 24), (5.0, 0)])
def test_uncropped_teacher_view_is_centred_on_the_principal_point(cy, y0):
    """Reproduction only: the official teachers' view is the source at the cover scale (here
    1, so a plain window), centred on the principal point and clamped into the image."""
    (frame,) = make_scene(2).sequence(1, width=SRC_HW[1], height=SRC_HW[0])
    K = frame.K.copy()
    K[1, 2] = cy
    view = View(frame.rgb, K, None, None)
    seen = teacher_view(view, _data())
    np.testing.assert_array_equal(seen, frame.rgb[y0:y0 + NET_HW[0]])
    if 23.5 <= cy <= SRC_HW[0] - 24.5:  # not clamped: the crop's centre is the principal point
        assert abs(y0 + (NET_HW[0] - 1) / 2 - cy) <= 0.5
    no_k = teacher_view(View(frame.rgb, None, None, None), _data())
    np.testing.assert_array_equal(no_k, frame.rgb[12:12 + NET_HW[0]])  # the image centre


def test_uncropped_teacher_views_differ_from_the_random_student_crop():
    source = DataSource(frames=6, render_size=(48, 64))
    scene = load_source(source)
    data = _data(sources=(source,), resolution=(32, 48), scale_range=(1.0, 1.5),
                 color_jitter=0.3)
    pairs = select_pairs([scene], data.min_overlap, data.max_overlap)
    plain = PairDataset([scene], pairs, data, seed=4)
    official = PairDataset([scene], pairs, data, seed=4, teacher_views=True)
    assert plain[6].teacher1 is None and collate([plain[6]]).teacher1 is None
    differ = 0
    for k in range(8):
        a, b = plain[k], official[k]
        np.testing.assert_array_equal(b.rgb1, a.rgb1)  # the student keeps its random crop
        np.testing.assert_array_equal(b.X2, a.X2)
        index, swapped, _ = official.stream.pair_of(k)
        spec = pairs[index]
        first, second = scene.views[spec.first], scene.views[spec.second]
        if swapped:
            first, second = second, first
        centred = plan_crop(first.rgb.shape[:2], (32, 48))  # principal point = image centre
        np.testing.assert_array_equal(b.teacher1, centred.image(first.rgb))  # no jitter
        np.testing.assert_array_equal(b.teacher2, teacher_view(second, data))
        differ += not np.array_equal(b.teacher1, b.rgb1)
    assert differ == 8
    batch = collate([official[6], official[7]])
    assert batch.teacher1.shape == batch.img1.shape == (2, 3, 32, 48)
    assert torch.equal(batch.teacher1[1], batch.teacher2[0])  # symmetrised: views swapped
