"""Saving and loading semantic maps: one .npz archive of plain arrays plus JSON metadata.

- No pickle: every array is numeric, the metadata is UTF-8 JSON stored as a uint8 array, and
  loading uses ``np.load(allow_pickle=False)``.
- Atomic: the archive is written to a temporary file in the target directory, flushed to disk and
  renamed over the target (``os.replace``), so a crash never leaves a half-written map behind.
- Checked: a corrupt, foreign or incompatible file raises :class:`MapFileError` naming the file
  and the fix, before anything of the current map is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import tempfile
import time
import zipfile

import numpy as np

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

FORMAT = 'ros2_sab3r.semantic_map'
FORMAT_VERSION = 2  # 2: CLIP features as bfloat16 bit patterns ('clip_bf16', uint16)

# name -> (dtype, trailing shape; None: the feature dimension from the metadata)
_ARRAYS = {
    'keys': (np.int64, ()),
    'positions': (np.float32, (3,)),
    'colors': (np.float32, (3,)),
    'weights': (np.float32, ()),
    'counts': (np.uint32, ()),
    'last_seen_ns': (np.int64, ()),
    'clip_weights': (np.float32, ()),
    'dino_weights': (np.float32, ()),
}


class MapFileError(ValueError):
    """A map file that cannot be loaded; the current map is left as it was."""


@dataclass(frozen=True)
class MapFile:
    """A validated map file's content, ready to become a SemanticVoxelMap."""

    arrays: dict
    meta: dict


def save_map(m: SemanticVoxelMap, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the map's latest snapshot to `path` atomically; returns the path written."""
    path = Path(path)
    if not path.parent.exists():
        raise MapFileError(f'cannot save the map to {path}: directory {path.parent} does not '
                           'exist; create it first')
    arrays = m.arrays()
    meta = {
        'format': FORMAT, 'version': FORMAT_VERSION, 'voxel_size_m': m.voxel_size,
        'n_voxels': int(len(arrays['keys'])), 'clip_dim': m.clip_dim, 'dino_dim': m.dino_dim,
        'stamp_ns': int(m.snapshot().stamp_ns), 'frame': m.frame,
        'gravity': None if m.gravity is None else [float(g) for g in m.gravity],
        'saved_unix_s': time.time(), **(extra or {}),
    }
    blob = np.frombuffer(json.dumps(meta).encode('utf-8'), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, meta=blob, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_map(path: str | os.PathLike, cfg: MappingConfig, clip_dim: int) -> MapFile:
    """Read and validate a map file against the running configuration (raises MapFileError)."""
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f'map file {path} does not exist')
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise MapFileError(f'{path} is not a readable map archive ({exc}); it may be truncated '
                           'or not a ros2_sab3r map') from None
    if 'meta' not in data:
        raise MapFileError(f'{path} has no metadata; it was not written by ros2_sab3r')
    try:
        meta = json.loads(data.pop('meta').tobytes().decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapFileError(f'{path} has corrupt metadata ({exc})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise MapFileError(f'{path} is not a ros2_sab3r semantic map (format '
                           f'{meta.get("format") if isinstance(meta, dict) else None!r})')
    if meta.get('version') != FORMAT_VERSION:
        raise MapFileError(f'{path} has map format version {meta.get("version")}, this build '
                           f'reads version {FORMAT_VERSION}; use the matching ros2_sab3r release')
    if abs(float(meta.get('voxel_size_m', -1)) - cfg.voxel_size_m) > 1e-9:
        raise MapFileError(f'{path} was built with voxels of {meta.get("voxel_size_m")} m but '
                           f'mapping.voxel_size_m is {cfg.voxel_size_m}; set it to match')
    if int(meta.get('clip_dim', -1)) != clip_dim:
        raise MapFileError(f'{path} holds {meta.get("clip_dim")}-d CLIP features but the text '
                           f'encoder produces {clip_dim}-d embeddings; use the same model')
    n = int(meta.get('n_voxels', -1))
    expected = dict(_ARRAYS)
    if clip_dim:
        expected['clip_bf16'] = (np.uint16, (clip_dim,))
    dino_dim = int(meta.get('dino_dim', 0) or 0)
    if dino_dim and cfg.fuse_dino:
        expected['dino'] = (np.float16, (dino_dim,))
    elif dino_dim:
        data.pop('dino', None)
        dino_dim = 0
    for name, (dtype, tail) in expected.items():
        a = data.get(name)
        if a is None:
            raise MapFileError(f'{path} lacks the array {name!r}; the file is incomplete')
        if a.dtype != dtype or a.shape != (n, *tail):
            raise MapFileError(f'{path}: array {name!r} is {a.dtype}{a.shape}, expected '
                               f'{np.dtype(dtype)}{(n, *tail)}')
    if not np.isfinite(data['positions']).all():
        raise MapFileError(f'{path} has non-finite voxel positions; the file is corrupt')
    if len(np.unique(data['keys'])) != n:
        raise MapFileError(f'{path} has duplicate voxel keys; the file is corrupt')
    if n > cfg.max_voxels:
        raise MapFileError(f'{path} holds {n} voxels but mapping.max_voxels is {cfg.max_voxels};'
                           ' raise mapping.max_voxels to load it')
    meta['dino_dim'] = dino_dim
    return MapFile(arrays=data, meta=meta)


def map_from_file(mf: MapFile, cfg: MappingConfig, gravity: np.ndarray | None = None,
                  frame: str = '') -> SemanticVoxelMap:
    """Build a SemanticVoxelMap from a validated MapFile."""
    g = mf.meta.get('gravity')
    return SemanticVoxelMap.from_arrays(
        cfg, mf.arrays, clip_dim=int(mf.meta['clip_dim']), dino_dim=int(mf.meta['dino_dim']),
        stamp_ns=int(mf.meta.get('stamp_ns', 0)),
        gravity=gravity if g is None else np.asarray(g, dtype=np.float64),
        frame=frame or str(mf.meta.get('frame', '')))
