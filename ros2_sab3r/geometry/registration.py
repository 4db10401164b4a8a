"""Pose and scale of a new view from pair pointmaps (spec §8.3, weighted Umeyama).

A pair (i, j) decoded with view 1 = i gives P_i (i's points in i's frame) and Q_j (j's points in
i's frame), both at one unknown pair scale. When keyframe j already has a canonical pointmap X_j
(its own frame, map scale), the similarity that maps Q_j onto X_j pixel by pixel is the pose of i
relative to j, and its scale turns P_i into i's canonical pointmap. No matching is needed: the
pixels of j are the correspondences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_sab3r.config import GeometryConfig
from ros2_sab3r.geometry.transforms import invert, make_T
from ros2_sab3r.types import FrameRejected


class RegistrationError(FrameRejected):
    """A pair cannot be registered (too few confident points, degenerate geometry)."""


@dataclass(frozen=True)
class Similarity:
    """dst ~ s * R @ src + t."""

    s: float
    R: np.ndarray  # (3, 3)
    t: np.ndarray  # (3,)
    rmse: float  # weighted RMS residual, in dst units
    n_points: int


def umeyama(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None,
            with_scale: bool = True) -> Similarity:
    """Weighted least-squares similarity (or rigid) transform from (N, 3) src to (N, 3) dst.

    Minimises sum w ||s R src + t - dst||^2 in closed form (SVD of the weighted covariance).
    Raises RegistrationError when the points are too few or (near) collinear.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = len(src)
    if n < 3:
        raise RegistrationError(f'registration needs at least 3 points, got {n}')
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    wsum = w.sum()
    if not np.isfinite(wsum) or wsum <= 0:
        raise RegistrationError('registration weights are all zero or not finite')
    mu_s = (w[:, None] * src).sum(0) / wsum
    mu_d = (w[:, None] * dst).sum(0) / wsum
    a = src - mu_s
    b = dst - mu_d
    cov = (w[:, None] * b).T @ a / wsum  # (3, 3)
    U, sig, Vt = np.linalg.svd(cov)
    var_s = (w * (a * a).sum(-1)).sum() / wsum
    if var_s <= 1e-12 or sig[1] <= 1e-9 * max(sig[0], 1e-30):
        raise RegistrationError('registration points are degenerate (all equal or collinear)')
    Dm = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0])
    R = U @ Dm @ Vt
    s = float(np.trace(np.diag(sig) @ Dm) / var_s) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    r = s * src @ R.T + t - dst
    rmse = float(np.sqrt((w * (r * r).sum(-1)).sum() / wsum))
    return Similarity(s, R, t, rmse, n)


def confident_sample(C: np.ndarray, min_confidence: float, max_points: int,
                     *arrays: np.ndarray) -> np.ndarray:
    """Flat indices of pixels with finite data and C >= min_confidence, at most max_points.

    The sample is a deterministic even spread over the valid pixels, so that results do not
    depend on a random state.
    """
    valid = np.isfinite(C) & (C >= min_confidence)
    for a in arrays:
        if np.isfinite(a).all():  # the usual case, 5x cheaper than the per-pixel test
            continue
        valid &= np.isfinite(a).all(-1) if a.ndim == C.ndim + 1 else np.isfinite(a)
    idx = np.flatnonzero(valid.reshape(-1))
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(np.int64)]
    return idx


def shared_sample(Q_j: np.ndarray, C_q: np.ndarray, X_j: np.ndarray, C_j: np.ndarray,
                  cfg: GeometryConfig, purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, weights) of the pixels of j confident in both views, at most
    geometry.max_points_per_pair; weights are the confidence products. Raises RegistrationError
    when fewer than geometry.min_points are left (`purpose` completes the message)."""
    idx = confident_sample(np.minimum(C_q, C_j), cfg.min_confidence, cfg.max_points_per_pair,
                           Q_j, X_j)
    if len(idx) < cfg.min_points:
        raise RegistrationError(
            f'only {len(idx)} confident shared points (need {cfg.min_points}) {purpose}')
    w = (C_q.reshape(-1)[idx] * C_j.reshape(-1)[idx]).astype(np.float64)
    return idx, w


def register_to_keyframe(Q_j: np.ndarray, C_q: np.ndarray, X_j: np.ndarray, C_j: np.ndarray,
                         cfg: GeometryConfig) -> Similarity:
    """Similarity mapping j's points seen from i (pair scale, i's frame) onto j's canonical points.

    Q_j, X_j: (H, W, 3); C_q, C_j: (H, W). Weighted by the product of confidences, with one robust
    re-weighting pass that drops points far beyond the median residual (occlusion edges, noise).
    Returns dst = X_j frame, src = i's pair frame: T_ji = (R, t) and scale s for i's pointmap.
    """
    idx, w = shared_sample(Q_j, C_q, X_j, C_j, cfg, 'to register: the views do not overlap '
                           'enough or the pointmap confidence is too low')
    src = Q_j.reshape(-1, 3)[idx]
    dst = X_j.reshape(-1, 3)[idx]
    sim = umeyama(src, dst, w)
    res = np.linalg.norm(sim.s * src @ sim.R.T + sim.t - dst, axis=-1)
    keep = res <= max(3.0 * np.median(res), 1e-6)
    if keep.sum() >= max(cfg.min_points, 3) and not keep.all():
        sim = umeyama(src[keep], dst[keep], w[keep])
    return sim


def pair_scale_posed(Q_j: np.ndarray, C_q: np.ndarray, X_j: np.ndarray, C_j: np.ndarray,
                     T_W_i: np.ndarray, T_W_j: np.ndarray, cfg: GeometryConfig) -> float:
    """Scale s of a pair (i, j) when both poses are known and X_j is metric: Q_j ~ s T_ij X_j."""
    idx, w = shared_sample(Q_j, C_q, X_j, C_j, cfg, 'to fix the pair scale')
    T_ij = invert(T_W_i) @ T_W_j
    Y = X_j.reshape(-1, 3)[idx].astype(np.float64) @ T_ij[:3, :3].T + T_ij[:3, 3]
    Q = Q_j.reshape(-1, 3)[idx].astype(np.float64)
    den = (w * (Y * Y).sum(-1)).sum()
    if den <= 0:
        raise RegistrationError('pair scale is undefined: the keyframe points are all at zero')
    return float((w * (Q * Y).sum(-1)).sum() / den)


def bootstrap_scale_posed(Q_j: np.ndarray, C_q: np.ndarray, X_j: np.ndarray, C_j: np.ndarray,
                          T_W_i: np.ndarray, T_W_j: np.ndarray, cfg: GeometryConfig
                          ) -> tuple[float, float]:
    """Pair scale s and the scale k of an unscaled X_j (X_j = k * metric), from known poses.

    Q_j = s (R X_metric + t) = (s / k) R X_j + s t is linear in (s / k, s); the translation t
    between the cameras is what makes s observable, so a baseline below geometry.min_baseline_m
    (e.g. turning on the spot) raises RegistrationError and the caller waits for more motion.
    """
    T_ij = invert(T_W_i) @ T_W_j
    baseline = float(np.linalg.norm(T_ij[:3, 3]))
    if baseline < cfg.min_baseline_m:
        raise RegistrationError(
            f'baseline {baseline:.3f} m is below geometry.min_baseline_m={cfg.min_baseline_m}: '
            'the metric scale is not observable yet (pure rotation); move the camera')
    idx, w = shared_sample(Q_j, C_q, X_j, C_j, cfg, 'to fix the metric scale')
    RX = X_j.reshape(-1, 3)[idx].astype(np.float64) @ T_ij[:3, :3].T  # (N, 3)
    t = T_ij[:3, 3]
    Q = Q_j.reshape(-1, 3)[idx].astype(np.float64)
    A = np.array([[(w * (RX * RX).sum(-1)).sum(), (w * (RX @ t)).sum()],
                  [(w * (RX @ t)).sum(), w.sum() * (t @ t)]])
    b = np.array([(w * (Q * RX).sum(-1)).sum(), (w * (Q @ t)).sum()])
    if np.linalg.cond(A) > 1e10:
        raise RegistrationError('metric scale is ill-conditioned for this pair; move the camera')
    a, s = np.linalg.solve(A, b)
    if not (a > 0 and s > 0):
        raise RegistrationError(f'metric scale solve gave a non-positive scale ({a:.3g}, {s:.3g})')
    return float(s), float(s / a)


def similarity_to_T(sim: Similarity) -> np.ndarray:
    """The rigid part of a similarity as a (4, 4) transform (for map-scale points)."""
    return make_T(sim.R, sim.t)
