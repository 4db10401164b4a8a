"""CLIP text encoder: the OpenAI ViT-B/16 space only, prompting, caching, width check, factory.

Random weights only: a tiny CLIP stands in for ViT-B-16 (open_clip's registry entry for 'ViT-B-16'
is swapped for a tiny config where the real loader must run), nothing is downloaded.
"""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import open_clip.factory
import pytest
import torch

from ros2_sab3r.config import ModelConfig, config_from_flat
from ros2_sab3r.inference.base import BackendUnavailable
from ros2_sab3r.inference.factory import load_text_encoder
from ros2_sab3r.model.text import (
    IMAGENET_TEMPLATES,
    ClipTextEncoder,
    TextEncoderError,
    check_clip_width,
    other_weights,
    prompts_for,
)
from ros2_sab3r.types import TextEncoder

pytestmark = pytest.mark.model

# A small CLIP with the ViT-B-16 tokenizer/vocabulary so the tests build it in well under a second.
TINY_CLIP = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16,
                   'patch_size': 16},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2,
                 'layers': 2},
}
# Where the Hugging Face cache keeps the LAION-2B ViT-B-16 weights (open_clip tag
# 'laion2b_s34b_b88k'), below some cache root.
LAION_CACHE = ('models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K/snapshots/0123abcd/'
               'open_clip_pytorch_model.bin')


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rows = 0

    def encode_text(self, tokens):
        self.rows += tokens.shape[0]
        return self.model.encode_text(tokens)


def _tiny(quick_gelu: bool):
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP, quick_gelu=quick_gelu).eval()


@pytest.fixture(scope='module')
def tiny_clip():
    return _tiny(quick_gelu=True)


@pytest.fixture(scope='module')
def tokenizer():
    return open_clip.get_tokenizer('ViT-B-16')


def _reference(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """Normalised mean of the normalised embeddings of `prompts`, float64."""
    with torch.no_grad():
        emb = model.encode_text(tokenizer(prompts)).double()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(0)
    return (mean / mean.norm()).numpy()


@pytest.fixture()
def tiny_vit_b16(monkeypatch, tmp_path, tiny_clip):
    """'ViT-B-16' resolves to the tiny config; returns a state-dict file of tiny_clip's weights."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, 'ViT-B-16', dict(TINY_CLIP))
    weights = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(tiny_clip.state_dict(), weights)
    return weights


def test_prompts():
    assert prompts_for('red mug', 'raw') == ('red mug',)
    assert prompts_for('chair', 'single') == ('a photo of a chair',)
    assert prompts_for('apple', 'single') == ('a photo of an apple',)
    assert prompts_for('Orange', 'single') == ('a photo of an Orange',)
    assert prompts_for('mug', 'ensemble') == tuple(t.format('mug') for t in IMAGENET_TEMPLATES)
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count('{}') == 1 for t in IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match='not one of raw, single, ensemble'):
        prompts_for('mug', 'template')


@pytest.mark.parametrize('prompts', ['raw', 'single', 'ensemble'])
def test_encode_embeds_the_prompts_of_the_mode(tiny_clip, tokenizer, prompts):
    enc = ClipTextEncoder(tiny_clip, tokenizer, prompts=prompts)
    out = enc.encode(['chair', 'apple'])
    assert out.shape == (2, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=0, atol=1e-6)
    expected = {'raw': ['apple'], 'single': ['a photo of an apple'],
                'ensemble': [t.format('apple') for t in IMAGENET_TEMPLATES]}[prompts]
    np.testing.assert_allclose(out[1], _reference(tiny_clip, tokenizer, expected), rtol=0,
                               atol=1e-5)
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.prompts == prompts


def test_default_is_the_raw_text(tiny_clip, tokenizer):
    out = ClipTextEncoder(tiny_clip, tokenizer).encode(['a dresser'])
    np.testing.assert_allclose(out[0], _reference(tiny_clip, tokenizer, ['a dresser']), rtol=0,
                               atol=1e-5)
    with pytest.raises(ValueError, match='prompts'):
        ClipTextEncoder(tiny_clip, tokenizer, prompts='imagenet')


@pytest.mark.parametrize('prompts, per_text', [('raw', 1), ('ensemble', 80)])
def test_cache_per_query(tiny_clip, tokenizer, prompts, per_text):
    enc = ClipTextEncoder(_CountingModel(tiny_clip), tokenizer, prompts=prompts)
    first = enc.encode(['lamp', 'lamp', 'sofa'])
    assert enc._model.rows == 2 * per_text  # duplicates embedded once
    again = enc.encode(['sofa', 'lamp'])
    assert enc._model.rows == 2 * per_text  # served from the cache
    np.testing.assert_array_equal(again, first[[2, 0]])
    with pytest.raises(TypeError):
        enc.encode('lamp')


def test_from_local_weights_file_builds_quick_gelu(tiny_vit_b16, tiny_clip, tokenizer):
    enc = ClipTextEncoder.from_pretrained(str(tiny_vit_b16))
    assert enc._model.visual is None  # image tower dropped
    assert enc.source == str(tiny_vit_b16) and enc.prompts == 'raw'
    assert isinstance(enc._model.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    out = enc.encode(['table'])
    np.testing.assert_allclose(out[0], _reference(tiny_clip, tokenizer, ['table']), rtol=0,
                               atol=1e-5)
    # The same weights under nn.GELU (open_clip's default for 'ViT-B-16') embed elsewhere.
    gelu = _tiny(quick_gelu=False)
    gelu.load_state_dict(tiny_clip.state_dict())
    assert np.abs(out[0] - _reference(gelu, tokenizer, ['table'])).max() > 1e-3


def test_other_models_are_refused(tiny_vit_b16):
    for name in ('ViT-L-14', 'ViT-B-32', 'RN50'):
        with pytest.raises(TextEncoderError, match=r'not the space of the SAB3R CLIP head.*'
                                                   r'OpenAI CLIP ViT-B/16'):
            ClipTextEncoder.from_pretrained(str(tiny_vit_b16), model_name=name)


def test_other_pretrained_weights_are_refused(tmp_path, tiny_vit_b16, caplog):
    with pytest.raises(TextEncoderError, match="'laion2b_s34b_b88k' weights, not OpenAI's"):
        ClipTextEncoder.from_pretrained('laion2b_s34b_b88k')
    laion = tmp_path / 'hub' / LAION_CACHE
    laion.parent.mkdir(parents=True)
    laion.write_bytes(tiny_vit_b16.read_bytes())
    with pytest.raises(TextEncoderError, match='text_encoder_allow_other_weights'):
        ClipTextEncoder.from_pretrained(str(laion))
    with pytest.raises(TextEncoderError, match='neither a weights file nor'):
        ClipTextEncoder.from_pretrained('opneai')
    # Opted in: loaded with the tag's own activation, and said loudly.
    with caplog.at_level(logging.ERROR, logger='ros2_sab3r.model.text'):
        enc = ClipTextEncoder.from_pretrained(str(laion), allow_other_weights=True)
    assert any('different space' in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    assert isinstance(enc._model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_weights_are_told_apart_by_name():
    assert other_weights('openai') is None
    assert other_weights('laion400m_e32') == 'laion400m_e32'
    assert other_weights(f'/cache/{LAION_CACHE}') == 'laion2b_s34b_b88k'
    assert other_weights('/models/models--timm--vit_base_patch16_clip_224.openai/snapshots/'
                         'deadbeef/open_clip_model.safetensors') is None
    assert other_weights('/models/datacomp_vit_b16.safetensors') == 'datacomp'
    assert other_weights('/home/robot/models/open_clip_model.safetensors') is None


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_torchscript_and_missing_files_say_what_to_provide(tmp_path, tiny_vit_b16):
    with pytest.raises(TextEncoderError, match='does not exist'):
        ClipTextEncoder.from_pretrained(str(tmp_path / 'missing.bin'))
    jit = tmp_path / 'ViT-B-16.pt'
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(jit))
    with pytest.raises(TextEncoderError, match='TorchScript archive'):
        ClipTextEncoder.from_pretrained(str(jit))


def test_clip_width_check_names_the_file_and_both_widths(tiny_vit_b16):
    enc = ClipTextEncoder.from_pretrained(str(tiny_vit_b16))
    check_clip_width(enc, 32)
    check_clip_width(enc, 0)  # no CLIP head: nothing to compare
    with pytest.raises(TextEncoderError) as err:
        check_clip_width(enc, 512)
    assert str(tiny_vit_b16) in str(err.value)
    assert 'in 32 dimensions' in str(err.value) and 'outputs 512-dimensional' in str(err.value)


def test_text_parameters_are_validated():
    cfg = config_from_flat({'model.text_prompts': 'ensemble'})
    assert cfg.model.text_prompts == 'ensemble'
    assert ModelConfig().text_prompts == 'raw'
    assert ModelConfig().text_encoder_allow_other_weights is False
    with pytest.raises(ValueError, match='model.text_prompts'):
        config_from_flat({'model.text_prompts': 'imagenet'})


def test_factory_applies_text_prompts_and_checks_width(tiny_vit_b16, tiny_clip, tokenizer):
    model = ModelConfig(text_encoder=str(tiny_vit_b16), text_prompts='single')
    enc = load_text_encoder(model, 32, None)
    assert enc.prompts == 'single'
    np.testing.assert_allclose(
        enc.encode(['apple'])[0], _reference(tiny_clip, tokenizer, ['a photo of an apple']),
        rtol=0, atol=1e-5)
    with pytest.raises(BackendUnavailable, match=rf'{tiny_vit_b16}.* 32 .* 512-dimensional'):
        load_text_encoder(model, 512, None)
    # Found beside the checkpoint when the parameter is empty.
    enc = load_text_encoder(ModelConfig(), 32, tiny_vit_b16.parent)
    assert enc.source == str(tiny_vit_b16) and enc.prompts == 'raw'


def test_factory_refuses_other_weights_and_recommends_openai(tmp_path):
    with pytest.raises(BackendUnavailable, match="not OpenAI's"):
        load_text_encoder(ModelConfig(text_encoder='laion2b_s34b_b88k'), 512, None)
    with pytest.raises(BackendUnavailable) as err:
        load_text_encoder(ModelConfig(), 512, tmp_path)
    assert "'openai'" in str(err.value) and 'laion' not in str(err.value).lower()
    with pytest.raises(BackendUnavailable, match='not an open_clip ViT-B-16 pretrained tag'):
        load_text_encoder(ModelConfig(text_encoder='opneai'), 512, None)


def test_factory_openai_tag_is_read_from_the_local_cache_only():
    # No weights in this machine's Hugging Face cache: a clear answer, no download attempt.
    with pytest.raises(BackendUnavailable, match='not in the local Hugging Face cache'):
        load_text_encoder(ModelConfig(text_encoder='openai'), 512, None)
    with pytest.raises(BackendUnavailable, match='not in the local Hugging Face cache'):
        load_text_encoder(ModelConfig(text_encoder='laion2b_s34b_b88k',
                                      text_encoder_allow_other_weights=True), 512, None)
