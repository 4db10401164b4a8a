"""Text encoder for open-vocabulary queries: OpenAI CLIP ViT-B/16's text tower, via open_clip.

SAB3R's CLIP head was distilled from MaskCLIP features of OpenAI's CLIP ViT-B/16, so text must be
embedded by that model's text tower: open_clip ``ViT-B-16`` with the ``'openai'`` weights and
QuickGELU activations (open_clip builds ``ViT-B-16`` with nn.GELU unless told otherwise; the
OpenAI weights were trained with QuickGELU). Other pretrained ViT-B-16 towers (LAION, DataComp,
...) have the same shapes but live in a different embedding space; they are refused unless the
caller opts in.

How a query becomes text (``prompts``, parameter ``model.text_prompts``):

- ``'raw'``: the query itself, as the official demo embeds it (the default);
- ``'single'``: ``'a photo of a {query}'`` (``'an'`` before a vowel), the official VOC evaluation;
- ``'ensemble'``: CLIP's ImageNet zero-shot protocol: the query in 80 templates, each prompt
  embedded and L2-normalised, the mean L2-normalised again.

Results are cached per query string.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
import logging
from pathlib import Path
import re
import threading

import numpy as np
import torch
from torch import nn

from ros2_sab3r.config import TEXT_PROMPTS

logger = logging.getLogger(__name__)

# The space of the SAB3R CLIP head (see the module docstring).
CLIP_MODEL = 'ViT-B-16'
CLIP_WEIGHTS = 'openai'
CLIP_SPACE = "OpenAI CLIP ViT-B/16 (open_clip 'ViT-B-16', pretrained 'openai', QuickGELU)"
# Where a user gets those weights as an open_clip state dict (named in error messages).
OPENAI_WEIGHTS_FILE = ('open_clip_model.safetensors of the Hugging Face repo '
                       'timm/vit_base_patch16_clip_224.openai')
# Families of the other pretrained ViT-B-16 weights open_clip knows; a file whose name (or Hugging
# Face cache folder) contains one of them is taken for those weights.
OTHER_WEIGHT_FAMILIES = ('laion', 'datacomp', 'commonpool', 'dfn', 'metaclip')

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


def prompts_for(text: str, prompts: str) -> tuple[str, ...]:
    """The prompt(s) a query is embedded as under ``prompts`` ('raw', 'single', 'ensemble')."""
    if prompts == 'raw':
        return (text,)
    if prompts == 'single':
        article = 'an' if text[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'
        return (f'a photo of {article} {text}',)
    if prompts == 'ensemble':
        return tuple(t.format(text) for t in IMAGENET_TEMPLATES)
    raise ValueError(f'prompts={prompts!r} is not one of {", ".join(TEXT_PROMPTS)}')


def _is_path(weights: str) -> bool:
    p = Path(weights).expanduser()
    return p.is_file() or '/' in weights or p.suffix in ('.bin', '.pt', '.pth', '.safetensors')


def _squash(name: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', name.lower())


def other_weights(weights: str) -> str | None:
    """What a pretrained tag or weights file is, when it is not OpenAI's ViT-B-16; else None.

    A tag other than 'openai' names itself. A file cannot be told apart by its tensors (every
    ViT-B-16 has the same keys and shapes), so its name is read: the file name, its folder and
    a Hugging Face cache folder (``models--org--repo``) are searched for an open_clip ViT-B-16
    tag (e.g. 'laion2b_s34b_b88k') or a family of them (:data:`OTHER_WEIGHT_FAMILIES`). A file
    named after nothing is taken for the OpenAI weights.
    """
    if not _is_path(weights):
        return None if weights == CLIP_WEIGHTS else weights
    import open_clip

    path = Path(weights).expanduser()
    parts = [path.name, path.parent.name] + [q for q in path.parts if q.startswith('models--')]
    text = '_' + '_'.join(_squash(q) for q in parts) + '_'
    for tag in open_clip.list_pretrained_tags_by_model(CLIP_MODEL):
        if tag != CLIP_WEIGHTS and f'_{_squash(tag)}_' in text:
            return tag
    for family in OTHER_WEIGHT_FAMILIES:
        if family in text:
            return family
    return None


def check_text_weights(weights: str, allow_other_weights: bool = False) -> str | None:
    """Refuse (TextEncoderError) weights that are not OpenAI's ViT-B-16, unless allowed.

    Returns what :func:`other_weights` found (None for the OpenAI weights). Allowed other
    weights are logged as an error: queries then compare vectors of two different spaces.
    """
    other = other_weights(weights)
    if other is None:
        return None
    problem = (f"text encoder weights {weights!r} are the {other!r} weights, not OpenAI's: they "
               f'embed text into a different space than the SAB3R CLIP head, which was '
               f'distilled into {CLIP_SPACE}; similarities with the map would be meaningless')
    if not allow_other_weights:
        raise TextEncoderError(
            f"{problem}. Use the open_clip {CLIP_MODEL} '{CLIP_WEIGHTS}' weights (e.g. "
            f'{OPENAI_WEIGHTS_FILE}), or set model.text_encoder_allow_other_weights for an '
            'experiment')
    logger.error('%s (accepted because model.text_encoder_allow_other_weights is set)', problem)
    return other


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in archive.namelist())


def check_clip_width(encoder, clip_dim: int) -> None:
    """Raise TextEncoderError unless ``encoder`` embeds into the CLIP head's width.

    ``clip_dim``: channels of the network's CLIP feature map as the backend reports it (512 for
    the SAB3R release); 0 means the network has no CLIP head and nothing is checked.
    """
    if not clip_dim:
        return
    dim = int(encoder.dim)
    if dim != clip_dim:
        source = getattr(encoder, 'source', '') or type(encoder).__name__
        raise TextEncoderError(
            f"text encoder {source} embeds text in {dim} dimensions but the network's CLIP head "
            f'outputs {clip_dim}-dimensional features; model.text_encoder must be the text tower '
            f'of the space the head was distilled into ({CLIP_SPACE}, 512 dimensions for the '
            'SAB3R release)')


class ClipTextEncoder:
    """Implements :class:`ros2_sab3r.types.TextEncoder` with an open_clip model's text tower.

    ``model`` is any module with ``encode_text(tokens) -> (N, dim)``; ``tokenizer`` maps a list of
    strings to a (N, context) token tensor; ``prompts`` is one of 'raw', 'single', 'ensemble'
    (module docstring); ``source`` names the weights in error messages. Thread-safe: queries may
    come from service callbacks.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 prompts: str = 'raw', device: torch.device | str = 'cpu',
                 batch_size: int = 160, cache_size: int = 4096, source: str = '') -> None:
        if prompts not in TEXT_PROMPTS:
            raise ValueError(f'prompts={prompts!r} is not one of {", ".join(TEXT_PROMPTS)}')
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer
        self._prompts = prompts
        self._device = torch.device(device)
        self._batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        projection = getattr(model, 'text_projection', None)
        # The width is the projection's when there is one; otherwise known after one encode.
        self._dim: int | None = (int(projection.shape[-1]) if isinstance(projection, torch.Tensor)
                                 and projection.ndim == 2 else None)
        self.source = source

    @classmethod
    def from_pretrained(cls, weights: str = CLIP_WEIGHTS, model_name: str = CLIP_MODEL, *,
                        prompts: str = 'raw', allow_other_weights: bool = False,
                        device: torch.device | str = 'cpu', **kwargs) -> ClipTextEncoder:
        """The text tower of the SAB3R CLIP head's space from a local file or a pretrained tag.

        ``weights``: a local open_clip state-dict file (.safetensors, .bin, .pt) of the ViT-B-16
        'openai' weights, or the tag 'openai' (downloaded on first use by open_clip, so a
        connected machine or the local Hugging Face cache). ``model_name`` must be 'ViT-B-16'
        (the only space the head knows); the tower is always built with QuickGELU for the
        OpenAI weights. Weights other than OpenAI's raise TextEncoderError unless
        ``allow_other_weights`` (then they are loaded with their own activation and logged as
        an error). ``kwargs`` go to the constructor.
        """
        import open_clip

        if model_name not in (CLIP_MODEL, f'{CLIP_MODEL}-quickgelu'):
            raise TextEncoderError(
                f'text tower {model_name!r} is not the space of the SAB3R CLIP head, which was '
                f'distilled into {CLIP_SPACE}; use model_name={CLIP_MODEL!r}')
        is_path = _is_path(weights)
        local = Path(weights).expanduser()
        if is_path and not local.is_file():
            raise TextEncoderError(
                f'text encoder weights file {local} does not exist; pass a local open_clip '
                f"{CLIP_MODEL} '{CLIP_WEIGHTS}' checkpoint, or the tag '{CLIP_WEIGHTS}' on a "
                'connected machine')
        if not is_path and weights not in open_clip.list_pretrained_tags_by_model(CLIP_MODEL):
            raise TextEncoderError(
                f'{weights!r} is neither a weights file nor an open_clip {CLIP_MODEL} pretrained '
                f"tag; use '{CLIP_WEIGHTS}' or the path of its weights file")
        other = check_text_weights(weights, allow_other_weights)
        if is_path and _is_torchscript(local):
            raise TextEncoderError(
                f"text encoder weights file {local} is a TorchScript archive (OpenAI's original "
                'ViT-B-16.pt); give the open_clip state dict of the same weights instead '
                f'({OPENAI_WEIGHTS_FILE})')
        quick_gelu = True
        if other is not None:
            tag_cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, other) or {}
            quick_gelu = bool(tag_cfg.get('quick_gelu', False))
        try:
            model = open_clip.create_model(
                CLIP_MODEL, pretrained=str(local) if is_path else weights, device='cpu',
                force_quick_gelu=quick_gelu)
        except Exception as exc:  # noqa: BLE001 - missing tag, offline, bad file: same advice
            where = f'file {local}' if is_path else f'open_clip pretrained tag {weights!r}'
            raise TextEncoderError(
                f'cannot load the {CLIP_MODEL} text tower from {where} ({type(exc).__name__}: '
                f"{exc}). Offline, download the open_clip {CLIP_MODEL} '{CLIP_WEIGHTS}' "
                'weights on a connected machine and pass the local file') from None
        # Only the text tower is used; free the image tower's memory.
        model.visual = None
        return cls(model, open_clip.get_tokenizer(CLIP_MODEL), prompts=prompts, device=device,
                   source=str(local) if is_path else f'open_clip tag {weights!r}', **kwargs)

    @property
    def prompts(self) -> str:
        return self._prompts

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
        """(N, dim) float32 unit-norm embeddings, one per text (its prompts' normalised mean)."""
        if isinstance(texts, str):
            raise TypeError('encode takes a sequence of strings, not a single string')
        with self._lock:
            todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if todo:
                per_text = len(prompts_for('x', self._prompts))
                prompts = [p for t in todo for p in prompts_for(t, self._prompts)]
                emb = self._embed_prompts(prompts).reshape(len(todo), per_text, -1)
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
