"""Blocks: fixed-size slots of voxels (struct of arrays), the unit of copy-on-write."""

from __future__ import annotations

import itertools
import mmap

import numpy as np

BLOCK_SIZE = 4096  # voxel slots per block: the unit of copy-on-write
# Stored feature dtypes per mapping.feature_codec (see mapping.codec): (CLIP, DINO). int8 values
# come with a float32 scale per voxel (value = q * scale).
FEATURE_DTYPES = {'bf16': (np.uint16, np.float16), 'int8': (np.int8, np.float16),
                  'pca_int8': (np.int8, np.int8)}
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_POPULATE', 0)
# Block versions, unique in the process: readers cache what they computed from a block by its
# version (snapshot.BlockMaxCache). next() on a count is atomic.
_VERSIONS = itertools.count(1)


def next_version() -> int:
    """A block version no block of this process has had."""
    return next(_VERSIONS)


class Block:
    """Slots of BLOCK_SIZE voxels (struct of arrays), all in one anonymous memory mapping.

    Why a mapping of its own and not numpy's allocator: copy-on-write replaces every block an
    integration touches (~4 MB each at 512-d CLIP). From the malloc heap, those long-lived
    copies interleave with the integration's temporaries of varying size and fragment it: over
    10 000 frames RSS crept by 5-8 MB per 1000 frames while the memory in use stayed flat. A
    mapping goes back to the system as soon as its block is dropped (RSS now flat within 0.1 MB
    per 1000 frames); the price is faulting in fresh pages for each copy, ~9% of the integration
    rate of a fresh map.

    clip_width, dino_width: stored channels (the projection's rank under 'pca_int8').
    version: new (:func:`next_version`) whenever the block is made or handed to the writer to
    change (SemanticVoxelMap._writable); equal versions mean equal contents.
    """

    ARRAYS = ('keys', 'valid', 'pos', 'color', 'weight', 'count', 'last_seen', 'clip',
              'clip_scale', 'clip_norm', 'clip_w', 'dino', 'dino_scale', 'dino_w')
    __slots__ = (*ARRAYS, 'codec', 'version')

    def __init__(self, clip_width: int, dino_width: int, codec: str = 'bf16') -> None:
        """codec: mapping.feature_codec ('bf16', 'int8' or 'pca_int8')."""
        if codec not in FEATURE_DTYPES:
            raise ValueError(f'feature codec {codec!r} is not one of {", ".join(FEATURE_DTYPES)}')
        self.codec = codec
        self.version = next_version()
        n = BLOCK_SIZE
        clip_dt, dino_dt = FEATURE_DTYPES[codec]
        clip_scaled = clip_dt == np.int8 and clip_width > 0
        dino_scaled = dino_dt == np.int8 and dino_width > 0
        fields = [('keys', np.int64, 1), ('valid', np.bool_, 1), ('pos', np.float32, 3),
                  ('color', np.float32, 3), ('weight', np.float32, 1), ('count', np.uint32, 1),
                  ('last_seen', np.int64, 1),
                  ('clip', clip_dt, clip_width),  # None when clip_width is 0
                  ('clip_scale', np.float32, int(clip_scaled)),  # int8 only, else None
                  ('clip_norm', np.float32, 1),  # L2 norm of each stored clip row (0: none)
                  ('clip_w', np.float32, 1), ('dino', dino_dt, dino_width),
                  ('dino_scale', np.float32, int(dino_scaled)), ('dino_w', np.float32, 1)]
        # each array starts on a 64-byte boundary (cache lines, vector loads)
        sizes = [(n * width * np.dtype(dt).itemsize + 63) // 64 * 64 for _, dt, width in fields]
        # zero-filled, unmapped when its last array is freed; private (shared anonymous memory
        # is tmpfs-backed, slower to fault in) and populated in one call rather than page by
        # page (~10% of the integration time of a 512x384 keyframe)
        buf = mmap.mmap(-1, sum(sizes), flags=_MAP_FLAGS)
        offset = 0
        for (name, dt, width), size in zip(fields, sizes):
            if width == 0:
                setattr(self, name, None)
                continue
            a = np.frombuffer(buf, dt, n * width, offset)
            setattr(self, name, a.reshape(n, width) if name in ('pos', 'color', 'clip', 'dino')
                    else a)
            offset += size

    def copy(self, dino_width: int | None = None) -> Block:
        """A copy; with dino_width, one with (zero) DINO features of that width added."""
        new = Block(0 if self.clip is None else self.clip.shape[1],
                    dino_width if dino_width is not None else
                    0 if self.dino is None else self.dino.shape[1], self.codec)
        for name in Block.ARRAYS:
            value = getattr(self, name)
            if value is not None and getattr(new, name) is not None:
                np.copyto(getattr(new, name), value)
        return new

    @property
    def nbytes(self) -> int:
        """Bytes of the block's arrays."""
        return sum(getattr(self, f).nbytes for f in Block.ARRAYS if getattr(self, f) is not None)
