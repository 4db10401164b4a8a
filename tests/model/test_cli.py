"""sab3r-infer and sab3r-convert-checkpoint on a tiny official-layout checkpoint."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from ros2_sab3r.model.checkpoint import load_network
from ros2_sab3r.model.cli import convert_main, main
from tests.model.helpers import write_official_checkpoint

pytestmark = pytest.mark.model

OFFICIAL_NAMES = {'pts3d_1', 'conf_1', 'desc_1', 'desc_conf_1', 'pts3d_in_other_view_2',
                  'conf_2', 'desc_2', 'desc_conf_2', 'img1_u8', 'img2_u8'}


@pytest.fixture()
def checkpoint(tmp_path, tiny_official_net):
    return write_official_checkpoint(tmp_path / 'tiny.pth', tiny_official_net)


def _png(path, w, h, seed):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_infer_from_images(tmp_path, checkpoint, capsys):
    a = _png(tmp_path / 'a.png', 64, 48, 0)
    b = _png(tmp_path / 'b.png', 64, 48, 1)
    out = tmp_path / 'out.npz'
    assert main(['--checkpoint', str(checkpoint), '--image1', a, '--image2', b, '--out',
                 str(out), '--long-side', '64']) == 0
    with np.load(out) as data:
        assert set(data.files) == OFFICIAL_NAMES
        assert data['pts3d_1'].shape == (1, 48, 64, 3)
        assert data['desc_2'].shape == (1, 48, 64, 24)
        assert data['img1_u8'].shape == (48, 64, 3) and data['img1_u8'].dtype == np.uint8
    assert 'wrote' in capsys.readouterr().out


def test_infer_from_pair_npz_with_feature_heads_and_bf16(tmp_path, tiny_cd_net):
    from ros2_sab3r.model.checkpoint import save_network

    ckpt = save_network(tiny_cd_net, tmp_path / 'tiny_cd.safetensors')
    gen = torch.Generator().manual_seed(0)
    img1 = (torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1).numpy()
    img2 = (torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1).numpy()
    np.savez(tmp_path / 'pair.npz', img1=img1, img2=img2)
    for dtype in ('fp32', 'bf16'):
        out = tmp_path / f'out_{dtype}.npz'
        assert main(['--checkpoint', str(ckpt), '--pair', str(tmp_path / 'pair.npz'), '--out',
                     str(out), '--dtype', dtype]) == 0
    with np.load(tmp_path / 'out_fp32.npz') as ref, np.load(tmp_path / 'out_bf16.npz') as low:
        assert set(ref.files) == OFFICIAL_NAMES | {'clip_1', 'clip_2', 'dino_1', 'dino_2'}
        assert ref['clip_1'].shape == (1, 32, 48, 16) and ref['dino_2'].shape == (1, 32, 48, 8)
        assert low['conf_1'].dtype == np.float32
        with torch.no_grad():
            direct = tiny_cd_net(torch.from_numpy(img1), torch.from_numpy(img2))
        np.testing.assert_allclose(ref['pts3d_in_other_view_2'], direct.view2.pts3d.numpy(),
                                   rtol=1e-5, atol=1e-6)
        assert not np.array_equal(ref['pts3d_1'], low['pts3d_1'])  # bf16 really ran


def test_bad_checkpoint_exits_with_message(tmp_path, capsys):
    a = _png(tmp_path / 'a.png', 32, 32, 0)
    code = main(['--checkpoint', str(tmp_path / 'none.pth'), '--image1', a, '--image2', a,
                 '--out', str(tmp_path / 'o.npz')])
    assert code == 2
    assert 'does not exist' in capsys.readouterr().err


def test_convert_official_to_safetensors(tmp_path, checkpoint, tiny_official_net):
    out = tmp_path / 'converted.safetensors'
    assert convert_main(['--checkpoint', str(checkpoint), '--out', str(out)]) == 0
    net = load_network(out)
    torch.testing.assert_close(net.dec_blocks2[0].attn.qkv.weight,
                               tiny_official_net.dec_blocks2[0].attn.qkv.weight, rtol=0, atol=0)
