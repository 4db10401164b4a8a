"""Crafted map archives and images for the hostile-input tests (persistence and node)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write(path, content: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, 'w', compression) as z:
        for name, data in content.items():
            z.writestr(name, data)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def meta_of(path) -> dict:
    blob = np.load(io.BytesIO(members(path)['meta.npy']))
    return json.loads(blob.tobytes().decode('utf-8'))


def meta_member(meta: dict) -> bytes:
    return npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))


def with_meta(path, out, **changes) -> None:
    """A copy of the map at `path` with metadata values replaced."""
    content = members(path)
    content['meta.npy'] = meta_member({**meta_of(path), **changes})
    write(out, content)


def header_only(dtype: str, shape: tuple) -> bytes:
    """A .npy header declaring `shape` with no data behind it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {'descr': dtype, 'fortran_order': False,
                                               'shape': shape})
    assert buf.getvalue().startswith(b'\x93NUMPY')  # the magic is written with the header
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height grey pixels (a decompression bomb for a
    decoder that trusts it: the rows are one zlib stream of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = zlib.compressobj(9)
    body = rows.compress(bytes(width + 1) * 64) + rows.flush()  # only the first rows
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b'IDAT', body) + chunk(b'IEND', b''))
