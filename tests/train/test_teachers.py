"""Teachers against float64 references on random weights; JBU banding; checkpoints; eval mode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ros2_sab3r.train.jbu import JBUStack, UpsamplerWeightsError
from ros2_sab3r.train.teachers import (
    MaskClipBackbone,
    Teacher,
    TeacherConfig,
    TeacherWeightsError,
    teacher_image,
)
from tests.train import references as ref

pytestmark = pytest.mark.train

torch.set_num_threads(2)  # shared machine


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and far from its init, so each one matters to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            leaf = name.rsplit('.', 1)[-1]
            if p.ndim >= 2 and 'embed' not in name and 'token' not in name:
                p.copy_(noise / (p[0].numel() ** 0.5))  # fan-in scaled matrices
            elif leaf in ('weight', 'gamma') and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)  # norms and layer scales
            elif leaf in ('range_temp', 'sigma_spatial'):
                p.copy_(0.5 + 0.3 * noise.abs())
            else:
                p.copy_(0.5 * noise)  # biases, class/position embeddings


def numpy_state(module: torch.nn.Module, strip: str = '') -> dict[str, np.ndarray]:
    return {k[len(strip):]: v.detach().double().numpy() for k, v in module.state_dict().items()
            if k.startswith(strip)}


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def featup_file(path, jbu: JBUStack, norm: torch.nn.LayerNorm | None = None) -> None:
    """A FeatUp-style Lightning checkpoint: upsampler + extra training-only tensors."""
    c = jbu.dim
    state = {f'upsampler.{k}': v.float() for k, v in jbu.state_dict().items()}
    state |= {'downsampler.w': torch.randn(16, 16), 'downsampler.b': torch.randn(1),
              'downsampler.attention_net.1.weight': torch.randn(1, c),
              'scale_net.net.weight': torch.randn(1, c, 1, 1),
              'model.0.blocks.0.norm1.weight': torch.randn(c)}  # a backbone copy: never used
    if norm is not None:
        state |= {'model.1.norm.weight': norm.weight.detach().float(),
                  'model.1.norm.bias': norm.bias.detach().float()}
    torch.save({'state_dict': state, 'epoch': 3, 'global_step': 1200,
                'pytorch-lightning_version': '1.9.0'}, path)


def test_maskclip_matches_manual_float64():
    teacher = Teacher('maskclip', 'none')
    randomise(teacher, seed=1)
    teacher.double()
    state = numpy_state(teacher.backbone)
    # 32 x 48: resampled position table; 224 x 224: the native table as is.
    for size in ((32, 48), (224, 224)):
        img = image(*size)
        got = teacher(img)[0].numpy()  # (h, w, 512)
        want = ref.maskclip(state, img[0].numpy()).transpose(1, 2, 0)
        assert got.shape == (size[0] // 16, size[1] // 16, 512)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    teacher.float()  # the default precision stays close to the exact value
    got32 = teacher(img.float())[0].numpy()
    assert np.abs(got32 - want).max() < 1e-3 * np.abs(want).max()


def test_dinov2_matches_manual_float64_and_bilinear_lands_on_the_student_grid():
    teacher = Teacher('dinov2', 'none')
    randomise(teacher, seed=2)
    teacher.double()
    img = image(32, 48, seed=1)
    got = teacher(img)[0].numpy()
    want = ref.dinov2(numpy_state(teacher.backbone, 'vit.'), img[0].numpy())  # (384, 2, 3)
    assert got.shape == (2, 3, 384)
    np.testing.assert_allclose(got, want.transpose(1, 2, 0), rtol=1e-9,
                               atol=1e-9 * np.abs(want).max())
    bilinear = Teacher('dinov2', 'bilinear')
    bilinear.load_state_dict(teacher.state_dict())
    up = bilinear.double()(img)[0].numpy()  # (32, 48, 384): H x W, not the 28 x 42 of I'
    want_up = np.einsum('yi,xj,cij->yxc', ref.linear_matrix(32, 2), ref.linear_matrix(48, 3), want)
    np.testing.assert_allclose(up, want_up, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_dinov2_jbu_teacher_matches_reference_from_a_featup_file(tmp_path):
    teacher = Teacher('dinov2', 'jbu', chunk_pixels=200)
    randomise(teacher, seed=3)
    featup_file(tmp_path / 'dino.ckpt', teacher.jbu, teacher.channel_norm)
    expected_jbu = {k: v.clone() for k, v in teacher.jbu.state_dict().items()}
    randomise(teacher.jbu, seed=4)  # loading must bring the file's tensors back
    torch.nn.init.ones_(teacher.channel_norm.weight)
    teacher.load_upsampler_weights(tmp_path / 'dino.ckpt')
    assert all(torch.equal(v, expected_jbu[k]) for k, v in teacher.jbu.state_dict().items())
    teacher.double()
    img = image(32, 48, seed=2)
    got = teacher(img)[0].numpy()  # (32, 48, 384)
    raw = ref.dinov2(numpy_state(teacher.backbone, 'vit.'), img[0].numpy())
    normed = ref.channel_norm(raw, *(teacher.channel_norm.state_dict()[k].double().numpy()
                                     for k in ('weight', 'bias')))
    # Guidance: the resized image I' (28 x 42), not the crop.
    want = ref.jbu_stack(normed, ref.dino_input(img[0].numpy()), numpy_state(teacher.jbu))
    assert got.shape == (32, 48, 384)
    np.testing.assert_allclose(got, want.transpose(1, 2, 0), rtol=1e-8,
                               atol=1e-9 * np.abs(want).max())


def test_jbu_banded_equals_whole_map_also_with_reproduced_dropout():
    whole = JBUStack(8, chunk_pixels=None)
    randomise(whole, seed=5)
    src = torch.randn(1, 8, 3, 2, generator=torch.Generator().manual_seed(0))
    guide = torch.randn(1, 3, 50, 36, generator=torch.Generator().manual_seed(1))
    want = whole.eval()(src, guide)
    assert want.shape == (1, 8, 48, 32)
    for chunk in (1, 100):
        banded = JBUStack(8, chunk_pixels=chunk)
        banded.load_state_dict(whole.state_dict())
        assert torch.equal(banded.eval()(src, guide), want), chunk
        # Dropout masks are drawn once per forward: banding does not change them either.
        torch.manual_seed(7)
        a = whole.train()(src, guide)
        torch.manual_seed(7)
        b = banded.train()(src, guide)
        whole.eval()
        assert torch.equal(a, b) and not torch.allclose(a, want), chunk


def test_teacher_stays_in_eval_and_dropout_is_an_opt_in():
    plain = Teacher('dinov2', 'jbu')
    randomise(plain, seed=6)
    noisy = copy.deepcopy(plain)
    noisy.upsampler_dropout = True  # as Teacher(..., upsampler_dropout=True) builds it
    img = image(32, 32).float()
    plain.train()  # an engine calling train() on everything must not change a teacher
    noisy.train()
    assert not plain.training and not any(m.training for m in plain.modules())
    assert noisy.jbu.training and not noisy.backbone.training
    a, b = plain(img), plain(img)
    assert torch.equal(a, b) and not a.requires_grad
    torch.manual_seed(0)
    c = noisy(img)
    torch.manual_seed(1)
    d = noisy(img)
    assert not torch.allclose(c, d) and not torch.allclose(c, a)


def test_teacher_image_reproduction_option():
    crop, whole = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    default = TeacherConfig('maskclip', weights='w', upsampler='none')
    assert teacher_image(crop, whole, default) is crop
    official = TeacherConfig('maskclip', weights='w', upsampler='none', uncropped_input=True)
    assert teacher_image(crop, whole, official) is whole
    with pytest.raises(ValueError, match='before its random crop'):
        teacher_image(crop, None, official)
    with pytest.raises(ValueError, match='needs its FeatUp weights file'):
        TeacherConfig('dinov2', weights='w').validate()


def test_bad_upsampler_files_are_refused_by_name(tmp_path):
    dino = Teacher('dinov2', 'jbu')
    featup_file(tmp_path / 'clip_jbu.ckpt', JBUStack(512))
    with pytest.raises(UpsamplerWeightsError, match=r'clip_jbu.ckpt is a JBU for 512-channel.*'
                       r'dinov2_jbu_stack_cocostuff.ckpt'):
        dino.load_upsampler_weights(tmp_path / 'clip_jbu.ckpt')
    featup_file(tmp_path / 'no_norm.ckpt', JBUStack(384))
    with pytest.raises(UpsamplerWeightsError, match='no model.1.norm.weight'):
        dino.load_upsampler_weights(tmp_path / 'no_norm.ckpt')
    torch.save({'model': {}}, tmp_path / 'other.ckpt')
    with pytest.raises(UpsamplerWeightsError, match="other.ckpt has no 'state_dict'"):
        dino.load_upsampler_weights(tmp_path / 'other.ckpt')


def test_backbone_weights_of_another_model_are_refused(tmp_path):
    dino = Teacher('dinov2', 'none')
    torch.save(dino.backbone.vit.state_dict(), tmp_path / 'dino.pth')
    clip = MaskClipBackbone()
    with pytest.raises(TeacherWeightsError, match=r'dino.pth is not an open_clip ViT-B-16.*'
                       r'use --teacher maskclip|dino.pth is not an open_clip ViT-B-16.*dinov2'):
        clip.load_weights(tmp_path / 'dino.pth')
    wide = {k: v for k, v in clip.state_dict().items()}
    wide['visual.conv1.weight'] = torch.zeros(1024, 3, 14, 14)
    torch.save(wide, tmp_path / 'vitl.pt')
    with pytest.raises(TeacherWeightsError, match=r'vitl.pt is not an open_clip ViT-B-16.*'
                       r'conv1.weight has shape \(1024, 3, 14, 14\)'):
        clip.load_weights(tmp_path / 'vitl.pt')
    state = dict(dino.backbone.vit.state_dict())
    state['register_tokens'] = torch.zeros(1, 4, 384)
    state['mask_token'] = torch.zeros(1, 384)
    torch.save(state, tmp_path / 'reg.pth')
    with pytest.raises(TeacherWeightsError, match='register tokens'):
        dino.backbone.load_weights(tmp_path / 'reg.pth')
    del state['register_tokens']  # the torch-hub layout: mask_token is ignored
    torch.save(state, tmp_path / 'hub.pth')
    dino.backbone.load_weights(tmp_path / 'hub.pth')
