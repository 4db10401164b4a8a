"""Text encoder for open-vocabulary queries: the open_clip ViT-B-16 text tower.

A query is embedded with the CLIP zero-shot protocol the SAB3R paper follows: the query is put
into 80 ImageNet prompt templates, each prompt is embedded and L2-normalised, the mean is
L2-normalised again. Results are cached per query string.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
import logging
from pathlib import Path
import threading

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al. 2021).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)


class TextEncoderError(RuntimeError):
    """The text tower cannot be created or loaded; the message says what to provide."""


class ClipTextEncoder:
    """Implements :class:`ros2_sab3r.types.TextEncoder` with an open_clip model's text tower.

    ``model`` is any module with ``encode_text(tokens) -> (N, dim)``; ``tokenizer`` maps a list of
    strings to a (N, context) token tensor. Thread-safe: queries may come from service callbacks.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 templates: Sequence[str] = IMAGENET_TEMPLATES,
                 device: torch.device | str = 'cpu', batch_size: int = 160,
                 cache_size: int = 4096) -> None:
        if not templates or any('{}' not in t for t in templates):
            raise ValueError('every prompt template must contain {} for the query')
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer
        self._templates = tuple(templates)
        self._device = torch.device(device)
        self._batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._dim: int | None = None

    @classmethod
    def from_pretrained(cls, weights: str, model_name: str = 'ViT-B-16',
                        device: torch.device | str = 'cpu', **kwargs) -> ClipTextEncoder:
        """Create the text tower from a local weights file or an open_clip pretrained tag.

        A tag (e.g. ``'openai'``) downloads on first use and so needs a connected machine.
        """
        import open_clip

        local = Path(weights).expanduser()
        is_file = local.is_file()
        if not is_file and ('/' in weights or local.suffix in ('.bin', '.pt', '.pth',
                                                                '.safetensors')):
            raise TextEncoderError(
                f'text encoder weights file {local} does not exist; pass a local open_clip '
                f'{model_name} checkpoint or an open_clip pretrained tag (connected machine)')
        try:
            model = open_clip.create_model(
                model_name, pretrained=str(local) if is_file else weights, device='cpu')
        except Exception as exc:  # noqa: BLE001 - missing tag, offline, bad file: same advice
            where = f'file {local}' if is_file else f'open_clip pretrained tag {weights!r}'
            raise TextEncoderError(
                f'cannot load the {model_name} text tower from {where} ({type(exc).__name__}: '
                f'{exc}). Offline, download the open_clip {model_name} checkpoint on a connected '
                f'machine and pass its local path') from None
        # Only the text tower is used; free the image tower's memory.
        model.visual = None
        return cls(model, open_clip.get_tokenizer(model_name), device=device, **kwargs)

    @property
    def templates(self) -> tuple[str, ...]:
        return self._templates

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(['object']).shape[1])
        return self._dim

    @torch.no_grad()
    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self._batch_size):
            tokens = self._tokenizer(prompts[start:start + self._batch_size]).to(self._device)
            emb = self._model.encode_text(tokens).float()  # (n, dim)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 unit-norm embeddings, one per text (template ensemble averaged)."""
        if isinstance(texts, str):
            raise TypeError('encode takes a sequence of strings, not a single string')
        with self._lock:
            todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if todo:
                prompts = [tpl.format(t) for t in todo for tpl in self._templates]
                emb = self._embed_prompts(prompts).reshape(len(todo), len(self._templates), -1)
                mean = emb.mean(dim=1)
                mean = (mean / mean.norm(dim=-1, keepdim=True)).cpu().numpy().astype(np.float32)
                for text, vec in zip(todo, mean):
                    self._cache[text] = vec
            rows = []
            for t in texts:
                self._cache.move_to_end(t)
                rows.append(self._cache[t])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if not rows:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        out = np.stack(rows)
        self._dim = int(out.shape[1])
        return out
