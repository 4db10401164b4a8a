"""Backend selection from ``model.*`` parameters; the pipeline and node never know which runs.

``load_model(ModelConfig) -> LoadedModel`` builds every backend the same way,
``Class.from_config(model)``, where ``model.backend`` names the class:

- ``torch``: :class:`~ros2_sab3r.inference.torch_backend.TorchBackend` from ``model.checkpoint``
  (checkpoint file, directory or Hugging Face repo id);
- ``onnxruntime``: :class:`~ros2_sab3r.inference.ort_backend.OnnxRuntimeBackend` from an
  ``sab3r-export`` directory in ``model.checkpoint``;
- ``tensorrt``: :class:`~ros2_sab3r.inference.trt_backend.TensorRTBackend` from the same export
  directory (engines built on first use and cached, see ``sab3r-build-engine``);
- ``'package.module:Class'``: any class with ``from_config`` (the package's stand-ins);

plus the CLIP text encoder (the backend's own when it brings one, as the stand-ins do), whose
width is checked against the backend's CLIP features whichever backend it is. Every failure is a
:class:`BackendUnavailable` saying what to set; nothing here downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
import importlib
import logging
from pathlib import Path

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.inference.base import Backend, BackendUnavailable
from ros2_sab3r.model.preprocess import PATCH_SIZE, check_patch_multiple
from ros2_sab3r.types import TextEncoder

log = logging.getLogger(__name__)

# model.backend name -> the class built with Class.from_config(model) (imported when chosen).
BUILTIN_BACKENDS = {
    'torch': 'ros2_sab3r.inference.torch_backend:TorchBackend',
    'onnxruntime': 'ros2_sab3r.inference.ort_backend:OnnxRuntimeBackend',
    'tensorrt': 'ros2_sab3r.inference.trt_backend:TensorRTBackend',
}
# Text tower weights looked for beside the checkpoint / in the export directory.
TEXT_WEIGHT_PATTERNS = ('open_clip*.safetensors', 'open_clip*.bin', 'text_encoder*.safetensors',
                        'text_encoder*.bin', 'text_encoder*.pt', 'text_encoder*.pth')


@dataclass(frozen=True)
class LoadedModel:
    backend: Backend
    text_encoder: TextEncoder
    description: str  # for logs and PerceptionStatus.backend


def _import_class(path: str, what: str = 'model.backend'):
    module_name, _, attr = path.partition(':')
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendUnavailable(f'{what}={path!r}: cannot import {module_name}: {err}'
                                 ) from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise BackendUnavailable(f'{what}={path!r}: {module_name} has no {attr!r}') from err


def _build_backend(model: ModelConfig) -> Backend:
    cls = _import_class(BUILTIN_BACKENDS.get(model.backend, model.backend))
    if not callable(getattr(cls, 'from_config', None)):
        raise BackendUnavailable(
            f'model.backend={model.backend!r} has no from_config(model_config) class method')
    try:
        return cls.from_config(model)
    except (ValueError, OSError) as err:
        raise BackendUnavailable(f'model.backend={model.backend!r}: {err}') from err


def _cached_open_clip_weights(tag: str) -> Path | None:
    """The local Hugging Face cache file of an open_clip pretrained tag, or None (no download)."""
    from huggingface_hub import try_to_load_from_cache
    import open_clip

    from ros2_sab3r.model.text import CLIP_MODEL

    cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, tag) or {}
    hub = cfg.get('hf_hub', '').strip('/')
    if not hub:
        return None
    parts = hub.split('/')
    repo_id = '/'.join(parts[:2])
    # 'org/repo/' names the default files; 'org/repo/file.bin' one file.
    names = (['/'.join(parts[2:])] if len(parts) > 2 else
             ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin'])
    for name in names:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return Path(found)
    return None


def load_text_encoder(model: ModelConfig, clip_dim: int, search_dir: Path | None
                      ) -> TextEncoder:
    """The text encoder named by ``model.text_encoder`` (see its parameter description).

    The open_clip tower is OpenAI CLIP ViT-B/16 with ``model.text_prompts``; other pretrained
    weights are refused unless ``model.text_encoder_allow_other_weights``. ``clip_dim``: the
    backend's CLIP feature width (0: no CLIP head); a tower of another width is refused.
    """
    from ros2_sab3r.model.text import (
        CLIP_MODEL,
        CLIP_WEIGHTS,
        OPENAI_WEIGHTS_FILE,
        ClipTextEncoder,
        TextEncoderError,
        check_text_weights,
    )

    spec = model.text_encoder.strip()
    allow_other = model.text_encoder_allow_other_weights
    if ':' in spec and not Path(spec).expanduser().exists():
        cls = _import_class(spec, 'model.text_encoder')
        encoder = cls(dim=clip_dim) if clip_dim else cls()
    else:
        path = None
        if not spec:
            candidates = [] if search_dir is None else sorted(
                {p for pat in TEXT_WEIGHT_PATTERNS for p in search_dir.glob(pat)})
            if len(candidates) != 1:
                where = search_dir or 'the checkpoint directory'
                found = f' (found {[c.name for c in candidates]})' if candidates else ''
                raise BackendUnavailable(
                    f'no CLIP text encoder: model.text_encoder is empty and {where} holds no '
                    f'single open_clip*/text_encoder* weights file{found}. On a connected '
                    f"machine get the open_clip {CLIP_MODEL} '{CLIP_WEIGHTS}' weights (OpenAI "
                    f'CLIP ViT-B/16, the space the SAB3R CLIP head was distilled into), e.g. '
                    f'{OPENAI_WEIGHTS_FILE}, and set model.text_encoder to the file or put it '
                    'beside the checkpoint')
            path = candidates[0]
        elif Path(spec).expanduser().is_file():
            path = Path(spec).expanduser()
        elif '/' in spec or Path(spec).suffix:
            raise BackendUnavailable(
                f'model.text_encoder={spec!r}: no such file; give the local path of the open_clip '
                f"{CLIP_MODEL} '{CLIP_WEIGHTS}' weights ({OPENAI_WEIGHTS_FILE})")
        else:
            try:
                import open_clip

                if spec not in open_clip.list_pretrained_tags_by_model(CLIP_MODEL):
                    raise BackendUnavailable(
                        f'model.text_encoder={spec!r} is not an open_clip {CLIP_MODEL} '
                        f"pretrained tag nor a file; use '{CLIP_WEIGHTS}' or a file path")
                if not allow_other:
                    check_text_weights(spec)
                path = _cached_open_clip_weights(spec)
            except TextEncoderError as exc:
                raise BackendUnavailable(f'model.text_encoder: {exc}') from None
            except BackendUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - hub library missing, odd cache
                raise BackendUnavailable(
                    f'model.text_encoder={spec!r}: cannot look up the open_clip {CLIP_MODEL} '
                    f'weights of this tag ({exc})') from None
            if path is None:
                raise BackendUnavailable(
                    f'model.text_encoder={spec!r}: the open_clip {CLIP_MODEL} weights of this '
                    'tag are not in the local Hugging Face cache and nothing is downloaded at run '
                    'time; download them on a connected machine (open_clip.create_model('
                    f"'{CLIP_MODEL}', pretrained='{spec}')) or set model.text_encoder to a file")
        try:
            encoder = ClipTextEncoder.from_pretrained(
                str(path), CLIP_MODEL, prompts=model.text_prompts,
                allow_other_weights=allow_other, device=model.device)
        except TextEncoderError as exc:
            raise BackendUnavailable(f'text encoder: {exc}') from None
    _check_clip_width(encoder, clip_dim)
    return encoder


def _check_clip_width(encoder: TextEncoder, clip_dim: int) -> None:
    from ros2_sab3r.model.text import TextEncoderError, check_clip_width

    try:
        check_clip_width(encoder, clip_dim)
    except TextEncoderError as exc:
        raise BackendUnavailable(str(exc)) from None


def _checkpoint_dir(model: ModelConfig) -> Path | None:
    path = Path(model.checkpoint).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    return None  # a Hugging Face repo id


def load_model(model: ModelConfig) -> LoadedModel:
    """Create the backend and the text encoder named by the configuration.

    ``model.backend`` is a built-in name or ``'package.module:Class'``; either way the class is
    built with ``Class.from_config(model)``. A backend that brings its own ``text_encoder``
    (stand-ins do) keeps it; otherwise ``model.text_encoder`` is loaded. Either is checked
    against the backend's ``clip_dim``.
    """
    if ':' not in model.backend:
        if model.backend == 'none':
            raise BackendUnavailable("model.backend='none' names no network (the node runs "
                                     'without one); choose torch, onnxruntime or tensorrt')
        if model.backend not in BUILTIN_BACKENDS:
            raise BackendUnavailable(f'model.backend={model.backend!r} is not one of '
                                     f'{", ".join(BUILTIN_BACKENDS)} nor a module:Class path')
        if not model.checkpoint:
            raise BackendUnavailable(
                'no model loaded: model.checkpoint is empty (give a SAB3R/MASt3R checkpoint or '
                'Hugging Face repo id for torch, an sab3r-export directory for onnxruntime and '
                'tensorrt)')
        try:
            check_patch_multiple((model.image_height, model.image_width), PATCH_SIZE,
                                 'model.image_height x model.image_width')
        except ValueError as exc:
            raise BackendUnavailable(f'{exc}; set both to multiples of {PATCH_SIZE}') from None
    backend = _build_backend(model)
    if backend.text_encoder is not None:
        text = backend.text_encoder
        _check_clip_width(text, backend.clip_dim)
    else:
        text = load_text_encoder(model, backend.clip_dim, _checkpoint_dir(model))
    log.info('loaded %s at %dx%d', backend.name, *backend.input_size)
    return LoadedModel(backend, text, f'{backend.name} ({backend.device})')
