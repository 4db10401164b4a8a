"""Loading and saving network weights.

Accepted sources (:func:`load_network`):

* an official MASt3R/SAB3R training checkpoint (``torch.save`` of ``{'model', 'args', ...}``),
  read with ``weights_only=True`` and only ``argparse.Namespace`` allowed; the architecture comes
  from parsing ``args.model`` (a constructor-call string) without evaluating it;
* our own format: ``NAME.safetensors`` with the architecture JSON in its metadata (and a
  ``NAME.json`` beside it for people), no pickle;
* a directory in the Hugging Face layout (``model.safetensors`` + ``config.json``, the config being
  either ours or the official constructor keyword arguments);
* a Hugging Face repo id (``naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric``), downloaded
  with ``huggingface_hub`` on a connected machine.

Every load is strict by default: missing, unexpected and mis-shaped keys are reported together,
naming the file.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Mapping
import json
import logging
import math
import os
from pathlib import Path
import re
from typing import Any

import torch

from ros2_sab3r.model.arch import ConfigError, NetworkConfig, OutputMode, load_config
from ros2_sab3r.model.network import Sab3rNet, create_network

logger = logging.getLogger(__name__)

FORMAT_NAME = 'ros2_sab3r'
FORMAT_VERSION = 1
HF_WEIGHTS = 'model.safetensors'
HF_CONFIG = 'config.json'
OFFICIAL_CLASSES = ('AsymmetricMASt3R',)
_REPO_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
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
    values['desc_conf_mode'] = OutputMode.from_json(desc_conf_mode or conf_mode)
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
                     key_map: Mapping[str, str] | None = None,
                     strict: bool = True) -> dict[str, torch.Tensor]:
    """Bring a checkpoint state dict into our names and check it against ``net``.

    Applies, in order: the prefix ``key_map`` (checkpoint prefix -> ours), the official
    ``dec_blocks2`` rule (copied from ``dec_blocks`` when absent), and alias filling. With
    ``strict`` any missing, unexpected or mis-shaped key raises :class:`CheckpointError`.
    """
    sd = dict(state)
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    if key_map:
        prefixes = sorted(key_map, key=len, reverse=True)  # the longest matching prefix wins
        renamed = {}
        for k, v in sd.items():
            old = next((p for p in prefixes if k.startswith(p)), None)
            renamed[k if old is None else key_map[old] + k[len(old):]] = v
        sd = renamed
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
            hint = ('; if the extra keys are SAB3R heads, choose an architecture with feature '
                    'heads (sab3r_c / sab3r_cd) and map their prefixes with checkpoint_key_map'
                    if unexpected else '')
            raise CheckpointError(report + hint)
        logger.warning('%s', report)
        for k in unexpected:
            del sd[k]
    return sd


def _listing(label: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ''
    shown = ', '.join(keys[:limit]) + (f', ... ({len(keys) - limit} more)' if len(keys) > limit
                                       else '')
    return f'[{len(keys)} {label}: {shown}] '


def _build_and_load(cfg: NetworkConfig, state: Mapping[str, torch.Tensor], source: str,
                    key_map: Mapping[str, str] | None, strict: bool,
                    device: torch.device | str) -> Sab3rNet:
    merged_map = {**cfg.checkpoint_key_map, **(key_map or {})}
    # Strict loads fill every tensor, so build without allocating random weights first.
    net = create_network(cfg, 'meta' if strict else 'cpu')
    sd = adapt_state_dict(state, net, source, merged_map, strict)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, strict=strict, assign=strict)
    return net.to(device).eval()


# ---------------------------------------------------------------------------- file formats
def read_official_checkpoint(path: str | Path, trusted: bool = False
                             ) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read ``{'model': state_dict, 'args': Namespace(model=...)}``; return (state, model string).

    ``trusted=True`` falls back to full unpickling, which can run code: only for files you made.
    """
    path = str(path)
    try:
        if trusted:
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise CheckpointError(
            f'cannot read checkpoint {path} safely ({type(exc).__name__}: {exc}); expected an '
            f'official MASt3R/SAB3R .pth whose args hold only plain values, or a ros2_sab3r '
            f'.safetensors file. Convert a trusted file once with sab3r-convert-checkpoint '
            f'--trusted') from None
    if not isinstance(ckpt, Mapping) or 'model' not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} has no 'model' key (found {keys}); expected an official MASt3R "
            f'or SAB3R checkpoint')
    state = ckpt['model']
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict of tensors")
    args = ckpt.get('args')
    model_string = None
    if isinstance(args, argparse.Namespace):
        model_string = getattr(args, 'model', None)
    elif isinstance(args, Mapping):
        model_string = args.get('model')
    return dict(state), model_string


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


def _config_from_json_file(path: Path) -> NetworkConfig:
    data = json.loads(path.read_text(encoding='utf-8'))
    if isinstance(data, Mapping) and data.get('format') == FORMAT_NAME:
        return NetworkConfig.from_dict(data['config'])
    if isinstance(data, Mapping):
        # Hugging Face PyTorchModelHubMixin: the official constructor keyword arguments.
        return config_from_official('AsymmetricMASt3R', data, name=path.parent.name or 'hub')
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
        raise CheckpointError(f'cannot read {path} as safetensors ({exc})') from None
    if config is None:
        if metadata.get('format') == FORMAT_NAME and 'config' in metadata:
            config = NetworkConfig.from_dict(json.loads(metadata['config']))
        else:
            for candidate in (path.with_suffix('.json'), path.parent / HF_CONFIG):
                if candidate.is_file():
                    config = _config_from_json_file(candidate)
                    break
    if config is None:
        raise CheckpointError(
            f'{path} carries no architecture: expected ros2_sab3r metadata, '
            f'{path.with_suffix(".json").name} or {HF_CONFIG} beside it, or an explicit config')
    return state, config


def _download_from_hub(repo_id: str) -> Path:
    """Fetch ``model.safetensors`` and ``config.json`` of a hub repo; return the weights path."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f'{repo_id!r} looks like a Hugging Face repo id but huggingface_hub is not installed; '
            f'install it or pass a local checkpoint file') from None
    offline = os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')
    paths = {}
    for filename in (HF_WEIGHTS, HF_CONFIG):
        try:
            paths[filename] = Path(hf_hub_download(repo_id, filename,
                                                   local_files_only=offline))
        except Exception as exc:  # noqa: BLE001 - offline, network, 404 all mean: no file
            why = 'HF_HUB_OFFLINE is set' if offline else f'{type(exc).__name__}: {exc}'
            raise CheckpointError(
                f'cannot get {filename} of Hugging Face repo {repo_id} ({why}). On a connected '
                f'machine download https://huggingface.co/{repo_id}/resolve/main/{filename} '
                f'(and {HF_CONFIG} / {HF_WEIGHTS} beside it) and pass the local directory or '
                f'.safetensors file as the checkpoint') from None
    return paths[HF_WEIGHTS]


def resolve_config(config: NetworkConfig | str | None) -> NetworkConfig | None:
    if config is None or isinstance(config, NetworkConfig):
        return config
    return load_config(config)


def load_network(source: str | Path, *, config: NetworkConfig | str | None = None,
                 key_map: Mapping[str, str] | None = None, device: torch.device | str = 'cpu',
                 strict: bool = True, trusted: bool = False) -> Sab3rNet:
    """Load a network from a checkpoint file, a directory or a Hugging Face repo id.

    ``config`` overrides the architecture stored with the weights (needed for SAB3R checkpoints
    whose model string names an unknown class); ``key_map`` maps checkpoint key prefixes onto
    ours and extends the config's ``checkpoint_key_map``.
    """
    cfg = resolve_config(config)
    path = Path(source).expanduser()
    if not path.exists():
        looks_like_file = path.suffix in ('.pth', '.pt', '.bin', '.safetensors', '.ckpt')
        if (isinstance(source, str) and _REPO_ID.match(source) and not looks_like_file
                and not source.startswith('.')):
            path = _download_from_hub(source)
        else:
            raise CheckpointError(f'checkpoint {source} does not exist')
    if path.is_dir():
        weights = path / HF_WEIGHTS
        if not weights.is_file():
            candidates = sorted(path.glob('*.safetensors')) + sorted(path.glob('*.pth'))
            if len(candidates) != 1:
                raise CheckpointError(
                    f'checkpoint directory {path} must hold {HF_WEIGHTS} or exactly one '
                    f'.safetensors/.pth file, found {[c.name for c in candidates]}')
            weights = candidates[0]
        path = weights
    if path.suffix == '.safetensors':
        state, stored_cfg = _read_safetensors(path, cfg)
        cfg = cfg or stored_cfg
    else:
        state, model_string = read_official_checkpoint(path, trusted=trusted)
        if cfg is None:
            if not model_string:
                raise CheckpointError(
                    f'checkpoint {path} has no args.model string; pass an architecture config')
            try:
                class_name, kwargs = parse_constructor_call(model_string)
                cfg = config_from_official(class_name, kwargs, name=path.stem)
            except (ValueError, ConfigError) as exc:
                raise CheckpointError(f'checkpoint {path}: {exc}') from None
    net = _build_and_load(cfg, state, str(path), key_map, strict, device)
    logger.info('loaded %s network (%s) from %s', cfg.name, _count(net), path)
    return net


def _count(net: Sab3rNet) -> str:
    unique = {id(p): p.numel() for p in net.parameters()}
    return f'{sum(unique.values()) / 1e6:.1f}M parameters'

