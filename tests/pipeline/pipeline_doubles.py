"""Test doubles for the pipeline tests."""

from __future__ import annotations

from collections.abc import Sequence
import hashlib

import numpy as np


class HashTextEncoderDouble:
    """A TextEncoder test double: a fixed pseudo-random unit vector per string.

    Distinct strings get near-orthogonal embeddings (cosine ~ N(0, 1/sqrt(dim))), which is what the
    pipeline tests need: a real text tower with random weights would not separate class names.
    """

    def __init__(self, dim: int = 512) -> None:
        self._dim = dim
        self.calls = 0  # encode() calls, to check caching

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'little')
            v = np.random.default_rng(seed).standard_normal(self._dim)
            out[i] = v / np.linalg.norm(v)
        return out


class CorruptingBackendDouble:
    """Wraps a backend and damages the pair outputs of chosen frames (bad-input tests).

    mode 'nan': view 1 points all NaN; 'zero_conf': all confidences 0; 'half_nan': half of the
    points NaN (must still work).
    """

    def __init__(self, inner, bad_stamps: set[int], mode: str) -> None:
        self.inner = inner
        self.bad_stamps = set(bad_stamps)
        self.mode = mode
        self.name = f'corrupting({inner.name})'
        self.device = inner.device
        self.input_size = inner.input_size

    def encode(self, frame):
        return self.inner.encode(frame)

    def decode(self, a, b):
        import dataclasses

        pred = self.inner.decode(a, b)
        if a.stamp_ns not in self.bad_stamps:
            return pred
        v1, v2 = pred.view1, pred.view2
        if self.mode == 'nan':
            v1 = dataclasses.replace(v1, X=np.full_like(v1.X, np.nan))
            v2 = dataclasses.replace(v2, X=np.full_like(v2.X, np.nan))
        elif self.mode == 'zero_conf':
            v1 = dataclasses.replace(v1, C=np.zeros_like(v1.C))
            v2 = dataclasses.replace(v2, C=np.zeros_like(v2.C))
        elif self.mode == 'half_nan':
            X1 = v1.X.copy()
            X1[::2] = np.nan
            X2 = v2.X.copy()
            X2[::2] = np.nan
            v1 = dataclasses.replace(v1, X=X1)
            v2 = dataclasses.replace(v2, X=X2)
        return dataclasses.replace(pred, view1=v1, view2=v2)
