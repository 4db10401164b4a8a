"""Training checkpoints (atomic, keep last K, exact resume) and the exports of a finished run.

A checkpoint is a folder ``RUN/checkpoints/step_00000010/`` holding ``state.pt`` (model,
optimiser, scheduler, step, the resolved recipe, and the RNG states of every rank) and a
``COMPLETE`` marker. It is written under a temporary name and renamed into place only when
every byte is on disk, so a crash or a full disk during a save leaves the previous checkpoint
as it was; only folders with the marker are ever resumed from. Every value in ``state.pt`` is a
tensor or plain data, so it is read back with ``torch.load(weights_only=True)``.

Exports (:func:`export_model`): our ``.safetensors`` (architecture in its metadata; loads in the
node and ``sab3r-export`` unchanged) and the official ``.pth`` training layout
(``{'model': state_dict, 'args': Namespace(model=<constructor call>)}``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import math
import os
from pathlib import Path
import random
import shutil
from typing import Any

import numpy as np
import torch

from ros2_sab3r.model.arch import NetworkConfig
from ros2_sab3r.model.checkpoint import alias_groups, save_network
from ros2_sab3r.model.network import Sab3rNet

STATE_FILE = 'state.pt'
COMPLETE = 'COMPLETE'
PREFIX = 'step_'


class TrainingCheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; names the path and the fix."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / 'checkpoints'


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, state: Mapping[str, Any], keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then keep the last K."""
    root = checkpoint_dir(run_dir)
    final = root / f'{PREFIX}{step:08d}'
    partial = root / f'.{PREFIX}{step:08d}.partial'
    previous = latest_checkpoint(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        with open(partial / STATE_FILE, 'wb') as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        (partial / COMPLETE).write_text(f'{step}\n', encoding='utf-8')
        if final.exists():  # the same step saved again (a resumed run that stopped here)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        kept = f'the previous checkpoint {previous} is intact' if previous else \
            'no earlier checkpoint exists'
        raise TrainingCheckpointError(
            f'checkpoint of step {step} could not be written to {root} ({exc}); {kept}. Free '
            'disk space (or lower run.keep_last) and resume with --resume auto') from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state of a checkpoint folder (or its state.pt), read with weights_only=True."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / COMPLETE).is_file() or not (folder / STATE_FILE).is_file():
        raise TrainingCheckpointError(
            f'{folder} is not a complete training checkpoint (no {COMPLETE} marker or '
            f'{STATE_FILE}); give a RUN/checkpoints/step_* folder or --resume auto')
    try:
        return torch.load(folder / STATE_FILE, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
        raise TrainingCheckpointError(f'cannot read {folder / STATE_FILE}: {exc}') from None


# -- RNG --------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data and tensors (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {'python': [py_version, list(py_state), py_gauss],
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state['python']
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -- exports ----------------------------------------------------------------------------------

def _mode(mode) -> str:
    def num(v: float) -> str:
        return ('inf' if v > 0 else '-inf') if math.isinf(v) else repr(float(v))

    return f"('{mode.kind}', {num(mode.vmin)}, {num(mode.vmax)})"


def official_model_string(cfg: NetworkConfig) -> str:
    """The AsymmetricMASt3R constructor call of ``cfg`` (what official .pth files carry in
    ``args.model``; model/checkpoint.py parses it back without evaluating it).

    The official string has no field for the DPT widths or the feature heads' widths, so a file
    of a non-release architecture is loaded with its architecture named (``config=``)."""
    parts = [f"pos_embed='RoPE{cfg.rope_base:g}'", "patch_embed_cls='PatchEmbedDust3R'",
             'img_size=(512, 512)', f"head_type='{cfg.head_type}'",
             f"output_mode='pts3d+desc{cfg.desc_dim}'", f'depth_mode={_mode(cfg.depth_mode)}',
             f'conf_mode={_mode(cfg.conf_mode)}', f'enc_embed_dim={cfg.enc_embed_dim}',
             f'enc_depth={cfg.enc_depth}', f'enc_num_heads={cfg.enc_num_heads}',
             f'dec_embed_dim={cfg.dec_embed_dim}', f'dec_depth={cfg.dec_depth}',
             f'dec_num_heads={cfg.dec_num_heads}', f'two_confs={cfg.two_confs}',
             f'desc_conf_mode={_mode(cfg.desc_conf_mode)}']
    for head in cfg.feature_heads:
        parts.append(f"{head.name}_head_type='{head.head_type}'")
    return f"AsymmetricMASt3R({', '.join(parts)})"


def export_model(net: Sab3rNet, out_dir: Path, name: str) -> tuple[Path, Path]:
    """``out_dir/name.safetensors`` (+ .json) and ``out_dir/name.pth`` (official layout)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = save_network(net, out_dir / f'{name}.safetensors')
    drop = {n for names in alias_groups(net) for n in names[1:]}
    state = {k: v.detach().to('cpu').clone() for k, v in net.state_dict().items()
             if k not in drop}
    official = out_dir / f'{name}.pth'
    partial = official.with_suffix('.pth.partial')
    torch.save({'model': state, 'args': argparse.Namespace(model=official_model_string(net.cfg))},
               partial)
    os.replace(partial, official)
    return ours, official
