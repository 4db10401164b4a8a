"""CLIP text encoder: prompt-ensemble protocol, caching, protocol conformance; random weights."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from ros2_sab3r.model.text import IMAGENET_TEMPLATES, ClipTextEncoder, TextEncoderError
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


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rows = 0

    def encode_text(self, tokens):
        self.rows += tokens.shape[0]
        return self.model.encode_text(tokens)


@pytest.fixture(scope='module')
def tiny_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP)


@pytest.fixture()
def encoder(tiny_clip):
    return ClipTextEncoder(_CountingModel(tiny_clip), open_clip.get_tokenizer('ViT-B-16'))


def test_templates_are_the_80_imagenet_prompts():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count('{}') == 1 for t in IMAGENET_TEMPLATES)
    assert 'a photo of a {}.' in IMAGENET_TEMPLATES and 'itap of my {}.' in IMAGENET_TEMPLATES


def test_encode_is_the_normalised_mean_of_normalised_prompts(encoder, tiny_clip):
    out = encoder.encode(['chair', 'red mug'])
    assert out.shape == (2, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=0, atol=1e-6)
    tok = open_clip.get_tokenizer('ViT-B-16')
    with torch.no_grad():
        emb = tiny_clip.encode_text(tok([t.format('red mug') for t in IMAGENET_TEMPLATES]))
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(0)
    np.testing.assert_allclose(out[1], (mean / mean.norm()).numpy(), rtol=0, atol=1e-5)
    assert isinstance(encoder, TextEncoder)
    assert encoder.dim == 32


def test_cache_per_query(encoder):
    first = encoder.encode(['lamp', 'lamp', 'sofa'])
    assert encoder._model.rows == 2 * 80  # duplicates embedded once
    again = encoder.encode(['sofa', 'lamp'])
    assert encoder._model.rows == 2 * 80  # served from the cache
    np.testing.assert_array_equal(again, first[[2, 0]])
    assert encoder.encode([]).shape == (0, 32)
    with pytest.raises(TypeError):
        encoder.encode('lamp')


def test_from_local_weights_file(tmp_path, tiny_clip):
    cfg_path = tmp_path / 'tiny-clip-test.json'
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg_path)
    weights = tmp_path / 'tiny.pt'
    torch.save(tiny_clip.state_dict(), weights)
    enc = ClipTextEncoder.from_pretrained(str(weights), model_name='tiny-clip-test')
    ref = ClipTextEncoder(tiny_clip, open_clip.get_tokenizer('ViT-B-16'))
    np.testing.assert_allclose(enc.encode(['table']), ref.encode(['table']), rtol=0, atol=1e-6)
    assert enc._model.visual is None  # image tower dropped


def test_missing_weights_file_says_what_to_provide(tmp_path):
    with pytest.raises(TextEncoderError, match='does not exist'):
        ClipTextEncoder.from_pretrained(str(tmp_path / 'missing.bin'))
