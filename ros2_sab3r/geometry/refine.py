"""Window refinement: a new keyframe's pose and the scales of all its pairs, jointly.

Each pair (i, j) with a window keyframe j contributes j's points as seen from i (pair scale) and
j's canonical points placed in the world. The unknowns are the pose of i (6) and one log-scale per
pair; window keyframes already fused into the map stay fixed (moving them would leave the map
inconsistent with what was integrated). scipy's least_squares with a sparse Jacobian pattern and a
robust loss solves it in milliseconds. This is deliberately not a global alignment over all pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.transforms import make_T


@dataclass(frozen=True)
class PairConstraint:
    """Points of keyframe j seen from the new keyframe i, and the same points in the world."""

    Q: np.ndarray  # (N, 3) j's points in i's frame, pair scale
    Y_W: np.ndarray  # (N, 3) the same pixels of j's canonical pointmap, world frame
    w: np.ndarray  # (N,) weights (confidence products)
    scale: float  # initial pair scale (map units per pair unit)


@dataclass(frozen=True)
class RefinementResult:
    T_WC: np.ndarray  # (4, 4) refined pose of the new keyframe
    scales: np.ndarray  # (E,) refined per-pair scales
    rmse: float  # weighted RMS residual after refinement, map units
    iterations: int


def refine_keyframe(T_WC0: np.ndarray, pairs: list[PairConstraint], iterations: int,
                    robust_scale: float) -> RefinementResult:
    """Refine the pose T_WC0 of a new keyframe and the pair scales (see the module docstring).

    `robust_scale` (map units) is where the Huber loss stops trusting a residual.
    """
    E = len(pairs)
    sizes = [len(p.Q) for p in pairs]
    Q = np.concatenate([p.Q for p in pairs]).astype(np.float64)
    Y = np.concatenate([p.Y_W for p in pairs]).astype(np.float64)
    sw = np.sqrt(np.concatenate([p.w for p in pairs]).astype(np.float64))
    sw /= sw.mean()
    edge = np.repeat(np.arange(E), sizes)
    R0, t0 = T_WC0[:3, :3], T_WC0[:3, 3]

    def unpack(x):
        R = Rotation.from_rotvec(x[:3]).as_matrix() @ R0
        return R, t0 + x[3:6], np.exp(x[6:])

    def residuals(x):
        R, t, s = unpack(x)
        r = (s[edge, None] * Q) @ R.T + t - Y  # (N, 3)
        return (sw[:, None] * r).reshape(-1)

    pattern = lil_matrix((3 * len(Q), 6 + E), dtype=np.int8)
    pattern[:, :6] = 1
    rows = np.arange(3 * len(Q))
    pattern[rows, 6 + np.repeat(edge, 3)] = 1
    x0 = np.concatenate([np.zeros(6), np.log([p.scale for p in pairs])])
    sol = least_squares(residuals, x0, jac_sparsity=pattern, loss='huber', f_scale=robust_scale,
                        max_nfev=max(iterations, 1), method='trf', x_scale='jac')
    R, t, s = unpack(sol.x)
    r = residuals(sol.x).reshape(-1, 3) / sw[:, None]
    w = sw ** 2
    rmse = float(np.sqrt((w * (r * r).sum(-1)).sum() / w.sum()))
    return RefinementResult(make_T(R, t), s, rmse, int(sol.nfev))
