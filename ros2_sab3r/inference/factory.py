"""Backend selection from ``model.*`` parameters; the pipeline and node never know which runs."""

from __future__ import annotations

from dataclasses import dataclass
import importlib
from typing import Any

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.types import TextEncoder

BUILTIN_BACKENDS = ('torch', 'onnxruntime', 'tensorrt')


class BackendUnavailable(RuntimeError):
    """The configured backend cannot be created; the message says why and what to set."""


@dataclass(frozen=True)
class LoadedModel:
    backend: Any  # implements ros2_sab3r.pipeline.Backend
    text_encoder: TextEncoder
    description: str  # for logs and PerceptionStatus.backend


def _import_class(path: str):
    module_name, _, attr = path.partition(':')
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendUnavailable(f'model.backend={path!r}: cannot import {module_name}: {err}'
                                 ) from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise BackendUnavailable(f'model.backend={path!r}: {module_name} has no {attr!r}'
                                 ) from err


def load_model(model: ModelConfig) -> LoadedModel:
    """Create the backend and the text encoder named by the configuration.

    ``model.backend`` is a built-in name or ``'package.module:Class'``; such a class is built with
    ``Class.from_config(model)`` and may carry its own ``text_encoder`` (stand-ins do).
    """
    if ':' in model.backend:
        cls = _import_class(model.backend)
        factory = getattr(cls, 'from_config', None)
        if factory is None:
            raise BackendUnavailable(
                f'model.backend={model.backend!r} has no from_config(model_config) class method')
        try:
            backend = factory(model)
        except (ValueError, OSError) as err:
            raise BackendUnavailable(f'model.backend={model.backend!r}: {err}') from err
        text = getattr(backend, 'text_encoder', None)
        if text is None:
            raise BackendUnavailable(
                f'model.backend={model.backend!r} brings no text encoder; set '
                'model.text_encoder')
        return LoadedModel(backend, text, f'{getattr(backend, "name", model.backend)} '
                                          f'({getattr(backend, "device", "cpu")})')
    if not model.checkpoint:
        raise BackendUnavailable(
            'no model loaded: model.checkpoint is empty (give a SAB3R/MASt3R checkpoint, a '
            'Hugging Face repo id or an ONNX/engine directory)')
    raise BackendUnavailable(
        f'the {model.backend!r} inference backend is not part of this build yet; '
        f'model.checkpoint={model.checkpoint!r} was not loaded')
