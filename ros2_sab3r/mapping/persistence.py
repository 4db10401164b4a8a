"""Saving and loading semantic maps: one .npz archive of plain arrays plus JSON metadata.

- No pickle: every array is numeric, the metadata is UTF-8 JSON stored as a uint8 array, and
  loading uses ``np.load(allow_pickle=False)``.
- Atomic: the archive is written to a temporary file in the target directory, flushed to disk and
  renamed over the target (``os.replace``), so a crash never leaves a half-written map behind.
- Checked: a corrupt, foreign or incompatible file raises :class:`MapFileError` naming the file
  and the fix, before anything of the current map is touched; the archive's directory, the
  metadata (types per key, table :data:`_META`) and every .npy header (dtype, shape, stored size,
  tables :data:`_ARRAYS` and :data:`_FEATURES`) are checked before any array is read, so memory
  stays bounded by mapping.max_voxels whatever the file declares.
- Versioned: format 3 stores the features as the map held them (mapping.feature_codec: bf16,
  int8 with per-voxel scales, or pca_int8 codes with their projection), uncompressed, so that
  saving and loading copy arrays and nothing else when the codecs agree. Format 2 files (bf16
  CLIP, fp16 DINO: the arrays of format 3's 'bf16') are read and converted; any other version is
  refused by name. A file loads with any mapping.feature_codec (converted; a pca_int8 map from
  other features gets a projection fitted to them).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
import stat
import tempfile
import time
from typing import Any
import zipfile

import numpy as np

from ros2_sab3r.config import FEATURE_CODECS, MappingConfig
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

FORMAT = 'ros2_sab3r.semantic_map'
# 3: features as mapping.feature_codec stores them (metadata 'feature_codec');
# 2: CLIP as bfloat16 bit patterns ('clip_bf16', uint16), DINO fp16 (read as format 3 'bf16')
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
META_MAX_BYTES = 1 << 20  # the JSON metadata; a real map's is a few hundred bytes

# Array shapes are tuples of sizes or of these symbols, resolved from the metadata: 'n' voxels,
# 'clip' / 'dino' feature channels, 'clip_rank' / 'dino_rank' stored channels (pca_int8).
# name -> (dtype, shape)
_ARRAYS = {
    'keys': (np.int64, ('n',)),
    'positions': (np.float32, ('n', 3)),
    'colors': (np.float32, ('n', 3)),
    'weights': (np.float32, ('n',)),
    'counts': (np.uint32, ('n',)),
    'last_seen_ns': (np.int64, ('n',)),
    'clip_weights': (np.float32, ('n',)),
    'dino_weights': (np.float32, ('n',)),
}
_FP16_DINO = {'dino': (np.float16, ('n', 'dino'))}
# feature_codec -> feature kind -> the arrays it has (present when the kind's channels > 0)
_FEATURES = {
    'bf16': {'clip': {'clip_bf16': (np.uint16, ('n', 'clip'))}, 'dino': _FP16_DINO},
    'int8': {'clip': {'clip_int8': (np.int8, ('n', 'clip')),
                      'clip_scale': (np.float32, ('n',))}, 'dino': _FP16_DINO},
    'pca_int8': {kind: {f'{kind}_int8': (np.int8, ('n', f'{kind}_rank')),
                        f'{kind}_scale': (np.float32, ('n',)),
                        f'{kind}_basis': (np.float32, (kind, f'{kind}_rank')),
                        f'{kind}_moment': (np.float64, (f'{kind}_rank', f'{kind}_rank'))}
                 for kind in ('clip', 'dino')},
}
assert set(_FEATURES) == set(FEATURE_CODECS), 'every mapping.feature_codec has a file layout'


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_gravity(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))
                         and 0.0 < math.hypot(*v) < math.inf)


# Metadata key -> (required, check, what the check wants). Read before any array: a value of the
# wrong type must be refused here, not fail later inside Locate. Extend it with the format.
_META = {
    'format': (True, lambda v: v == FORMAT, f'{FORMAT!r}'),
    'version': (True, _is_int, 'an integer'),
    'voxel_size_m': (True, lambda v: _is_number(v) and v > 0, 'a positive number'),
    'n_voxels': (True, lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    'clip_dim': (True, lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    'dino_dim': (False, lambda v: v is None or (_is_int(v) and v >= 0), 'an integer >= 0'),
    'stamp_ns': (False, lambda v: _is_int(v) and 0 <= v < 1 << 63, 'an integer >= 0 (ns)'),
    'frame': (False, lambda v: isinstance(v, str), 'a string'),
    'gravity': (False, _is_gravity, 'null or 3 finite numbers, not all zero'),
    'saved_unix_s': (False, _is_number, 'a number'),
    'pose_source': (False, lambda v: isinstance(v, str), 'a string'),
    'backend': (False, lambda v: isinstance(v, str), 'a string'),
    # format 3 (required there, see _check_meta)
    'feature_codec': (False, lambda v: v in FEATURE_CODECS, f'one of {FEATURE_CODECS}'),
    'clip_rank': (False, lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'dino_rank': (False, lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'clip_fit_residual': (False, lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]'),
    'dino_fit_residual': (False, lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]'),
}


class MapFileError(ValueError):
    """A map file that cannot be loaded; the current map is left as it was."""


@dataclass(frozen=True)
class MapFile:
    """A validated map file's content, ready to become a SemanticVoxelMap."""

    arrays: dict
    meta: dict


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by the set-and-restore idiom."""
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_map(m: SemanticVoxelMap, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the map's latest snapshot to `path` atomically; returns the path written.

    An existing `path` must be a regular file (a FIFO, device, directory or symlink is refused,
    not replaced); the new file gets mode 0666 less the umask, like any file the user creates.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MapFileError(f'cannot save the map to {path}: directory {path.parent} does not '
                           'exist; create it first')
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = 'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a regular file'
        raise MapFileError(f'cannot save the map to {path}: it exists and is {kind}; give the '
                           'path of a new or regular file')
    arrays, feature_meta = m.contents()
    meta = {
        'format': FORMAT, 'version': FORMAT_VERSION, 'voxel_size_m': m.voxel_size,
        'n_voxels': int(len(arrays['keys'])), 'clip_dim': m.clip_dim, 'dino_dim': m.dino_dim,
        'stamp_ns': int(m.snapshot().stamp_ns), 'frame': m.frame,
        'gravity': None if m.gravity is None else [float(g) for g in m.gravity],
        'saved_unix_s': time.time(), **(extra or {}), **feature_meta,
    }
    blob = np.frombuffer(json.dumps(meta).encode('utf-8'), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, meta=blob, **arrays)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _member_header(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path
                   ) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, header bytes) of one .npy member, from its header alone."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f'.npy format version {version}')
        header_bytes = f.tell()
    if fortran or dtype.hasobject:
        raise MapFileError(f'{path}: array {info.filename[:-4]!r} is '
                           f'{"Fortran-ordered" if fortran else "an object array"}; the file '
                           'was not written by ros2_sab3r')
    return dtype, shape, header_bytes


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _check_meta(meta: Any, path: Path) -> dict:
    if not isinstance(meta, dict):
        raise MapFileError(f'{path} is not a ros2_sab3r semantic map (metadata is not an object)')
    if meta.get('format') != FORMAT:
        raise MapFileError(f'{path} is not a ros2_sab3r semantic map (format '
                           f'{meta.get("format")!r})')
    version = meta.get('version')
    if version not in READABLE_VERSIONS:
        newer = _is_int(version) and version > FORMAT_VERSION
        raise MapFileError(f'{path} has map format version {version!r}, this build reads versions '
                           f'{", ".join(map(str, READABLE_VERSIONS))}; '
                           + ('update ros2_sab3r to load it' if newer else
                              'load it with the ros2_sab3r release that wrote it and save it '
                              'again, or rebuild the map'))
    for key, (required, check, wanted) in _META.items():
        if key not in meta:
            if required:
                raise MapFileError(f'{path}: metadata lacks {key!r}; the file is incomplete')
            continue
        if not check(meta[key]):
            raise MapFileError(f'{path}: metadata {key!r} is {meta[key]!r:.80}, expected '
                               f'{wanted}; the file is corrupt or was not written by ros2_sab3r')
    if version == 2:  # the arrays of format 3's 'bf16'
        meta['feature_codec'] = 'bf16'
    needed = ['feature_codec']
    if meta['feature_codec'] == 'pca_int8':
        needed += [f'{kind}_{what}' for kind in ('clip', 'dino') if meta.get(f'{kind}_dim')
                   for what in ('rank', 'fit_residual')]
    for key in needed:
        if key not in meta:
            raise MapFileError(f'{path}: metadata lacks {key!r}; the file is incomplete')
    for kind in ('clip', 'dino'):
        rank = meta.get(f'{kind}_rank')
        if rank is not None and rank > (meta.get(f'{kind}_dim') or 0):
            raise MapFileError(f'{path}: metadata {kind}_rank {rank} exceeds {kind}_dim '
                               f'{meta.get(f"{kind}_dim")}; the file is corrupt')
    return meta


def read_map(path: str | os.PathLike, cfg: MappingConfig, clip_dim: int) -> MapFile:
    """Read and validate a map file against the running configuration (raises MapFileError).

    Everything is checked from the archive's directory and the .npy headers before any array
    is read: member names (no extra arrays), metadata types, dtypes, shapes, the voxel count
    against mapping.max_voxels, and the stored sizes. So a forged header that declares 10^12
    elements, or an extra gigabyte array, costs nothing to refuse.
    """
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f'map file {path} does not exist or is not a regular file')
    try:
        with zipfile.ZipFile(path) as z:
            return _read_checked(z, path, cfg, clip_dim)
    except MapFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError,
            NotImplementedError, UnicodeDecodeError) as exc:
        raise MapFileError(f'{path} is not a readable map archive ({exc}); it may be truncated '
                           'or not a ros2_sab3r map') from None


def _read_checked(z: zipfile.ZipFile, path: Path, cfg: MappingConfig, clip_dim: int) -> MapFile:
    members = {}
    for info in z.infolist():
        if not info.filename.endswith('.npy') or info.filename[:-4] in members:
            raise MapFileError(f'{path}: unexpected archive member {info.filename!r}; the file '
                               'was not written by ros2_sab3r')
        members[info.filename[:-4]] = info
    if 'meta' not in members:
        raise MapFileError(f'{path} has no metadata; it was not written by ros2_sab3r')
    dtype, shape, _ = _member_header(z, members['meta'], path)
    if dtype != np.uint8 or len(shape) != 1 or not 0 < shape[0] <= META_MAX_BYTES:
        raise MapFileError(f'{path}: metadata is {dtype}{shape}, expected uint8 JSON of at most '
                           f'{META_MAX_BYTES} bytes')
    try:
        meta = json.loads(_read_member(z, members['meta']).tobytes().decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapFileError(f'{path} has corrupt metadata ({exc})') from None
    meta = _check_meta(meta, path)
    if abs(meta['voxel_size_m'] - cfg.voxel_size_m) > 1e-9:
        raise MapFileError(f'{path} was built with voxels of {meta["voxel_size_m"]} m but '
                           f'mapping.voxel_size_m is {cfg.voxel_size_m}; set it to match')
    if meta['clip_dim'] != clip_dim:
        raise MapFileError(f'{path} holds {meta["clip_dim"]}-d CLIP features but the text '
                           f'encoder produces {clip_dim}-d embeddings; use the same model')
    n = meta['n_voxels']
    if n > cfg.max_voxels:
        raise MapFileError(f'{path} holds {n} voxels but mapping.max_voxels is {cfg.max_voxels};'
                           ' raise mapping.max_voxels to load it')
    dino_dim = meta.get('dino_dim') or 0
    sizes = {'n': n, 'clip': clip_dim, 'dino': dino_dim, 'clip_rank': meta.get('clip_rank'),
             'dino_rank': meta.get('dino_rank')}
    expected = dict(_ARRAYS)
    features = _FEATURES[meta['feature_codec']]
    for kind, dim in (('clip', clip_dim), ('dino', dino_dim)):
        if dim:
            expected.update(features[kind])
    expected = {name: (dtype, tuple(sizes[d] if isinstance(d, str) else d for d in shape))
                for name, (dtype, shape) in expected.items()}
    extra = set(members) - set(expected) - {'meta'}
    if extra:
        raise MapFileError(f'{path} holds arrays this format does not have: {sorted(extra)!r:.200}'
                           '; the file was not written by ros2_sab3r')
    for name, (dtype, want) in expected.items():
        info = members.get(name)
        if info is None:
            raise MapFileError(f'{path} lacks the array {name!r}; the file is incomplete')
        got_dtype, got_shape, header_bytes = _member_header(z, info, path)
        if got_dtype != dtype or got_shape != want:
            raise MapFileError(f'{path}: array {name!r} is {got_dtype}{got_shape!s:.80}, '
                               f'expected {np.dtype(dtype)}{want}')
        size = header_bytes + int(np.prod(want)) * np.dtype(dtype).itemsize
        if info.file_size != size:
            raise MapFileError(f'{path}: array {name!r} is stored in {info.file_size} bytes, its '
                               f'header implies {size}; the file is corrupt')
    if dino_dim and not cfg.fuse_dino:
        for name in features['dino']:
            del expected[name]
        dino_dim = 0
    data = {name: _read_member(z, members[name]) for name in expected}
    for name, a in data.items():
        if a.dtype.kind == 'f' and not np.isfinite(a).all():
            raise MapFileError(f'{path}: array {name!r} has non-finite values; the file is '
                               'corrupt')
    if 'clip_bf16' in data and ((data['clip_bf16'] & 0x7F80) == 0x7F80).any():
        raise MapFileError(f"{path}: array 'clip_bf16' has non-finite features; the file is "
                           'corrupt')
    sorted_keys = np.sort(data['keys'])  # (np.unique hashes: 1.5 s at 1M keys, sorting 0.05)
    if n > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        raise MapFileError(f'{path} has duplicate voxel keys; the file is corrupt')
    meta['dino_dim'] = dino_dim
    return MapFile(arrays=data, meta=meta)


def map_from_file(mf: MapFile, cfg: MappingConfig, gravity: np.ndarray | None = None,
                  frame: str = '') -> SemanticVoxelMap:
    """Build a SemanticVoxelMap from a validated MapFile."""
    g = mf.meta.get('gravity')
    feature_meta = {key: mf.meta[key] for key in ('feature_codec', 'clip_fit_residual',
                                                  'dino_fit_residual') if key in mf.meta}
    return SemanticVoxelMap.from_arrays(
        cfg, mf.arrays, clip_dim=int(mf.meta['clip_dim']), dino_dim=int(mf.meta['dino_dim']),
        stamp_ns=int(mf.meta.get('stamp_ns', 0)),
        gravity=gravity if g is None else np.asarray(g, dtype=np.float64),
        frame=frame or str(mf.meta.get('frame', '')), feature_meta=feature_meta)
