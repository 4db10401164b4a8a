"""sab3r-teacher end to end (in-process) on random-weight files, and its bad-input exits."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image
import pytest
import torch

from ros2_sab3r.train.jbu import JBUStack
from ros2_sab3r.train.teacher_cli import load_image, main
from ros2_sab3r.train.teachers import Teacher
from tests.train.test_teachers import featup_file, randomise

pytestmark = pytest.mark.train


@pytest.fixture(scope='module')
def dino_files(tmp_path_factory):
    """A random timm DINOv2 ViT-S/14 state dict and a FeatUp DINO JBU file."""
    root = tmp_path_factory.mktemp('dino')
    teacher = Teacher('dinov2', 'jbu')
    randomise(teacher, seed=11)
    torch.save(teacher.backbone.vit.state_dict(), root / 'dinov2_vits14.pth')
    featup_file(root / 'dino_jbu.ckpt', teacher.jbu, teacher.channel_norm)
    return root / 'dinov2_vits14.pth', root / 'dino_jbu.ckpt', teacher


def _png(path, height, width, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _features(path):
    with np.load(path) as data:
        assert list(data.keys()) == ['features']
        return data['features']


def test_maskclip_jbu_end_to_end_with_a_full_open_clip_state_dict(tmp_path):
    """One run with a full ViT-B-16 state dict (text tower included, float16 like OpenAI's):
    the slowest test of the room (~300 MB written), so only once."""
    import open_clip

    model = open_clip.create_model('ViT-B-16', pretrained=None, force_quick_gelu=True)
    randomise(model.visual, seed=12)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / 'clip.pt')
    del model
    jbu = JBUStack(512)
    randomise(jbu, seed=13)
    featup_file(tmp_path / 'clip_jbu.ckpt', jbu)
    img = _png(tmp_path / 'photo.png', 40, 70)
    out = tmp_path / 'out' / 'clip.npz'
    assert main([str(img), '--teacher', 'maskclip', '--weights', str(tmp_path / 'clip.pt'),
                 '--upsampler-weights', str(tmp_path / 'clip_jbu.ckpt'), '--size', '32x48',
                 '--out', str(out)]) == 0
    got = _features(out)
    assert got.shape == (32, 48, 512) and got.dtype == np.float32
    teacher = Teacher('maskclip', 'jbu')
    teacher.load_weights(tmp_path / 'clip.pt', tmp_path / 'clip_jbu.ckpt')
    crop = load_image(img, (32, 48))  # 40x70 -> cover 32x56 -> centre 32x48
    assert crop.shape == (32, 48, 3)
    want = teacher(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    np.testing.assert_array_equal(got, want)


def test_dinov2_none_and_bilinear(tmp_path, dino_files):
    weights, _, teacher = dino_files
    img = _png(tmp_path / 'photo.png', 32, 48, seed=1)  # already 32x48: used as is
    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1)[None].float() / 255
    raw = Teacher('dinov2', 'none')
    raw.backbone.load_state_dict(teacher.backbone.state_dict())
    for upsampler, shape in (('none', (2, 3, 384)), ('bilinear', (32, 48, 384))):
        out = tmp_path / f'{upsampler}.npz'
        assert main([str(img), '--teacher', 'dinov2', '--weights', str(weights), '--upsampler',
                     upsampler, '--size', '32x48', '--out', str(out)]) == 0
        got = _features(out)
        assert got.shape == shape
        if upsampler == 'none':  # the raw backbone features: no ChannelNorm
            np.testing.assert_array_equal(got, raw(x)[0].numpy())


def test_dinov2_jbu_equals_the_in_process_teacher(tmp_path, dino_files):
    weights, jbu_file, teacher = dino_files
    img = _png(tmp_path / 'photo.png', 32, 32, seed=2)
    out = tmp_path / 'jbu.npz'
    assert main([str(img), '--teacher', 'dinov2', '--weights', str(weights),
                 '--upsampler-weights', str(jbu_file), '--out', str(out)]) == 0
    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1)[None].float() / 255
    np.testing.assert_array_equal(_features(out), teacher.eval()(x)[0].numpy())


@pytest.mark.parametrize('case', ['missing image', 'wrong weights', 'jbu without weights',
                                  'size not 16', 'size text', 'image not 16',
                                  'missing weights', 'jbu file of the other teacher'])
def test_bad_input_exits_2_with_one_line(tmp_path, dino_files, capsys, case):
    weights, jbu_file, _ = dino_files
    img = _png(tmp_path / 'photo.png', 32, 48)
    args = [str(img), '--teacher', 'dinov2', '--weights', str(weights), '--upsampler', 'none',
            '--out', str(tmp_path / 'o.npz')]
    expect = {'missing image': 'image .*nope.png does not exist',
              'wrong weights': 'is not an open_clip ViT-B-16.*--teacher dinov2',
              'jbu without weights': 'needs --upsampler-weights',
              'size not 16': 'not a multiple of 16',
              'size text': "'big' is not HxW",
              'image not 16': r'40x48 is not a multiple of 16.*--size',
              'missing weights': '--weights .*none.pth does not exist',
              'jbu file of the other teacher': 'JBU for 384-channel features'}[case]
    if case == 'missing image':
        args[0] = str(tmp_path / 'nope.png')
    elif case == 'wrong weights':
        args[2] = 'maskclip'
    elif case == 'jbu without weights':
        args[6] = 'jbu'
    elif case == 'size not 16':
        args += ['--size', '30x48']
    elif case == 'size text':
        args += ['--size', 'big']
    elif case == 'image not 16':
        args[0] = str(_png(tmp_path / 'odd.png', 40, 48))
    elif case == 'missing weights':
        args[4] = str(tmp_path / 'none.pth')
    else:
        args[2], args[6] = 'maskclip', 'jbu'
        args += ['--upsampler-weights', str(jbu_file)]
        clip = tmp_path / 'clip_visual.pt'
        # Only the image tower: the teacher ignores text keys anyway.
        torch.save({f'visual.{k}': v.half() for k, v in
                    Teacher('maskclip', 'none').backbone.visual.state_dict().items()}, clip)
        args[4] = str(clip)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert err.startswith('sab3r-teacher: error: ')
    assert re.search(expect, err), err
    assert not (tmp_path / 'o.npz').exists()
