"""mapping.feature_codec 'int8': CLIP features in half the bytes, Locate within a stated tolerance
of the bf16 map, map files unchanged (bf16) and loadable with either codec."""

from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig, config_from_flat
from ros2_sab3r.mapping.blocks import BLOCK_SIZE
from ros2_sab3r.mapping.codec import FeatureProjection, int8_decode, int8_encode
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


def test_int8_map_files_store_int8_and_load_with_any_codec(tmp_path):
    rng = np.random.default_rng(2)
    maps = _two_maps(rng, n_batches=2)
    path = save_map(maps['int8'], tmp_path / 'int8.npz')
    with zipfile.ZipFile(path) as z:
        assert {'clip_int8.npy', 'clip_scale.npy'} <= set(z.namelist())
        assert 'clip_bf16.npy' not in z.namelist()
    for codec in ('bf16', 'int8', 'pca_int8'):
        cfg = dataclasses.replace(maps['int8'].cfg, feature_codec=codec)
        loaded = map_from_file(read_map(path, cfg, 64), cfg).snapshot()
        assert loaded.clip_codec == codec
        np.testing.assert_array_equal(loaded.keys, maps['int8'].snapshot().keys)
        a, b = loaded.features('clip'), maps['int8'].snapshot().features('clip')
        # pca_int8 (full rank here, 64 channels): rotated and rounded to int8 a second time
        assert np.abs(a - b).max() <= (0.02 if codec == 'pca_int8' else 0.01) * np.abs(b).max()


# ------------------------------------------------------------------------------------ pca_int8
# Scene-like features: a few dozen directions (objects) plus noise of 5% of the energy
DIRECTIONS = 24


def _scene_features(rng, dirs, n_cells, noise=0.05):
    S = dirs[rng.integers(0, len(dirs), n_cells)]
    return (S + noise / np.sqrt(dirs.shape[1]) * rng.normal(size=S.shape)).astype(np.float32)


def _pca_pair(rng, F=128, Fd=96, batches=((0, 12), (0, 12), (12, 24)), **cfg):
    """A bf16 and a pca_int8 map fed the same keyframes; each batch shows directions lo..hi."""
    dirs = rng.normal(size=(DIRECTIONS, F)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    ddirs = rng.normal(size=(DIRECTIONS, Fd)).astype(np.float32)
    maps = {c: SemanticVoxelMap(MappingConfig(voxel_size_m=0.1, max_voxels=100_000,
                                              feature_codec=c, **cfg), clip_dim=F, dino_dim=Fd)
            for c in ('bf16', 'pca_int8')}
    for i, (lo, hi) in enumerate(batches):
        X = rng.uniform(0, 3, (20_000, 3)).astype(np.float32) + 4 * i
        S = _scene_features(rng, dirs[lo:hi], 300)
        D = ddirs[lo:hi][rng.integers(0, hi - lo, 300)]
        cells = rng.integers(0, 300, len(X))
        C = np.full(len(X), 3.0, np.float32)
        rgb = rng.integers(0, 255, (len(X), 3)).astype(np.uint8)
        for m in maps.values():
            m.integrate(X, C, rgb, i + 1, cells, S.copy(), D.copy())
    return maps, dirs


def _cosines(snap, E):
    F = snap.features('clip').astype(np.float64)
    return E @ (F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)).T


def test_pca_int8_fits_the_map_and_keeps_cosines():
    """Locate's similarity pass on the projected codes equals the bf16 map's within 2e-2 (the
    noise outside the basis is what moves it), and feature_rows() reconstructs the features."""
    rng = np.random.default_rng(3)
    maps, dirs = _pca_pair(rng, clip_projection_dim=32, dino_projection_dim=32)
    snaps = {c: m.snapshot() for c, m in maps.items()}
    pca = snaps['pca_int8']
    assert pca.clip_codec == 'pca_int8' and pca.clip_projection.basis.shape == (128, 32)
    np.testing.assert_allclose(pca.clip_projection.basis.T @ pca.clip_projection.basis,
                               np.eye(32), atol=1e-5)
    assert pca.blocks[0].clip.shape == (BLOCK_SIZE, 32) and pca.blocks[0].dino.dtype == np.int8
    assert pca.blocks[0].dino.shape == (BLOCK_SIZE, 32)  # mapping.dino_projection_dim
    # the third batch brought 12 new directions: the basis was refitted, the old codes rotated
    assert maps['pca_int8'].projections['clip'].refits >= 1
    E = np.concatenate([dirs, rng.normal(size=(8, 128))]).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    exact = snaps['bf16'].cosine(E)
    err = np.abs(pca.cosine(E) - exact)
    assert err.max() <= 2e-2, err.max()
    # what the similarity pass computes is the cosine with the reconstructed features
    np.testing.assert_allclose(pca.cosine(E), _cosines(pca, E), atol=2e-3)
    a, b = pca.features('clip'), snaps['bf16'].features('clip')
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel.max() <= 0.1, rel.max()  # the noise outside the basis (5% of the energy)
    # DINO: reconstructed cosines between voxels (instance split/merge) within 2e-2
    da, db = pca.features('dino'), snaps['bf16'].features('dino')
    da /= np.linalg.norm(da, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    assert np.abs(da[:500] @ da[:500].T - db[:500] @ db[:500].T).max() <= 2e-2


def test_pca_int8_without_refits_loses_what_the_first_fit_missed():
    """The refit is what keeps new objects: with refits off (refit threshold 1), features of
    directions the first keyframes never showed are projected away."""
    rng = np.random.default_rng(4)
    maps, dirs = _pca_pair(rng, clip_projection_dim=16, projection_refit_residual=1.0)
    assert maps['pca_int8'].projections['clip'].refits == 0
    E = dirs[12:] / np.linalg.norm(dirs[12:], axis=1, keepdims=True)
    err = np.abs(maps['pca_int8'].snapshot().cosine(E) - maps['bf16'].snapshot().cosine(E))
    assert err.max() > 0.2


def test_pca_int8_bytes_per_voxel_under_300_with_512_clip_and_768_dino():
    blk = SemanticVoxelMap(MappingConfig(feature_codec='pca_int8'), clip_dim=512, dino_dim=768)
    blk._allocate(1)
    per_voxel = blk._blocks[0].nbytes / BLOCK_SIZE + 16  # + the key index (key, slot)
    assert per_voxel <= 300, per_voxel
    bf16 = SemanticVoxelMap(MappingConfig(feature_codec='bf16'), clip_dim=512, dino_dim=768)
    bf16._allocate(1)
    assert bf16._blocks[0].nbytes / BLOCK_SIZE > 4 * per_voxel


def test_a_refit_leaves_handed_out_snapshots_as_they_were():
    rng = np.random.default_rng(5)
    maps, dirs = _pca_pair(rng, batches=((0, 12), (0, 12)), clip_projection_dim=16)
    m = maps['pca_int8']
    before = m.snapshot()
    F_before = before.features('clip').copy()
    raw = [b.clip.copy() for b in before.blocks]
    refits = m.projections['clip'].refits
    X = rng.uniform(0, 3, (20_000, 3)).astype(np.float32)
    m.integrate(X, np.full(len(X), 3.0, np.float32), np.zeros((len(X), 3), np.uint8), 9,
                rng.integers(0, 300, len(X)), _scene_features(rng, dirs[12:], 300))
    assert m.projections['clip'].refits == refits + 1
    for b, r in zip(before.blocks, raw):
        np.testing.assert_array_equal(b.clip, r)
    np.testing.assert_array_equal(before.features('clip'), F_before)
    assert m.snapshot().clip_projection.basis is not before.clip_projection.basis


def test_pca_int8_maps_save_and_load_as_they_are(tmp_path):
    rng = np.random.default_rng(6)
    maps, dirs = _pca_pair(rng, clip_projection_dim=32)
    m = maps['pca_int8']
    path = save_map(m, tmp_path / 'pca.npz')
    with zipfile.ZipFile(path) as z:
        assert {'clip_int8.npy', 'clip_basis.npy', 'dino_int8.npy'} <= set(z.namelist())
    loaded = map_from_file(read_map(path, m.cfg, 128), m.cfg)
    a, b = loaded.snapshot(), m.snapshot()
    np.testing.assert_array_equal(a.clip_projection.basis, b.clip_projection.basis)
    np.testing.assert_array_equal(a._gather('clip'), b._gather('clip'))
    np.testing.assert_array_equal(a._gather('dino'), b._gather('dino'))
    E = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    np.testing.assert_array_equal(a.cosine(E), b.cosine(E))
    # the loaded map keeps refitting where the saved one would have
    assert loaded.projections['clip'].fit_residual == m.projections['clip'].fit_residual
    # a bf16 file loaded as pca_int8 gets a projection fitted to its features, and back
    bf16_path = save_map(maps['bf16'], tmp_path / 'bf16.npz')
    as_pca = map_from_file(read_map(bf16_path, m.cfg, 128), m.cfg).snapshot()
    assert as_pca.clip_codec == 'pca_int8'
    assert np.abs(as_pca.cosine(E) - maps['bf16'].snapshot().cosine(E)).max() <= 2e-2
    cfg16 = dataclasses.replace(m.cfg, feature_codec='bf16')
    as_bf16 = map_from_file(read_map(path, cfg16, 128), cfg16).snapshot()
    assert as_bf16.clip_codec == 'bf16'
    assert np.abs(as_bf16.cosine(E) - b.cosine(E)).max() <= 1e-2


def test_feature_projection_rotation_maps_old_codes_to_new():
    rng = np.random.default_rng(7)
    p = FeatureProjection(64, 8, 0.1)
    A = rng.normal(size=(8, 64)).astype(np.float32)
    p.observe(rng.normal(size=(200, 4)).astype(np.float32) @ A[:4])
    old = p.basis.copy()
    x = (rng.normal(size=(10, 4)) @ A[:4]).astype(np.float32)  # in the old span
    R = p.observe(rng.normal(size=(200, 8)).astype(np.float32) @ A)
    assert R is not None and p.refits == 1
    np.testing.assert_allclose((x @ old) @ R @ p.basis.T, x, atol=1e-3)


def test_cosine_rows_are_the_cosines_of_the_decoded_features_of_those_voxels():
    """snapshot.cosine_rows (calibrated Locate's competitors, computed in the codes' space) against
    the cosine with the decoded features, for every codec, rows in any order."""
    rng = np.random.default_rng(7)
    maps, _ = _pca_pair(rng, clip_projection_dim=32, dino_projection_dim=32)
    maps = {**maps, 'int8': _two_maps(np.random.default_rng(8))['int8']}
    for codec, m in maps.items():
        snap = m.snapshot()
        E = rng.normal(size=(70, snap.clip_dim)).astype(np.float32)  # a vocabulary's worth
        E /= np.linalg.norm(E, axis=1, keepdims=True)
        rows = rng.permutation(snap.n_voxels)[:300]
        F = snap.feature_rows('clip', rows).astype(np.float64)
        want = E @ (F / np.linalg.norm(F, axis=1, keepdims=True)).T
        got = snap.cosine_rows(E, rows)
        assert got.shape == (70, 300) and got.dtype == np.float32
        # (bf16: the stored norm is the mean's before rounding to bfloat16, ~1e-4 off)
        np.testing.assert_allclose(got, want, atol=1e-4 if codec != 'bf16' else 5e-4,
                                   err_msg=codec)
        np.testing.assert_allclose(got, snap.cosine(E)[:, rows], atol=3e-3, err_msg=codec)
    assert snap.cosine_rows(E, np.zeros(0, np.int64)).shape == (70, 0)
