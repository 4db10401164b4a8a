"""Loading and saving network weights.

Accepted sources (:func:`load_network`):

* an official MASt3R/SAB3R training checkpoint (``torch.save`` of ``{'model', 'args', ...}``),
  read with ``weights_only=True`` and only ``argparse.Namespace`` allowed; the architecture comes
  from parsing ``args.model`` (a constructor-call string, SAB3R's ``clip_head_type`` and
  ``dino_head_type`` included) without evaluating it;
* the official SAB3R release file (``demo_ckpt/base/base.pt``): a DeepSpeed model-states dict
  whose ``module`` is the state dict, with plain bookkeeping values and no architecture; it is the
  release architecture (:data:`RELEASE_ARCHITECTURE`) unless the caller names another;
* our own format: ``NAME.safetensors`` with the architecture JSON in its metadata (and a
  ``NAME.json`` beside it for people), no pickle;
* a directory in the Hugging Face layout (``model.safetensors`` + ``config.json``, the config being
  either ours or the official constructor keyword arguments);
* a Hugging Face repo id (``naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric``), or a repo
  id followed by a file inside it (``uva-cv-lab/SAB3R/demo_ckpt/base/base.pt``), downloaded with
  ``huggingface_hub`` on a connected machine (offline: its local cache only).

Every load is strict by default: missing, unexpected and mis-shaped keys are reported together,
naming the file.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Mapping
from dataclasses import dataclass
import json
import logging
import math
import os
from pathlib import Path
import pickle
import re
from typing import Any

import torch

from ros2_sab3r.model.arch import (
    ConfigError,
    FeatureHeadConfig,
    NetworkConfig,
    OutputMode,
    load_config,
)
from ros2_sab3r.model.network import Sab3rNet, create_network

logger = logging.getLogger(__name__)

FORMAT_NAME = 'ros2_sab3r'
# 2: feature heads inside each view's head (downstream_head{v}.clip_head.*), as released.
# 1: feature heads at the top level (clip_head{v}.dpt.*); read and converted on load.
FORMAT_VERSION = 2
# The network the official demo builds for the release weights (sab3r_spec section 0).
RELEASE_ARCHITECTURE = 'sab3r_cd'
# Feature widths of the official heads: CLIP ViT-B/16 space, DINOv2 ViT-S/14 space.
OFFICIAL_FEATURE_DIMS = {'clip': 512, 'dino': 384}
OFFICIAL_FEATURE_HEAD_TYPES = ('dpt', 'linear')
HF_WEIGHTS = 'model.safetensors'
HF_CONFIG = 'config.json'
OFFICIAL_CLASSES = ('AsymmetricMASt3R',)
# A repo id 'owner/name', optionally followed by '/path/inside/the/repo'.
_HUB_PATH = re.compile(
    r'^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w.-]+(?:/[\w.-]+)*))?$')
# Official constructor arguments that do not change the inference network (see the spec: the
# official loader forces the plain patch embed and landscape_only=False).
_IGNORED_KWARGS = frozenset({
    'patch_embed_cls', 'img_size', 'landscape_only', 'freeze', 'mask_ratio', 'croco_kwargs'})


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the network; the message names the file."""


# ---------------------------------------------------------------------------- args string
def parse_constructor_call(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``Name(key=value, ...)`` without evaluating it.

    Values may be numbers, strings, booleans, None, ``inf``, negatives, tuples and lists of those.
    Anything else (calls, attributes, positional arguments, expressions) is rejected.
    """
    try:
        tree = ast.parse(text.strip(), mode='eval')
    except SyntaxError as exc:
        raise ValueError(f'model string is not a constructor call: {text!r} ({exc.msg})') from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError(f'model string is not a call of a plain class name: {text!r}')
    if call.args:
        raise ValueError(f'model string has positional arguments, only keywords are accepted: '
                         f'{text!r}')
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f'model string uses **kwargs: {text!r}')
        kwargs[kw.arg] = _literal(kw.value, text)
    return call.func.id, kwargs


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool,
                                                                   type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in ('inf', 'nan'):
        return float(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, text)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f'sign applied to a non-number in model string {text!r}')
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e, text) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    raise ValueError(f'unsupported value {ast.dump(node)} in model string {text!r}')


def config_from_official(class_name: str, kwargs: Mapping[str, Any],
                         name: str = 'official') -> NetworkConfig:
    """Map official AsymmetricMASt3R constructor arguments onto a :class:`NetworkConfig`."""
    if class_name not in OFFICIAL_CLASSES:
        raise ConfigError(
            f'model class {class_name!r} is not supported (only {OFFICIAL_CLASSES}); pass an '
            f'explicit architecture config (e.g. sab3r_cd) instead')
    kw = dict(kwargs)
    values: dict[str, Any] = {'name': name}
    for key in ('enc_embed_dim', 'enc_depth', 'enc_num_heads', 'dec_embed_dim', 'dec_depth',
                'dec_num_heads', 'head_type', 'output_mode', 'pos_embed'):
        if key not in kw:
            raise ConfigError(f'official model arguments lack {key!r}: {dict(kwargs)}')
    for key in ('enc_embed_dim', 'enc_depth', 'enc_num_heads', 'dec_embed_dim', 'dec_depth',
                'dec_num_heads', 'patch_size', 'mlp_ratio', 'norm_im2_in_dec', 'two_confs',
                'desc_mode', 'head_type'):
        if key in kw:
            values[key] = kw.pop(key)
    pos_embed = str(kw.pop('pos_embed'))
    match = re.fullmatch(r'RoPE(\d+(?:\.\d*)?)', pos_embed)
    if not match:
        raise ConfigError(f"pos_embed {pos_embed!r} is not supported (only 'RoPE<base>')")
    values['rope_base'] = float(match.group(1))
    output_mode = str(kw.pop('output_mode'))
    match = re.fullmatch(r'pts3d\+desc(\d+)', output_mode)
    if not match:
        raise ConfigError(f"output_mode {output_mode!r} is not supported (only 'pts3d+desc<N>')")
    values['desc_dim'] = int(match.group(1))
    values.setdefault('two_confs', False)
    conf_mode = kw.pop('conf_mode', ('exp', 1, math.inf))
    values['depth_mode'] = OutputMode.from_json(kw.pop('depth_mode', ('exp', -math.inf, math.inf)))
    values['conf_mode'] = OutputMode.from_json(conf_mode)
    desc_conf_mode = kw.pop('desc_conf_mode', None)
    # Absent (the SAB3R release) means the confidence mode: desc_conf = 1 + exp(x) there.
    values['desc_conf_mode'] = OutputMode.from_json(desc_conf_mode or conf_mode)
    heads = []
    for head_name, out_dim in OFFICIAL_FEATURE_DIMS.items():
        head_type = kw.pop(f'{head_name}_head_type', None)
        if head_type is None:
            continue
        if head_type not in OFFICIAL_FEATURE_HEAD_TYPES:
            raise ConfigError(
                f'{head_name}_head_type={head_type!r} is not a SAB3R head type (None, '
                f'{", ".join(map(repr, OFFICIAL_FEATURE_HEAD_TYPES))})')
        heads.append(FeatureHeadConfig(head_name, out_dim, head_type=head_type))
    values['feature_heads'] = tuple(heads)
    for key in sorted(set(kw) - _IGNORED_KWARGS):
        logger.warning('official model argument %s=%r is not used by ros2_sab3r', key, kw[key])
    return NetworkConfig(**values)


# ---------------------------------------------------------------------------- state dicts
def alias_groups(net: Sab3rNet) -> list[list[str]]:
    """State-dict names that refer to one tensor (e.g. 'layer1_rn' and 'layer_rn.0')."""
    groups: dict[int, list[str]] = {}
    for key, tensor in net.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return [names for names in groups.values() if len(names) > 1]


def adapt_state_dict(state: Mapping[str, torch.Tensor], net: Sab3rNet, source: str,
                     strict: bool = True) -> dict[str, torch.Tensor]:
    """Bring a checkpoint state dict into the network's layout and check it against ``net``.

    Applies, in order: removal of a DDP ``module.`` prefix, the official ``dec_blocks2`` rule
    (copied from ``dec_blocks`` when absent), and alias filling. With ``strict`` any missing,
    unexpected or mis-shaped key raises :class:`CheckpointError`.
    """
    sd = dict(state)
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    if not any(k.startswith('dec_blocks2.') for k in sd):
        # Official rule (checkpoints initialised from CroCo): view 2 starts from view 1's decoder.
        # A copy, not a shared tensor: the two decoders are independent weights.
        sd.update({'dec_blocks2.' + k[len('dec_blocks.'):]: v.clone()
                   for k, v in list(sd.items()) if k.startswith('dec_blocks.')})
    for names in alias_groups(net):
        present = [n for n in names if n in sd]
        if not present:
            continue
        first = sd[present[0]]
        for other in present[1:]:
            if sd[other].shape != first.shape or not torch.equal(sd[other], first):
                raise CheckpointError(
                    f'checkpoint {source}: alias keys {present[0]} and {other} should hold the '
                    f'same tensor but differ')
        for n in names:
            sd.setdefault(n, first)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f'{k}: checkpoint {tuple(sd[k].shape)} vs network {expected[k]}'
                        for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        report = (f'checkpoint {source} does not fit the {net.cfg.name!r} architecture: '
                  f'{_listing("missing", missing)}{_listing("unexpected", unexpected)}'
                  f'{_listing("wrong shape", mismatched)}')
        if strict or mismatched:
            raise CheckpointError(report.rstrip() + _fit_hint(missing, unexpected))
        logger.warning('%s', report)
        for k in unexpected:
            del sd[k]
    return sd


def _fit_hint(missing: list[str], unexpected: list[str]) -> str:
    def heads(keys: list[str]) -> set[str]:
        return {part for k in keys for part in ('clip_head', 'dino_head') if f'.{part}.' in k}

    extra, absent = heads(unexpected), heads(missing)
    if extra:
        return (f'; the file has {" and ".join(sorted(extra))} weights: choose an architecture '
                f'with those heads (sab3r_cd, the release; sab3r_c for CLIP only)')
    if absent:
        return (f'; the file lacks {" and ".join(sorted(absent))} weights: choose an '
                f'architecture without them (mast3r_vitl_512 for plain MASt3R)')
    return ''


def _listing(label: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ''
    shown = ', '.join(keys[:limit]) + (f', ... ({len(keys) - limit} more)' if len(keys) > limit
                                       else '')
    return f'[{len(keys)} {label}: {shown}] '


def _build_and_load(cfg: NetworkConfig, state: Mapping[str, torch.Tensor], source: str,
                    strict: bool, device: torch.device | str) -> Sab3rNet:
    # Strict loads fill every tensor, so build without allocating random weights first.
    net = create_network(cfg, 'meta' if strict else 'cpu')
    sd = adapt_state_dict(state, net, source, strict)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, strict=strict, assign=strict)
    return net.to(device).eval()


# ---------------------------------------------------------------------------- file formats
@dataclass(frozen=True)
class OfficialCheckpoint:
    """The weights of an official .pth/.pt file and what it says about its architecture."""

    state: dict[str, torch.Tensor]
    layout: str  # 'training' ({'model', 'args'}) or 'release' (DeepSpeed {'module', ...})
    model_string: str | None  # the constructor call of a training file, if it has one


def read_official_checkpoint(path: str | Path, trusted: bool = False) -> OfficialCheckpoint:
    """Read an official file in either layout (``model`` + ``args``, or DeepSpeed's ``module``).

    The safe reader allows plain values (dicts, lists, sets, numbers, strings, torch.Size) and
    ``argparse.Namespace``; ``trusted=True`` falls back to full unpickling, which can run code:
    only for files you made.
    """
    path = str(path)
    try:
        if trusted:
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        # The safe unpickler names a class it refuses; any other failure is a damaged file.
        if 'Unsupported global' not in str(exc):
            raise CheckpointError(
                f'checkpoint {path} is corrupt or truncated ({exc}); download it again') from None
        raise CheckpointError(
            f'checkpoint {path} holds objects that only a full (code-running) unpickling can '
            f'read ({exc}). ros2_sab3r reads official MASt3R/SAB3R files safely; if you made this '
            f'file yourself and trust it, convert it once with sab3r-convert-checkpoint '
            f'--trusted') from None
    except Exception as exc:  # noqa: BLE001 - zip, EOF and OS errors all mean: unreadable file
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is corrupt or truncated, or not a torch '
            f'checkpoint ({type(exc).__name__}: {exc}). Download it again; expected an official '
            f'MASt3R/SAB3R .pth/.pt or a ros2_sab3r .safetensors file') from None
    if isinstance(ckpt, Mapping) and 'model' in ckpt:
        layout, state = 'training', ckpt['model']
    elif isinstance(ckpt, Mapping) and 'module' in ckpt:
        layout, state = 'release', ckpt['module']
    else:
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} has neither a 'model' nor a 'module' key (found {keys}); "
            f'expected an official MASt3R/SAB3R training checkpoint or the SAB3R release file')
    key = 'model' if layout == 'training' else 'module'
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path}: '{key}' is not a state dict of tensors")
    return OfficialCheckpoint(dict(state), layout, _model_string(ckpt.get('args')))


def _model_string(args: Any) -> str | None:
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return None
    model = args.get('model')
    if isinstance(model, Mapping):  # the hydra trainer: model.name holds the constructor call
        model = model.get('name')
    return model if isinstance(model, str) else None


def save_network(net: Sab3rNet, path: str | Path) -> Path:
    """Write ``path`` (.safetensors, config in its metadata) and a ``.json`` config beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != '.safetensors':
        raise ValueError(f'save_network writes a .safetensors file, got {path}')
    drop = {n for names in alias_groups(net) for n in names[1:]}  # one name per shared tensor
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in net.state_dict().items()
               if k not in drop}
    config_json = net.cfg.to_json()
    metadata = {'format': FORMAT_NAME, 'format_version': str(FORMAT_VERSION),
                'config': config_json}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    sidecar = {'format': FORMAT_NAME, 'format_version': FORMAT_VERSION,
               'config': json.loads(config_json)}
    path.with_suffix('.json').write_text(json.dumps(sidecar, indent=2) + '\n', encoding='utf-8')
    return path


def upgrade_v1(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a format-1 export (feature heads at ``clip_head{v}.dpt.*``, raw features) into
    the released layout, keeping its numbers: its heads move into ``downstream_head{v}`` and
    keep their raw output ('linear' mode). Only what maps one to one is converted."""
    cfg = dict(config)
    cfg.pop('checkpoint_key_map', None)
    heads, renames = [], {}
    for head in cfg.get('feature_heads', []):
        head = dict(head)
        name, head_type = head.get('name'), head.get('head_type')
        stride = head.pop('output_stride', 1)
        ratio = head.pop('mlp_ratio', 4.0)
        post = head.pop('postprocess', 'none')
        if post != 'none':
            raise CheckpointError(
                f'{source}: format-1 {name} head with postprocess {post!r} has no equivalent in '
                f'the released layout; re-export it from its original checkpoint')
        if head_type == 'mlp':
            if ratio != 1.0 or stride != 1:
                raise CheckpointError(
                    f'{source}: format-1 {name} MLP head (hidden ratio {ratio}, stride {stride}) '
                    f'has no equivalent in the released linear head (hidden ratio 1, full '
                    f'resolution); re-export it from its original checkpoint')
            head['head_type'], inner = 'linear', 'mlp.'
        else:
            if stride != 1:
                logger.warning('%s: format-1 %s head had output stride %s; it now writes '
                               'full-resolution features (same weights)', source, name, stride)
            inner = 'dpt.'
        head['mode'] = ['linear', '-inf', 'inf']
        heads.append(head)
        for v in (1, 2):
            renames[f'{name}_head{v}.{inner}'] = f'downstream_head{v}.{name}_head.'
    cfg['feature_heads'] = heads
    out = {}
    for k, t in state.items():
        old = next((p for p in renames if k.startswith(p)), None)
        out[k if old is None else renames[old] + k[len(old):]] = t
    logger.warning('%s is a format-1 ros2_sab3r export; converted on load (same outputs). Save '
                   'it once in the current format with sab3r-convert-checkpoint', source)
    return cfg, out


def _read_json_config(path: Path) -> tuple[NetworkConfig | None, dict[str, Any] | None, int]:
    """(config, ros2_sab3r config dict, format version) of a config.json / sidecar file."""
    data = json.loads(path.read_text(encoding='utf-8'))
    if isinstance(data, Mapping) and data.get('format') == FORMAT_NAME:
        return None, dict(data['config']), int(data.get('format_version', 1))
    if isinstance(data, Mapping):
        # Hugging Face PyTorchModelHubMixin: the official constructor keyword arguments.
        return (config_from_official('AsymmetricMASt3R', data, name=path.parent.name or 'hub'),
                None, FORMAT_VERSION)
    raise CheckpointError(f'config {path} is not a JSON object')


def _read_safetensors(path: Path, config: NetworkConfig | None
                      ) -> tuple[dict[str, torch.Tensor], NetworkConfig]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework='pt') as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - report any safetensors failure with the file
        raise CheckpointError(
            f'cannot read {path} as safetensors ({exc}); the file is corrupt or truncated'
        ) from None
    ours, version, official = None, FORMAT_VERSION, None
    if metadata.get('format') == FORMAT_NAME and 'config' in metadata:
        ours, version = json.loads(metadata['config']), int(metadata.get('format_version', 1))
    else:
        for candidate in (path.with_suffix('.json'), path.parent / HF_CONFIG):
            if candidate.is_file():
                official, ours, version = _read_json_config(candidate)
                break
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f'{path} is ros2_sab3r format {version}, newer than this release reads '
            f'({FORMAT_VERSION}); update ros2_sab3r')
    if ours is not None and version < 2:
        ours, state = upgrade_v1(ours, state, str(path))
    stored = official or (NetworkConfig.from_dict(ours) if ours is not None else None)
    config = config or stored
    if config is None:
        raise CheckpointError(
            f'{path} carries no architecture: expected ros2_sab3r metadata, '
            f'{path.with_suffix(".json").name} or {HF_CONFIG} beside it, or an explicit config')
    return state, config


def hub_path(source: str) -> tuple[str, str | None] | None:
    """``owner/name[/file/in/repo]`` -> (repo id, file or None); None if it is not that form."""
    if source.startswith(('.', '/', '~')):
        return None
    match = _HUB_PATH.match(source)
    if not match:
        return None
    return match.group('repo'), match.group('file')


def _hf_download(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f'{repo_id!r} looks like a Hugging Face repo id but huggingface_hub is not installed; '
            f'install it or pass a local checkpoint file') from None
    offline = os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - offline, network, 404 all mean: no file
        why = 'HF_HUB_OFFLINE is set' if offline else f'{type(exc).__name__}: {exc}'
        raise CheckpointError(
            f'cannot get {filename} of Hugging Face repo {repo_id} ({why}). On a connected '
            f'machine run `huggingface-cli download {repo_id} {filename}` (or fetch '
            f'https://huggingface.co/{repo_id}/resolve/main/{filename}), copy the file to this '
            f'machine, e.g. to ~/models/{repo_id}/{filename}, and set the checkpoint to that '
            f'local path; or copy the Hugging Face cache (~/.cache/huggingface/hub) so the repo '
            f'id resolves offline') from None


def _download_from_hub(repo_id: str, filename: str | None) -> Path:
    """Fetch one file of a hub repo, or its ``model.safetensors`` + ``config.json``."""
    if filename is not None:
        return _hf_download(repo_id, filename)
    weights = _hf_download(repo_id, HF_WEIGHTS)
    _hf_download(repo_id, HF_CONFIG)
    return weights


def resolve_config(config: NetworkConfig | str | None) -> NetworkConfig | None:
    if config is None or isinstance(config, NetworkConfig):
        return config
    return load_config(config)


def load_network(source: str | Path, *, config: NetworkConfig | str | None = None,
                 device: torch.device | str = 'cpu', strict: bool = True,
                 trusted: bool = False) -> Sab3rNet:
    """Load a network from a checkpoint file, a directory or a Hugging Face repo id (with an
    optional file inside the repo).

    ``config`` overrides the architecture stored with the weights; without one, a training file
    is built from its model string, the release file as :data:`RELEASE_ARCHITECTURE`.
    """
    try:
        cfg = resolve_config(config)
    except ConfigError as exc:
        raise CheckpointError(f'architecture for {source}: {exc}') from None
    path = Path(source).expanduser()
    if not path.exists():
        hub = hub_path(str(source)) if isinstance(source, str) else None
        if hub is None:
            raise CheckpointError(f'checkpoint {source} does not exist')
        path = _download_from_hub(*hub)
    if path.is_dir():
        weights = path / HF_WEIGHTS
        if not weights.is_file():
            candidates = sorted(path.glob('*.safetensors')) + sorted(
                p for pattern in ('*.pth', '*.pt') for p in path.glob(pattern))
            if len(candidates) != 1:
                raise CheckpointError(
                    f'checkpoint directory {path} must hold {HF_WEIGHTS} or exactly one '
                    f'.safetensors/.pth/.pt file, found {[c.name for c in candidates]}')
            weights = candidates[0]
        path = weights
    if path.suffix == '.safetensors':
        try:
            state, stored_cfg = _read_safetensors(path, cfg)
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f'{path}: stored architecture is invalid ({exc})') from None
        cfg = cfg or stored_cfg
    else:
        ckpt = read_official_checkpoint(path, trusted=trusted)
        state = ckpt.state
        if cfg is None and ckpt.layout == 'release':
            cfg = load_config(RELEASE_ARCHITECTURE)
        elif cfg is None:
            if not ckpt.model_string:
                raise CheckpointError(
                    f'checkpoint {path} has no args.model string; pass an architecture config')
            try:
                class_name, kwargs = parse_constructor_call(ckpt.model_string)
                cfg = config_from_official(class_name, kwargs, name=path.stem)
            except (ValueError, ConfigError) as exc:
                raise CheckpointError(f'checkpoint {path}: {exc}') from None
    net = _build_and_load(cfg, state, str(path), strict, device)
    logger.info('loaded %s network (%s) from %s', cfg.name, _count(net), path)
    return net


def _count(net: Sab3rNet) -> str:
    unique = {id(p): p.numel() for p in net.parameters()}
    return f'{sum(unique.values()) / 1e6:.1f}M parameters'
