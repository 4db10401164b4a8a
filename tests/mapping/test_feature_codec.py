"""mapping.feature_codec 'int8': CLIP features in half the bytes, Locate within a stated tolerance
of the bf16 map, map files unchanged (bf16) and loadable with either codec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, config_from_flat
from ros2_sab3r.mapping.codec import int8_decode, int8_encode
from ros2_sab3r.mapping.persistence import map_from_file, read_map, save_map
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap

pytestmark = pytest.mark.unit

# Largest change of a voxel's cosine with a unit query that int8 storage may cause (measured
# ~2e-3 on these maps: rounding to 1/254 of the largest channel, bf16 products on both sides).
COSINE_TOL = 1e-2


def test_int8_round_trip_error_is_half_a_step():
    x = np.random.default_rng(0).normal(size=(100, 512)).astype(np.float32)
    x[3] = 0
    q, scale = int8_encode(x)
    assert q.dtype == np.int8 and scale[3] == 0 and not q[3].any()
    err = np.abs(int8_decode(q, scale) - x)
    assert (err <= 0.5 * scale[:, None] + 1e-7).all()
    assert np.abs(q).max() == 127


def test_feature_codec_is_validated():
    with pytest.raises(ValueError, match='feature_codec'):
        config_from_flat({'mapping.feature_codec': 'fp4'})


def _two_maps(rng, n_batches=4, F=64):
    maps = {c: SemanticVoxelMap(MappingConfig(voxel_size_m=0.1, max_voxels=100_000,
                                              feature_codec=c), clip_dim=F)
            for c in ('bf16', 'int8')}
    for i in range(n_batches):
        X = rng.uniform(0, 3, (30_000, 3)).astype(np.float32)
        S = rng.normal(size=(40, F)).astype(np.float32)
        cells = rng.integers(0, 40, len(X))
        C = np.full(len(X), 3.0, np.float32)
        rgb = rng.integers(0, 255, (len(X), 3)).astype(np.uint8)
        for m in maps.values():
            m.integrate(X, C, rgb, i + 1, cells, S.copy())
    return maps


def test_int8_map_stores_half_the_bytes_and_keeps_cosines():
    rng = np.random.default_rng(1)
    maps = _two_maps(rng)
    snaps = {c: m.snapshot() for c, m in maps.items()}
    assert snaps['int8'].clip_codec == 'int8' and snaps['bf16'].clip_codec == 'bf16'
    np.testing.assert_array_equal(snaps['int8'].keys, snaps['bf16'].keys)
    blk8, blk16 = snaps['int8'].blocks[0], snaps['bf16'].blocks[0]
    assert blk8.clip.nbytes * 2 == blk16.clip.nbytes
    E = rng.normal(size=(5, 64)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    F = snaps['bf16'].features('clip').astype(np.float64)
    exact = E @ (F / np.linalg.norm(F, axis=1, keepdims=True)).T
    for codec, snap in snaps.items():
        got = snap.cosine(E)
        err = np.abs(got - exact).max()
        assert err <= COSINE_TOL, (codec, err)
    # int8: the norms the cosine divides by are those of the values read back
    snap = snaps['int8']
    np.testing.assert_allclose(np.linalg.norm(snap.features('clip'), axis=1),
                               snap._gather('clip_scale') / snap._inv_clip_norm, rtol=1e-5)
    assert np.abs(snaps['int8'].cosine(E) - snaps['bf16'].cosine(E)).max() <= COSINE_TOL


def test_int8_map_files_are_bf16_and_load_with_either_codec(tmp_path):
    rng = np.random.default_rng(2)
    maps = _two_maps(rng, n_batches=2)
    path = save_map(maps['int8'], tmp_path / 'int8.npz')
    for codec in ('bf16', 'int8'):
        cfg = dataclasses.replace(maps['int8'].cfg, feature_codec=codec)
        loaded = map_from_file(read_map(path, cfg, 64), cfg).snapshot()
        assert loaded.clip_codec == codec
        np.testing.assert_array_equal(loaded.keys, maps['int8'].snapshot().keys)
        a, b = loaded.features('clip'), maps['int8'].snapshot().features('clip')
        assert np.abs(a - b).max() <= 0.01 * np.abs(b).max()
