"""Test doubles for the pipeline tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ros2_sab3r.sim.standin import HashTextEncoderStandIn


class HashTextEncoderDouble(HashTextEncoderStandIn):
    """The package's hashing text-encoder stand-in, counting its encode() calls (caching tests).

    Distinct strings get near-orthogonal embeddings, which is what the pipeline tests need: a
    real text tower with random weights would not separate class names.
    """

    def __init__(self, dim: int = 512) -> None:
        super().__init__(dim)
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return super().encode(texts)


class CorruptingBackendDouble:
    """Wraps a backend and damages the pair outputs of chosen frames (bad-input tests).

    mode 'nan': view 1 points all NaN; 'zero_conf': all confidences 0; 'half_nan': half of the
    points and a third of the descriptors NaN (must still work).
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
            D1 = v1.D.copy()
            D1[:, ::3] = np.nan  # other pixels than the points: the overlap still has seeds
            D2 = v2.D.copy()
            D2[:, ::3] = np.nan
            v1 = dataclasses.replace(v1, X=X1, D=D1)
            v2 = dataclasses.replace(v2, X=X2, D=D2)
        return dataclasses.replace(pred, view1=v1, view2=v2)


class FinerDinoBackendDouble(CorruptingBackendDouble):
    """Wraps a backend and returns its DINO features on a grid twice as fine as the CLIP one
    (real heads may differ in stride)."""

    def __init__(self, inner) -> None:
        super().__init__(inner, set(), 'none')
        self.name = f'finer-dino({inner.name})'

    def decode(self, a, b):
        import dataclasses

        pred = self.inner.decode(a, b)

        def finer(v):
            S = v.S_dino.repeat(2, axis=0).repeat(2, axis=1)
            return dataclasses.replace(v, S_dino=S)

        return dataclasses.replace(pred, view1=finer(pred.view1), view2=finer(pred.view2))
