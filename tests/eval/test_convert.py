"""sab3r-convert on a tiny fake ScanNet export written here, and its errors."""

import numpy as np
from PIL import Image
import pytest

from ros2_sab3r.eval.bag import read_bag
from ros2_sab3r.eval.convert import main

pytestmark = pytest.mark.unit

H, W = 24, 32  # depth resolution; colour is twice as large, like ScanNet's


def _fake_scene(root, n=5):
    scene = root / 'scene0000_00'
    for d in ('color', 'depth', 'pose', 'intrinsic', 'label-filt', 'instance-filt'):
        (scene / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (2 * H, 2 * W, 3), dtype=np.uint8)).save(
            scene / 'color' / f'{i}.jpg')
        Image.fromarray(np.full((H, W), 1500 + 10 * i, np.uint16)).save(
            scene / 'depth' / f'{i}.png')
        raw = np.zeros((2 * H, 2 * W), np.uint16)
        raw[:, :W] = 2  # raw ScanNet id 2 -> NYU40 5 (chair) in the fake mapping
        raw[:, W:] = 1  # raw 1 -> NYU40 1 (wall)
        Image.fromarray(raw).save(scene / 'label-filt' / f'{i}.png')
        Image.fromarray((raw > 1).astype(np.uint8) * 3).save(
            scene / 'instance-filt' / f'{i}.png')
        pose = np.eye(4)
        pose[0, 3] = 0.1 * i
        if i == 3:
            pose[:] = -np.inf  # ScanNet marks lost tracking this way
        np.savetxt(scene / 'pose' / f'{i}.txt', pose)
    K = np.array([[30.0, 0, 16, 0], [0, 30.0, 12, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.savetxt(scene / 'intrinsic' / 'intrinsic_depth.txt', K)
    (root / 'scannetv2-labels.combined.tsv').write_text(
        'id\traw_category\tcategory\tcount\tnyu40id\tnyu40class\n'
        '1\twall\twall\t100\t1\twall\n2\tchair\tchair\t50\t5\tchair\n', encoding='utf-8')
    return scene


def test_scannet_export_to_bag(tmp_path, capsys):
    scene = _fake_scene(tmp_path)
    out = tmp_path / 'bag'
    assert main(['scannet', str(scene), str(out), '--stride', '1', '--storage', 'mcap',
                 '--no-progress']) == 0
    assert 'pose is not finite' in capsys.readouterr().err
    bag = read_bag(out, progress=False)
    assert len(bag.frames) == 4 and bag.storage == 'mcap'  # frame 3 had no pose
    f = bag.frames[1]
    assert f.camera.image.shape == (H, W, 3)
    np.testing.assert_allclose(f.camera.K, [[30, 0, 16], [0, 30, 12], [0, 0, 1]])
    np.testing.assert_allclose(f.truth.depth, 1.51, atol=1e-6)
    assert set(np.unique(f.truth.semantic)) == {1, 5}
    assert f.truth.semantic[0, 0] == 5 and f.truth.semantic[0, -1] == 1
    assert f.truth.T_WC[0, 3] == pytest.approx(0.1)
    assert bag.label_map[5] == 'chair' and bag.info['source'] == 'scannet:scene0000_00'
    stamps = [fr.camera.stamp_ns for fr in bag.frames]
    assert stamps[1] - stamps[0] == pytest.approx(1e9 / 30, abs=1)


def test_scannet_stride_and_max_frames(tmp_path):
    scene = _fake_scene(tmp_path)
    assert main(['scannet', str(scene), str(tmp_path / 'b'), '--stride', '2', '--max-frames',
                 '2', '--no-progress']) == 0
    bag = read_bag(tmp_path / 'b', progress=False)
    assert [f.truth.T_WC[0, 3] for f in bag.frames] == pytest.approx([0.0, 0.2])


def test_scannet_errors_say_what_is_missing(tmp_path, capsys):
    scene = _fake_scene(tmp_path)
    (tmp_path / 'scannetv2-labels.combined.tsv').unlink()
    assert main(['scannet', str(scene), str(tmp_path / 'b'), '--no-progress']) == 1
    assert '--label-map' in capsys.readouterr().err
    assert main(['scannet', str(tmp_path), str(tmp_path / 'c'), '--no-progress']) == 1
    assert 'lacks color, depth, pose' in capsys.readouterr().err
    (scene / 'depth' / '0.png').write_bytes(b'not a png')
    assert main(['scannet', str(scene), str(tmp_path / 'd'), '--labels', 'nyu40',
                 '--no-progress']) == 1
    assert 'cannot be read as an image' in capsys.readouterr().err


def test_synthetic_to_bag_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / 'syn'
    args = ['synthetic', '--seed', '3', '--frames', '3', '--width', '64', '--height', '48',
            str(out), '--no-progress']
    assert main(args) == 0
    assert len(read_bag(out, progress=False).frames) == 3
    assert main(args) == 1
    assert 'already exists' in capsys.readouterr().err
