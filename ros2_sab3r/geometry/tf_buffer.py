"""A time-indexed transform tree: tf2's buffer semantics in numpy.

tf2_ros is not published as a wheel. pytransform3d's TemporalTransformManager interpolates over
time but takes each edge's whole time series at once, which fits recorded data, not a stream of
/tf messages arriving one by one; this small buffer keeps a bounded history per edge instead and
answers ``lookup(target, source, stamp)`` by chaining edges through the tree with linear
interpolation of translation and spherical interpolation of rotation, like tf2.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
import threading

import numpy as np
from scipy.spatial.transform import Rotation, Slerp


class TransformLookupError(LookupError):
    """A transform that the buffer cannot provide; the message says which and why."""


@dataclass
class _Edge:
    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)  # sorted, ns
    transforms: dict[int, np.ndarray] = field(default_factory=dict)  # stamp -> (4, 4) T_PC


class TransformBuffer:
    """Transforms between named frames over time; thread-safe (one writer, many readers)."""

    def __init__(self, cache_ns: int = 10_000_000_000, tolerance_ns: int = 0) -> None:
        if cache_ns <= 0:
            raise ValueError(f'cache_ns={cache_ns} must be positive')
        self.cache_ns = cache_ns
        # stamps at most this far outside an edge's history still resolve to its nearest sample
        self.tolerance_ns = tolerance_ns
        self._edges: dict[str, _Edge] = {}  # child frame -> edge to its parent
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._edges.clear()

    def set_transform(self, parent: str, child: str, stamp_ns: int, T_PC: np.ndarray,
                      static: bool = False) -> None:
        """Record that ``T_PC`` maps points of ``child`` into ``parent`` at ``stamp_ns``."""
        if not parent or not child or parent == child:
            raise ValueError(f'invalid transform {parent!r} -> {child!r}')
        T = np.asarray(T_PC, np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f'transform {parent} -> {child} is not a finite 4x4 matrix')
        with self._lock:
            edge = self._edges.get(child)
            if edge is None or edge.parent != parent or edge.static != static:
                edge = self._edges[child] = _Edge(parent=parent, static=static)
            if static:
                edge.stamps, edge.transforms = [0], {0: T}
                return
            if stamp_ns not in edge.transforms:
                insort(edge.stamps, stamp_ns)
            edge.transforms[stamp_ns] = T
            horizon = edge.stamps[-1] - self.cache_ns
            while len(edge.stamps) > 2 and edge.stamps[0] < horizon:
                del edge.transforms[edge.stamps.pop(0)]

    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {e.parent for e in self._edges.values()}

    def lookup(self, target: str, source: str, stamp_ns: int | None) -> np.ndarray:
        """(4, 4) T_TS mapping points of ``source`` into ``target`` at ``stamp_ns``.

        ``stamp_ns=None`` asks for the latest transform of every edge (tf2's time zero).
        """
        if target == source:
            return np.eye(4)
        with self._lock:
            up_source = self._chain(source)
            up_target = self._chain(target)
            common = next((f for f in up_source if f in up_target), None)
            if common is None:
                known = sorted(set(self._edges) | {e.parent for e in self._edges.values()})
                missing = [f for f in (target, source) if f not in known]
                why = (f'unknown frame(s) {missing}' if missing
                       else f'{source!r} and {target!r} are not connected')
                raise TransformLookupError(f'no transform {target} <- {source}: {why}')
            T_common_source = self._compose(up_source, common, stamp_ns)
            T_common_target = self._compose(up_target, common, stamp_ns)
        return np.linalg.inv(T_common_target) @ T_common_source

    def _chain(self, frame: str) -> list[str]:
        chain = [frame]
        while chain[-1] in self._edges:
            parent = self._edges[chain[-1]].parent
            if parent in chain:
                raise TransformLookupError(f'transform loop through {parent!r}')
            chain.append(parent)
        return chain

    def _compose(self, chain: list[str], common: str, stamp_ns: int | None) -> np.ndarray:
        T = np.eye(4)
        for child in chain[:chain.index(common)]:
            T = self._edge_at(child, stamp_ns) @ T
        return T

    def _edge_at(self, child: str, stamp_ns: int | None) -> np.ndarray:
        edge = self._edges[child]
        if edge.static:
            return edge.transforms[0]
        stamps = edge.stamps
        if stamp_ns is None:
            return edge.transforms[stamps[-1]]
        if stamp_ns <= stamps[0] or stamp_ns >= stamps[-1]:
            nearest = stamps[0] if stamp_ns <= stamps[0] else stamps[-1]
            if abs(stamp_ns - nearest) <= self.tolerance_ns:
                return edge.transforms[nearest]
            side = 'past' if stamp_ns < stamps[0] else 'future'
            raise TransformLookupError(
                f'extrapolation into the {side}: {edge.parent} -> {child} is known for '
                f'[{stamps[0] / 1e9:.3f}, {stamps[-1] / 1e9:.3f}] s, '
                f'asked at {stamp_ns / 1e9:.3f} s')
        i = bisect_left(stamps, stamp_ns)
        if stamps[i] == stamp_ns:
            return edge.transforms[stamp_ns]
        t0, t1 = stamps[i - 1], stamps[i]
        A, B = edge.transforms[t0], edge.transforms[t1]
        alpha = (stamp_ns - t0) / (t1 - t0)
        T = np.eye(4)
        T[:3, :3] = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([A[:3, :3], B[:3, :3]])))(
            alpha).as_matrix()
        T[:3, 3] = (1 - alpha) * A[:3, 3] + alpha * B[:3, 3]
        return T
