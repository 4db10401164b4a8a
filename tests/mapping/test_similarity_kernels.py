"""Locate's similarity pass on int8 codes: the compiled loop (mapping.kernels) against float32
products, and the canonical negatives' per-block maxima cached by block version
(MapSnapshot.cosine_max with a BlockMaxCache)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import MappingConfig
from ros2_sab3r.mapping import kernels, snapshot
from ros2_sab3r.mapping.blocks import BLOCK_SIZE
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.mapping.snapshot import BlockMaxCache

pytestmark = pytest.mark.unit


@pytest.mark.parametrize('T', [1, 3, kernels.MAX_COMPILED_EMBEDDINGS])
def test_int8_dots_equal_the_float_product(T):
    rng = np.random.default_rng(T)
    F = rng.integers(-127, 128, (303, 128), dtype=np.int8)  # 75 groups of 4 rows and 3 more
    E = rng.normal(size=(T, 128)).astype(np.float32)
    out = np.full((T, 310), np.nan, np.float32)
    kernels.int8_dots(F, E, out, 5)
    want = E.astype(np.float64) @ F.T.astype(np.float64)
    np.testing.assert_allclose(out[:, 5:308], want, rtol=1e-5, atol=1e-3)
    assert np.isnan(out[:, :5]).all() and np.isnan(out[:, 308:]).all()  # nothing else written


def _map(codec: str, rng, n=12_000):
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.1, max_voxels=100_000,
                                       feature_codec=codec, clip_projection_dim=16), clip_dim=32)
    _integrate(m, rng, n, stamp=1)
    return m


def _integrate(m, rng, n, stamp, box=(0.0, 4.0)):
    X = rng.uniform(*box, (n, 3)).astype(np.float32)
    # one feature table of rank 8: features outside a pca_int8 map's basis would refit it,
    # which rewrites every block
    table = np.random.default_rng(99)
    S = (table.normal(size=(64, 8)) @ table.normal(size=(8, 32))).astype(np.float32)
    m.integrate(X, np.full(n, 3.0, np.float32), rng.integers(0, 255, (n, 3)).astype(np.uint8),
                stamp, rng.integers(0, 64, n), S)


def _unit(rng, T):
    E = rng.normal(size=(T, 32)).astype(np.float32)
    return E / np.linalg.norm(E, axis=1, keepdims=True)


@pytest.mark.parametrize('codec', ['int8', 'pca_int8'])
@pytest.mark.parametrize('threads', [0, 2])
def test_compiled_and_widened_passes_agree(codec, threads):
    """A few embeddings go through the compiled loop, many through widening + torch: the same
    cosines, and the same as decoding the stored features."""
    rng = np.random.default_rng(0)
    snap = _map(codec, rng).snapshot()
    assert len(snap.blocks) >= 2 and snap.n_voxels > BLOCK_SIZE
    E = _unit(rng, kernels.MAX_COMPILED_EMBEDDINGS + 1)
    many = snap.cosine(E, threads)  # widened
    few = snap.cosine(E[:2], threads)  # compiled
    np.testing.assert_allclose(few, many[:2], rtol=1e-5, atol=1e-5)
    F = snap.features('clip')
    norm = np.linalg.norm(F, axis=1)
    want = (E[:2] @ F.T) / np.maximum(norm, 1e-12)
    np.testing.assert_allclose(few, want, atol=1e-4)


@pytest.mark.parametrize('codec', ['bf16', 'pca_int8'])
def test_cosine_max_recomputes_only_the_blocks_written_since(codec, monkeypatch):
    rng = np.random.default_rng(1)
    m = _map(codec, rng, n=30_000)
    E = _unit(rng, 4)
    cache = BlockMaxCache()
    computed = []
    original = snapshot.MapSnapshot._products

    def spy(self, E_codes, blocks, threads):
        blocks = list(blocks)
        computed.append(blocks)
        return original(self, E_codes, blocks, threads)

    monkeypatch.setattr(snapshot.MapSnapshot, '_products', spy)
    first = m.snapshot()
    got = first.cosine_max(E, cache)
    np.testing.assert_allclose(got, first.cosine(E).max(axis=0), rtol=1e-6, atol=1e-6)
    n_blocks = len(first.blocks)
    assert n_blocks >= 3 and computed[-1] == list(range(n_blocks))
    # the same snapshot again: nothing computed, the same (read-only) answer
    computed.clear()
    assert first.cosine_max(E, cache) is got and computed == [] and not got.flags.writeable
    # a few voxels re-observed (slots follow the voxel keys, x first: the first blocks): only
    # the blocks the writer touched are recomputed, and the answer is that of a cold cache
    _integrate(m, rng, 200, stamp=2, box=(0.0, 0.3))
    second = m.snapshot()
    touched = [b for b, (x, y) in enumerate(zip(first.blocks, second.blocks))
               if x.version != y.version]
    assert 1 <= len(touched) < n_blocks
    computed.clear()
    warm = second.cosine_max(E, cache)
    assert computed == [sorted(touched + list(range(n_blocks, len(second.blocks))))]
    np.testing.assert_array_equal(warm, second.cosine_max(E, BlockMaxCache()))
    # the snapshot a reader held keeps its own answer
    np.testing.assert_array_equal(first.cosine_max(E, BlockMaxCache()), got)
    # other embeddings: another scope, computed afresh
    computed.clear()
    other = second.cosine_max(E[:2], cache)
    assert computed == [list(range(len(second.blocks)))]
    np.testing.assert_allclose(other, second.cosine(E[:2]).max(axis=0), rtol=1e-6, atol=1e-6)


def test_kernel_compiles_where_no_cache_directory_is_writable(monkeypatch, caplog):
    """A read-only install under a user without a writable home: numba finds no cache locator
    (it raised RuntimeError at decoration, failing the query engine's construction); the kernel
    is then compiled without a cache, with a warning naming NUMBA_CACHE_DIR."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, '_locator_classes', [])
    monkeypatch.setattr(kernels, '_KERNEL', None)
    with caplog.at_level('WARNING', logger=kernels.__name__):
        kernels.warm_up()
    assert kernels._KERNEL is not None and 'NUMBA_CACHE_DIR' in caplog.text
    F = np.arange(-64, 64, dtype=np.int8).reshape(4, 32)
    E = np.ones((2, 32), np.float32)
    out = np.zeros((2, 4), np.float32)
    kernels.int8_dots(F, E, out, 0)
    np.testing.assert_array_equal(out, np.broadcast_to(F.sum(axis=1, dtype=np.float32), (2, 4)))


@pytest.mark.parametrize('codec', ['int8', 'pca_int8'])
def test_cosine_with_a_free_slot_among_the_used_ones(codec):
    """Voxels in the first N slots (the usual layout) take the products as they are; a free slot
    among them (slot 5 of the first block here) makes the pass pick the used slots: both equal
    the cosines of the decoded features, voxel by voxel."""
    import copy
    import dataclasses

    rng = np.random.default_rng(2)
    snap = _map(codec, rng).snapshot()
    assert snap.slots[-1] == snap.n_voxels - 1  # the usual layout
    first = copy.copy(snap.blocks[0])
    first.valid = first.valid.copy()
    assert first.valid[5]
    first.valid[5] = False
    holed = dataclasses.replace(snap, blocks=(first, *snap.blocks[1:]),
                                n_voxels=snap.n_voxels - 1)
    E = _unit(rng, 3)
    for s in (snap, holed):
        F = s.features('clip')
        want = (E @ F.T) / np.maximum(np.linalg.norm(F, axis=1), 1e-12)
        np.testing.assert_allclose(s.cosine(E), want, atol=1e-4)
    np.testing.assert_allclose(holed.cosine(E), np.delete(snap.cosine(E), 5, axis=1), atol=1e-6)
