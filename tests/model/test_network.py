"""The network: official state-dict layout, stage equivalence, output contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ros2_sab3r.model.layers import apply_rope, rope_tables
from ros2_sab3r.model.network import DecoderGraph, EncoderGraph, create_network
from ros2_sab3r.model.outputs import to_pair_prediction
from ros2_sab3r.types import PairPrediction
from tests.model.helpers import make_net, random_images, read_key_list

pytestmark = pytest.mark.model

def test_state_dict_matches_official_key_list():
    net = create_network('mast3r_vitl_512', 'meta')
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    ref = read_key_list('mast3r_state_dict_keys.tsv')
    assert len(ref) == 1017
    assert ours == ref  # same names, shapes and order (aliases and mask_token included)


def test_parameter_counts_match_spec():
    net = create_network('mast3r_vitl_512', 'meta')
    unique = {id(p): p.numel() for p in net.parameters()}
    assert sum(unique.values()) == 688_638_856
    assert sum(v.numel() for v in net.state_dict().values()) == 695_274_376

    def count(module):
        return sum({id(p): p.numel() for p in module.parameters()}.values())

    assert count(net.enc_blocks) == 302_309_376
    assert count(net.dec_blocks) == count(net.dec_blocks2) == 113_439_744
    assert count(net.downstream_head1) == 78_935_492
    assert count(net.downstream_head1.dpt) == 20_201_668
    # alias keys are one tensor
    sd = net.state_dict(keep_vars=True)
    assert sd['downstream_head1.dpt.scratch.layer1_rn.weight'] is sd[
        'downstream_head1.dpt.scratch.layer_rn.0.weight']


def test_sab3r_feature_heads_add_keys_only():
    base = set(create_network('mast3r_vitl_512', 'meta').state_dict())
    cd = create_network('sab3r_cd', 'meta').state_dict()
    extra = set(cd) - base
    assert base <= set(cd)
    # Inside each view's head, directly followed by the DPT names (no wrapper level).
    assert {'.'.join(k.split('.')[:2]) for k in extra} == {
        f'downstream_head{v}.{h}_head' for v in (1, 2) for h in ('clip', 'dino')}
    assert len(extra) == 4 * 68
    assert cd['downstream_head1.clip_head.head.4.weight'].shape == (512, 128, 1, 1)
    assert cd['downstream_head2.dino_head.head.4.weight'].shape == (384, 128, 1, 1)
    # the DPT feature head reads [encoder tokens, decoder tokens]
    assert cd['downstream_head1.clip_head.act_postprocess.0.0.weight'].shape == (96, 1024, 1, 1)
    assert cd['downstream_head1.clip_head.act_postprocess.3.0.weight'].shape == (768, 768, 1, 1)


def test_rope_matches_written_formula():
    head_dim, grid, base = 16, (3, 5), 100.0
    tables = rope_tables(grid, head_dim, base, 'cpu', torch.float64)
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(1, 1, grid[0] * grid[1], head_dim, generator=gen, dtype=torch.float64)
    out = apply_rope(t, tables)
    q = head_dim // 4
    expected = torch.empty_like(t)
    for n in range(grid[0] * grid[1]):
        y, x = divmod(n, grid[1])  # row-major tokens, (row, col) positions
        for half, p in ((0, y), (1, x)):
            off = half * 2 * q
            for j in range(q):
                theta = p / base ** (j / q)
                u, v = t[0, 0, n, off + j], t[0, 0, n, off + j + q]
                expected[0, 0, n, off + j] = u * math.cos(theta) - v * math.sin(theta)
                expected[0, 0, n, off + j + q] = v * math.cos(theta) + u * math.sin(theta)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', ['tiny', 'tiny_cd'])
def test_forward_shapes_and_contracts(name):
    net = make_net(name)
    img1, img2 = random_images(2, 32, 48, 1), random_images(2, 32, 48, 2)
    with torch.no_grad():
        out = net(img1, img2)
    for view in (out.view1, out.view2):
        assert view.pts3d.shape == (2, 32, 48, 3)
        assert view.conf.shape == view.desc_conf.shape == (2, 32, 48)
        assert view.desc.shape == (2, 32, 48, 24)
        for t in (view.pts3d, view.conf, view.desc, view.desc_conf):
            assert torch.isfinite(t).all() and t.dtype == torch.float32
        assert (view.conf >= 1.0).all()  # conf_mode ('exp', 1, inf)
        assert (view.desc_conf > 0.0).all()  # desc_conf_mode ('exp', 0, inf)
        torch.testing.assert_close(view.desc.norm(dim=-1), torch.ones(2, 32, 48), atol=1e-5,
                                   rtol=0)
    if name == 'tiny_cd':
        assert out.view1.clip.shape == (2, 32, 48, 16)  # dpt head, full resolution
        assert out.view2.dino.shape == (2, 32, 48, 8)  # linear head, full resolution
    else:
        assert out.view1.clip is None and out.view1.dino is None


def test_staged_equals_full_forward(tiny_cd_net):
    img1, img2 = random_images(1, 48, 32, 3), random_images(1, 48, 32, 4)
    with torch.no_grad():
        full = tiny_cd_net(img1, img2)
        a, b = tiny_cd_net.encode(img1), tiny_cd_net.encode(img2)
        staged = tiny_cd_net.decode(a, b)
        t1, t2 = tiny_cd_net.decode_tokens(a, b)
        heads2 = tiny_cd_net.run_heads(t2, 2)
    for f, s in ((full.view1, staged.view1), (full.view2, staged.view2), (full.view2, heads2)):
        for field in ('pts3d', 'conf', 'desc', 'desc_conf', 'clip', 'dino'):
            torch.testing.assert_close(getattr(s, field), getattr(f, field), rtol=1e-5,
                                       atol=1e-6)
    assert len(t1.layers) == 11 and t1.layers[0].shape == (1, 6, 32)
    assert t1.layers[1].shape == (1, 6, 24)


def test_batch_items_are_independent(tiny_net):
    img1, img2 = random_images(2, 32, 48, 5), random_images(2, 32, 48, 6)
    with torch.no_grad():
        both = tiny_net(img1, img2)
        one = tiny_net(img1[1:], img2[1:])
    torch.testing.assert_close(both.view2.pts3d[1:], one.view2.pts3d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('size1, size2', [((48, 80), (48, 80)),  # 3x5 tokens: odd rows/cols
                                          ((80, 48), (48, 64)),  # portrait with landscape
                                          ((16, 32), (32, 16))])
def test_odd_grids_and_mixed_shapes(tiny_cd_net, size1, size2):
    img1, img2 = random_images(1, *size1, seed=7), random_images(1, *size2, seed=8)
    with torch.no_grad():
        out = tiny_cd_net(img1, img2)
    assert out.view1.pts3d.shape == (1, *size1, 3)
    assert out.view2.pts3d.shape == (1, *size2, 3)
    assert out.view2.dino.shape == (1, *size2, 8)
    assert out.view1.clip.shape == (1, *size1, 16)
    assert torch.isfinite(out.view2.pts3d).all()


def test_decoders_update_simultaneously(tiny_net):
    """With dec_blocks2 = dec_blocks and head2 = head1 the network is symmetric: view 2 of
    (a, b) equals view 1 of (b, a). A sequential update of the two branches breaks this."""
    net = make_net('tiny', seed=3)
    net.dec_blocks2.load_state_dict(net.dec_blocks.state_dict())
    net.downstream_head2.load_state_dict(net.downstream_head1.state_dict())
    a, b = random_images(1, 32, 48, 9), random_images(1, 32, 48, 10)
    with torch.no_grad():
        ab, ba = net(a, b), net(b, a)
    torch.testing.assert_close(ab.view2.pts3d, ba.view1.pts3d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ab.view2.desc, ba.view1.desc, rtol=1e-5, atol=1e-6)


def test_view2_uses_its_own_decoder_and_head(tiny_net):
    net = make_net('tiny', seed=4)
    a, b = random_images(1, 32, 48, 11), random_images(1, 32, 48, 12)
    with torch.no_grad():
        before = net(a, b)
        net.downstream_head2.head_local_features.fc2.bias.add_(1.0)
        after = net(a, b)
    torch.testing.assert_close(after.view1.desc, before.view1.desc)
    assert not torch.allclose(after.view2.desc, before.view2.desc)


def test_reduced_precision_backbone_keeps_heads_fp32():
    net = make_net('tiny_cd', seed=5)
    img1, img2 = random_images(1, 32, 48, 14), random_images(1, 32, 48, 15)
    with torch.no_grad():
        ref = net(img1, img2)
        net.set_backbone_dtype(torch.bfloat16)
        enc = net.encode(img1)
        low = net(img1, img2)
    assert enc.tokens.dtype == torch.bfloat16
    assert net.downstream_head1.dpt.head[0].weight.dtype == torch.float32
    assert low.view1.pts3d.dtype == torch.float32 and low.view1.clip.dtype == torch.float32
    # bf16 has 8 mantissa bits; the tiny network stays close to fp32
    err = (low.view2.pts3d - ref.view2.pts3d).abs().max() / ref.view2.pts3d.abs().max()
    assert err < 0.1


def test_to_pair_prediction(tiny_cd_net):
    img1, img2 = random_images(2, 32, 48, 16), random_images(2, 32, 48, 17)
    with torch.no_grad():
        out = tiny_cd_net(img1, img2)
    pred = to_pair_prediction(out, index=1)
    assert isinstance(pred, PairPrediction)
    assert pred.image_size == (32, 48)
    assert pred.view1.X.shape == (32, 48, 3) and pred.view1.X.dtype == np.float32
    assert pred.view2.D.shape == (32, 48, 24)
    assert pred.view2.S_clip.shape == (32, 48, 16) and pred.view2.S_dino.shape == (32, 48, 8)
    np.testing.assert_array_equal(pred.view2.C, out.view2.conf[1].numpy())


def test_export_wrappers_match_staged(tiny_cd_net):
    img1, img2 = random_images(1, 32, 48, 18), random_images(1, 48, 32, 19)
    enc = EncoderGraph(tiny_cd_net)
    dec = DecoderGraph(tiny_cd_net, (32, 48), (48, 32))
    with torch.no_grad():
        flat = dec(enc(img1), enc(img2))
        ref = tiny_cd_net(img1, img2)
    assert dec.output_names[:4] == ('pts3d_1', 'conf_1', 'desc_1', 'desc_conf_1')
    assert dec.output_names[6] == 'pts3d_in_other_view_2'
    assert len(flat) == len(dec.output_names) == 12
    torch.testing.assert_close(flat[6], ref.view2.pts3d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat[11], ref.view2.dino, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_rejected(tiny_net):
    with pytest.raises(ValueError, match='multiple of the patch size'):
        tiny_net.encode(torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        tiny_net.encode(torch.zeros(3, 32, 48))


def test_dpt_reorderings_match_the_official_operation_order():
    """heads.DPT convolves FusionBlock.out_conv before upsampling and runs the last 1x1 conv on
    channels-last pixels; both must equal the official order (upsample, then conv2d, NCHW)."""
    import torch.nn.functional as F

    from ros2_sab3r.model.heads import DPT

    torch.manual_seed(0)
    dpt = DPT(hooks=(0, 1, 2, 3), token_dims=(8, 6, 6, 6), patch_size=4, out_channels=5,
              layer_dims=(4, 4, 8, 8), feature_dim=8, last_dim=6).double().eval()
    for p in dpt.parameters():  # non-zero biases everywhere: the bias must pass the resize
        torch.nn.init.normal_(p, std=0.3)
    grid = (3, 5)  # odd: exercises refinenet4's crop as well
    layers = [torch.randn(2, 15, d, dtype=torch.float64) for d in (8, 6, 6, 6)]

    def up(x, size):
        return F.interpolate(x, size=size, mode='bilinear', align_corners=True)

    def fusion(block, x, skip=None):  # official: resize, then out_conv
        if skip is not None:
            x = x + block.resConfUnit1(skip)
        x = block.resConfUnit2(x)
        return block.out_conv(up(x, (2 * x.shape[-2], 2 * x.shape[-1])))

    with torch.no_grad():
        got = dpt(layers, grid)
        sc = dpt.scratch
        maps = []
        for k in range(4):
            x = layers[k].transpose(1, 2).reshape(2, -1, *grid)
            maps.append(sc.layer_rn[k](dpt.act_postprocess[k](x)))
        p = fusion(sc.refinenet4, maps[3])[:, :, :3, :5]
        p = fusion(sc.refinenet3, p, maps[2])
        p = fusion(sc.refinenet2, p, maps[1])
        p = fusion(sc.refinenet1, p, maps[0])
        x = up(dpt.head[0](p), (12, 20))
        want = dpt.head[4](dpt.head[3](dpt.head[2](x))).permute(0, 2, 3, 1)
    assert got.shape == (2, 12, 20, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: same maths
