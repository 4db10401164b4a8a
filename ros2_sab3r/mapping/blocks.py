"""Blocks: fixed-size slots of voxels (struct of arrays), the unit of copy-on-write."""

from __future__ import annotations

import mmap

import numpy as np

BLOCK_SIZE = 4096  # voxel slots per block: the unit of copy-on-write
# CLIP storage per mapping.feature_codec (see mapping.codec)
CLIP_DTYPES = {'bf16': np.uint16, 'int8': np.int8}
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_POPULATE', 0)


class Block:
    """Slots of BLOCK_SIZE voxels (struct of arrays), all in one anonymous memory mapping.

    Why a mapping of its own and not numpy's allocator: copy-on-write replaces every block an
    integration touches (~4 MB each at 512-d CLIP). From the malloc heap, those long-lived
    copies interleave with the integration's temporaries of varying size and fragment it: over
    10 000 frames RSS crept by 5-8 MB per 1000 frames while the memory in use stayed flat. A
    mapping goes back to the system as soon as its block is dropped (RSS now flat within 0.1 MB
    per 1000 frames); the price is faulting in fresh pages for each copy, ~9% of the integration
    rate of a fresh map.
    """

    __slots__ = ('keys', 'valid', 'pos', 'color', 'weight', 'count', 'last_seen', 'clip',
                 'clip_scale', 'clip_norm', 'clip_w', 'dino', 'dino_w')

    def __init__(self, clip_dim: int, dino_dim: int, codec: str = 'bf16') -> None:
        """codec: mapping.feature_codec of the CLIP features ('bf16' or 'int8')."""
        if codec not in CLIP_DTYPES:
            raise ValueError(f'feature codec {codec!r} is not one of {", ".join(CLIP_DTYPES)}')
        n = BLOCK_SIZE
        int8 = codec == 'int8' and clip_dim > 0
        fields = [('keys', np.int64, 1), ('valid', np.bool_, 1), ('pos', np.float32, 3),
                  ('color', np.float32, 3), ('weight', np.float32, 1), ('count', np.uint32, 1),
                  ('last_seen', np.int64, 1),
                  # bfloat16 bits or int8 values; None when clip_dim is 0
                  ('clip', CLIP_DTYPES[codec], clip_dim),
                  ('clip_scale', np.float32, int(int8)),  # int8: value = q * scale; else None
                  ('clip_norm', np.float32, 1),  # L2 norm of each clip row (0: no feature)
                  ('clip_w', np.float32, 1), ('dino', np.float16, dino_dim),
                  ('dino_w', np.float32, 1)]
        # each array starts on a 64-byte boundary (cache lines, vector loads)
        sizes = [(n * width * np.dtype(dt).itemsize + 63) // 64 * 64 for _, dt, width in fields]
        # zero-filled, unmapped when its last array is freed; private (shared anonymous memory
        # is tmpfs-backed, slower to fault in) and populated in one call rather than page by
        # page (~10% of the integration time of a 512x384 keyframe)
        buf = mmap.mmap(-1, sum(sizes), flags=_MAP_FLAGS)
        offset = 0
        for (name, dt, width), size in zip(fields, sizes):
            if name in ('clip', 'clip_scale', 'dino') and width == 0:
                setattr(self, name, None)
                continue
            a = np.frombuffer(buf, dt, n * width, offset)
            setattr(self, name, a.reshape(n, width) if name in ('pos', 'color', 'clip', 'dino')
                    else a)
            offset += size

    @property
    def codec(self) -> str:
        """mapping.feature_codec of the CLIP features ('bf16' without any)."""
        return 'int8' if self.clip is not None and self.clip.dtype == np.int8 else 'bf16'

    def copy(self, dino_dim: int | None = None) -> Block:
        """A copy; with dino_dim, one with (zero) DINO features of that width added."""
        new = Block(0 if self.clip is None else self.clip.shape[1],
                     dino_dim if dino_dim is not None else
                     0 if self.dino is None else self.dino.shape[1], self.codec)
        for name in Block.__slots__:
            value = getattr(self, name)
            if value is not None:
                np.copyto(getattr(new, name), value)
        return new

