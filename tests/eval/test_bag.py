"""rosbag2 reading and writing of frames with ground truth, and clear errors for bad bags."""

import json

import numpy as np
import pytest

from ros2_sab3r.eval.bag import BagError, BagTopics, GroundTruthBagWriter, read_bag
from ros2_sab3r.sim.standin import SceneSpec
from tests.eval.conftest import SCENE_TEXT

pytestmark = pytest.mark.unit


@pytest.fixture(scope='module')
def frames():
    return SceneSpec.parse('synthetic:seed=1,frames=6,width=64,height=48').render()[1]


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_round_trip_keeps_images_and_ground_truth(tmp_path, frames, storage):
    with GroundTruthBagWriter(tmp_path / 'b', storage=storage) as w:
        w.write_label_map({1: 'wall', 2: 'floor'}, source='test')
        for f in frames:
            w.write_frame(f.stamp_ns, f.rgb, f.K, f.depth, f.semantic, f.instance, f.T_WC)
    bag = read_bag(tmp_path / 'b', tf_map_frame='map', progress=False)
    assert bag.storage == storage and len(bag.frames) == len(frames) and not bag.notes
    assert bag.label_map == {1: 'wall', 2: 'floor'} and bag.info == {'source': 'test'}
    for got, want in zip(bag.frames, frames):
        assert got.camera.stamp_ns == want.stamp_ns
        np.testing.assert_array_equal(got.camera.image, want.rgb)
        np.testing.assert_allclose(got.camera.K, want.K)
        np.testing.assert_allclose(got.truth.depth, want.depth)
        np.testing.assert_array_equal(got.truth.semantic, want.semantic)
        np.testing.assert_array_equal(got.truth.instance, want.instance)
        np.testing.assert_allclose(got.truth.T_WC, want.T_WC, atol=1e-9)
        np.testing.assert_allclose(got.camera.T_WC, want.T_WC, atol=1e-9)  # from /tf
    assert all(bag.has(p) for p in ('depth', 'semantic', 'instance', 'T_WC'))


def test_stride_and_max_frames(synthetic_bag):
    bag = read_bag(synthetic_bag, stride=3, max_frames=4, progress=False)
    assert len(bag.frames) == 4
    assert bag.info['synthetic_scene'] == SCENE_TEXT
    steps = np.diff([f.camera.stamp_ns for f in bag.frames])
    assert np.all(steps == steps[0]) and steps[0] == 3 * 200_000_000


def test_missing_image_topic_lists_what_is_there(synthetic_bag):
    with pytest.raises(BagError, match=r"no image topic '/cam'.*/camera/color/image_raw.*"
                                       r'--image-topic'):
        read_bag(synthetic_bag, BagTopics(image='/cam'), progress=False)


def test_bag_without_ground_truth_is_read_and_says_so(tmp_path, frames):
    with GroundTruthBagWriter(tmp_path / 'b') as w:
        for f in frames:
            w.write_frame(f.stamp_ns, f.rgb)
    bag = read_bag(tmp_path / 'b', progress=False)
    assert len(bag.frames) == len(frames) and bag.frames[0].camera.K is None
    assert not bag.has('depth') and not bag.has('T_WC') and not bag.label_map
    assert any('no ground-truth depth' in n for n in bag.notes)


def test_unsorted_and_duplicate_stamps_are_sorted_and_reported(tmp_path, frames):
    order = [0, 2, 1, 3, 3, 5, 4]
    with GroundTruthBagWriter(tmp_path / 'b') as w:
        for k, i in enumerate(order):  # received in this order, stamped out of order
            w.write_frame(frames[i].stamp_ns, frames[i].rgb, frames[i].K,
                          log_time_ns=frames[0].stamp_ns + k)
    bag = read_bag(tmp_path / 'b', progress=False)
    stamps = [f.camera.stamp_ns for f in bag.frames]
    assert stamps == sorted({frames[i].stamp_ns for i in order})
    assert any('sorted by stamp' in n for n in bag.notes)
    assert any('duplicate stamp' in n for n in bag.notes)


def test_ground_truth_of_another_size_is_refused(tmp_path, frames):
    f = frames[0]
    with GroundTruthBagWriter(tmp_path / 'b') as w:
        w.write_frame(f.stamp_ns, f.rgb, f.K, depth=f.depth[:-2])
    with pytest.raises(BagError, match='registered to the colour camera'):
        read_bag(tmp_path / 'b', progress=False)


def test_not_a_bag_and_corrupt_bags(tmp_path, synthetic_bag):
    with pytest.raises(BagError, match='does not exist'):
        read_bag(tmp_path / 'nothing', progress=False)
    (tmp_path / 'folder').mkdir()
    with pytest.raises(BagError, match='no metadata.yaml'):
        read_bag(tmp_path / 'folder', progress=False)
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'metadata.yaml').write_text((synthetic_bag / 'metadata.yaml').read_text())
    (broken / 'synthetic.db3').write_bytes(b'this is not sqlite' * 100)
    with pytest.raises(BagError, match='corrupt'):
        read_bag(broken, progress=False)
    (broken / 'metadata.yaml').write_text('rosbag2_bagfile_information: [unclosed')
    with pytest.raises(BagError, match='corrupt'):
        read_bag(broken, progress=False)


def test_label_map_is_json_on_a_string_topic(synthetic_bag):
    bag = read_bag(synthetic_bag, max_frames=1, progress=False)
    assert bag.label_map[5] == 'chair' and len(bag.label_map) == 40
    assert json.loads(json.dumps(bag.info))['source'] == 'synthetic'
