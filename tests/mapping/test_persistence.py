"""Map files as hostile input: everything is checked from the archive's headers first.

A LoadMap request names any file on the robot; whatever it holds, read_map must answer with a
MapFileError (the node replies with it and keeps its map) and never raise anything else, read
an array the format does not have, or allocate what a forged header declares.
"""

from __future__ import annotations

import io
import os
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping.persistence import MapFileError, map_from_file, read_map, save_map
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from tests.ros.crafted import header_only as _header_only
from tests.ros.crafted import members as _members
from tests.ros.crafted import meta_member
from tests.ros.crafted import meta_of as _meta
from tests.ros.crafted import npy as _npy
from tests.ros.crafted import with_meta as _with_meta
from tests.ros.crafted import write as _write

pytestmark = pytest.mark.unit

CFG = MappingConfig(voxel_size_m=0.05, max_voxels=5000)
CLIP_DIM = 16


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(1)
    m = SemanticVoxelMap(CFG, clip_dim=CLIP_DIM, dino_dim=8)
    n = 2000
    X = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    m.integrate(X, np.full(n, 3.0, np.float32), rng.integers(0, 255, (n, 3)).astype(np.uint8),
                7, rng.integers(0, 10, n), rng.normal(size=(10, CLIP_DIM)).astype(np.float32),
                rng.normal(size=(10, 8)).astype(np.float32))
    path = tmp_path / 'map.npz'
    save_map(m, path)
    return path


@pytest.mark.parametrize('key, value', [
    ('voxel_size_m', [0.05]), ('n_voxels', None), ('n_voxels', 1.5), ('n_voxels', True),
    ('gravity', [0.0, -1.0]), ('gravity', [0.0, 0.0, 0.0]), ('gravity', 'down'),
    ('clip_dim', '16'), ('dino_dim', -8), ('stamp_ns', 'now'), ('frame', 3),
    ('voxel_size_m', float('nan')),
])
def test_metadata_of_the_wrong_type_is_refused_by_name(saved, tmp_path, key, value):
    out = tmp_path / 'forged.npz'
    _with_meta(saved, out, **{key: value})
    with pytest.raises(MapFileError, match=key):
        read_map(out, CFG, CLIP_DIM)


def test_missing_metadata_key_is_refused(saved, tmp_path):
    meta = _meta(saved)
    del meta['n_voxels']
    members = _members(saved)
    members['meta.npy'] = meta_member(meta)
    _write(tmp_path / 'm.npz', members)
    with pytest.raises(MapFileError, match="lacks 'n_voxels'"):
        read_map(tmp_path / 'm.npz', CFG, CLIP_DIM)


def test_a_header_declaring_a_terabyte_is_refused_without_allocating(saved, tmp_path):
    members = _members(saved)
    members['positions.npy'] = _header_only('<f4', (10 ** 12, 3))
    _write(tmp_path / 'bomb.npz', members)
    tracemalloc.start()
    with pytest.raises(MapFileError, match="'positions'"):
        read_map(tmp_path / 'bomb.npz', CFG, CLIP_DIM)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak
    # the same lie in the voxel count: refused against mapping.max_voxels, from the metadata
    _with_meta(saved, tmp_path / 'count.npz', n_voxels=10 ** 12)
    with pytest.raises(MapFileError, match='max_voxels'):
        read_map(tmp_path / 'count.npz', CFG, CLIP_DIM)


def test_a_773_byte_archive_declaring_a_trillion_floats(tmp_path):
    meta = {'format': 'ros2_sab3r.semantic_map', 'version': 2, 'voxel_size_m': 0.05,
            'n_voxels': 10 ** 12, 'clip_dim': CLIP_DIM}
    members = {'meta.npy': meta_member(meta),
               'keys.npy': _header_only('<i8', (10 ** 12,))}
    _write(tmp_path / 'tiny.npz', members)
    assert os.path.getsize(tmp_path / 'tiny.npz') < 1024
    with pytest.raises(MapFileError, match='max_voxels'):
        read_map(tmp_path / 'tiny.npz', MappingConfig(voxel_size_m=0.05,
                                                       max_voxels=10_000_000), CLIP_DIM)


def test_an_extra_array_is_refused_before_it_is_decompressed(saved, tmp_path):
    members = _members(saved)
    members['payload.npy'] = _npy(np.zeros(64 << 20, np.uint8))  # 64 MiB, deflates to ~64 KiB
    _write(tmp_path / 'extra.npz', members, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(tmp_path / 'extra.npz') < 4 << 20
    tracemalloc.start()
    with pytest.raises(MapFileError, match='payload'):
        read_map(tmp_path / 'extra.npz', CFG, CLIP_DIM)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_a_member_shorter_than_its_header_is_refused(saved, tmp_path):
    members = _members(saved)
    members['weights.npy'] = members['weights.npy'][:-4]
    _write(tmp_path / 'short.npz', members)
    with pytest.raises(MapFileError, match="'weights'.*header implies"):
        read_map(tmp_path / 'short.npz', CFG, CLIP_DIM)


def test_non_finite_features_are_refused(saved, tmp_path):
    members = _members(saved)
    clip = np.load(io.BytesIO(members['clip_bf16.npy'])).copy()
    clip[3, 2] = 0x7FC0  # a bfloat16 NaN
    members['clip_bf16.npy'] = _npy(clip)
    _write(tmp_path / 'nan.npz', members)
    with pytest.raises(MapFileError, match='clip_bf16'):
        read_map(tmp_path / 'nan.npz', CFG, CLIP_DIM)


def _random_value(rng):
    choices = [None, True, -1, 0, 3, 10 ** 15, 0.05, float('inf'), 'x', '', [], [0.05],
               [1.0, 2.0], [0.0, 0.0, -9.8], {'a': 1}]
    return choices[rng.integers(len(choices))]


def test_fuzz_crafted_map_files_raise_only_map_file_errors(saved, tmp_path):
    """Random metadata values, header-declared shapes and dtypes, extra and missing arrays."""
    rng = np.random.default_rng(13)
    base = _members(saved)
    meta = _meta(saved)
    names = [n for n in base if n != 'meta.npy']
    outcomes = {'refused': 0, 'loaded': 0}
    for trial in range(150):
        members = dict(base)
        m = dict(meta)
        for key in rng.choice(list(meta), size=rng.integers(0, 3), replace=False):
            m[str(key)] = _random_value(rng)
        members['meta.npy'] = meta_member(m)
        action = rng.integers(5)
        target = names[rng.integers(len(names))]
        if action == 0:
            dtype = ['<f4', '<f8', '<i8', '|u1', '<u2', '<f2'][rng.integers(6)]
            shape = tuple(int(s) for s in rng.integers(0, 10 ** 6, rng.integers(0, 3)))
            members[target] = _header_only(dtype, shape)
        elif action == 1:
            del members[target]
        elif action == 2:
            members[f'extra{trial}.npy'] = _npy(np.zeros(10))
        elif action == 3:
            cut = int(rng.integers(0, len(members[target])))
            members[target] = members[target][:cut]
        path = tmp_path / f'fuzz{trial}.npz'
        _write(path, members)
        try:
            mf = read_map(path, CFG, CLIP_DIM)
        except MapFileError:
            outcomes['refused'] += 1
        else:
            # what passes the checks must make a working map (the node answers Locate from it)
            snap = map_from_file(mf, CFG).snapshot()
            assert snap.n_voxels == mf.meta['n_voxels']
            outcomes['loaded'] += 1
        path.unlink()
    assert outcomes['refused'] > 50 and outcomes['loaded'] > 0, outcomes


def test_fuzz_random_bytes_raise_only_map_file_errors(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    rng = np.random.default_rng(7)
    for trial in range(60):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), rng.integers(1, 20)):
            mutated[pos] = rng.integers(256)
        path = tmp_path / f'bytes{trial}.npz'
        path.write_bytes(bytes(mutated))
        try:
            read_map(path, CFG, CLIP_DIM)
        except MapFileError:
            pass
        path.unlink()


def test_save_refuses_special_files_and_symlinks(saved, tmp_path):
    m = map_from_file(read_map(saved, CFG, CLIP_DIM), CFG)
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    with pytest.raises(MapFileError, match='not a regular file'):
        save_map(m, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO
    link = tmp_path / 'link.npz'
    link.symlink_to(saved)
    with pytest.raises(MapFileError, match='symbolic link'):
        save_map(m, link)
    assert link.is_symlink()
    with pytest.raises(MapFileError, match='not a regular file'):
        save_map(m, tmp_path)


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_honours_the_umask(saved, tmp_path, umask, mode):
    m = map_from_file(read_map(saved, CFG, CLIP_DIM), CFG)
    old = os.umask(umask)
    try:
        save_map(m, tmp_path / 'out.npz')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'out.npz').st_mode) == mode


def test_format_2_files_are_converted_and_other_versions_refused(saved, tmp_path):
    """Format 2 (bf16 CLIP, fp16 DINO, no 'feature_codec') holds format 3's 'bf16' arrays: it
    loads, into any codec; versions this build cannot read are refused naming the fix."""
    meta = _meta(saved)
    assert meta['version'] == 3 and meta['feature_codec'] == 'bf16'
    del meta['feature_codec']
    members = _members(saved)
    members['meta.npy'] = meta_member({**meta, 'version': 2})
    _write(tmp_path / 'v2.npz', members)
    current = map_from_file(read_map(saved, CFG, CLIP_DIM), CFG).snapshot()
    for codec in ('bf16', 'pca_int8'):
        cfg = MappingConfig(voxel_size_m=0.05, max_voxels=5000, feature_codec=codec)
        old = map_from_file(read_map(tmp_path / 'v2.npz', cfg, CLIP_DIM), cfg).snapshot()
        assert old.clip_codec == codec and old.n_voxels == current.n_voxels
        # 16 channels fit the default rank: no projection loss, int8 rounding only
        np.testing.assert_allclose(old.features('clip'), current.features('clip'), atol=2e-2)
    for version, fix in ((1, 'rebuild the map'), (4, 'update ros2_sab3r')):
        _with_meta(saved, tmp_path / f'v{version}.npz', version=version)
        with pytest.raises(MapFileError, match=f'version {version}.*{fix}'):
            read_map(tmp_path / f'v{version}.npz', CFG, CLIP_DIM)


def test_pca_int8_files_are_checked_by_the_tables(tmp_path):
    cfg = MappingConfig(voxel_size_m=0.05, max_voxels=5000, feature_codec='pca_int8',
                        clip_projection_dim=8, dino_projection_dim=8)
    rng = np.random.default_rng(2)
    m = SemanticVoxelMap(cfg, clip_dim=CLIP_DIM, dino_dim=12)
    n = 2000
    m.integrate(rng.uniform(0, 1, (n, 3)).astype(np.float32), np.full(n, 3.0, np.float32),
                rng.integers(0, 255, (n, 3)).astype(np.uint8), 7, rng.integers(0, 10, n),
                rng.normal(size=(10, CLIP_DIM)).astype(np.float32),
                rng.normal(size=(10, 12)).astype(np.float32))
    path = save_map(m, tmp_path / 'pca.npz')
    meta = _meta(path)
    assert (meta['feature_codec'], meta['clip_rank'], meta['dino_rank']) == ('pca_int8', 8, 8)
    assert read_map(path, cfg, CLIP_DIM).arrays['clip_basis'].shape == (CLIP_DIM, 8)
    for key, value, match in (('clip_rank', 4, "'clip_int8'"), ('clip_rank', 99, 'exceeds'),
                              ('feature_codec', 'fp4', 'feature_codec'),
                              ('feature_codec', 'bf16', 'clip_int8'),
                              ('dino_fit_residual', 2.0, 'dino_fit_residual')):
        _with_meta(path, tmp_path / 'bad.npz', **{key: value})
        with pytest.raises(MapFileError, match=match):
            read_map(tmp_path / 'bad.npz', cfg, CLIP_DIM)
    del meta['clip_rank']
    members = _members(path)
    members['meta.npy'] = meta_member(meta)
    _write(tmp_path / 'norank.npz', members)
    with pytest.raises(MapFileError, match="lacks 'clip_rank'"):
        read_map(tmp_path / 'norank.npz', cfg, CLIP_DIM)
