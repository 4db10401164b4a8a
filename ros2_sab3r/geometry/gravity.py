"""Gravity from the map itself, for unposed maps (no TF, so no known 'up').

An unposed map's frame is the first keyframe's camera (OpenCV: y down). A robot's or a hand-held
camera is roughly level, so the cameras' mean down direction is a prior within a few tens of
degrees of gravity; the floor (and the ceiling) then give it exactly: the largest plane of the
map whose normal lies within ``max_tilt_deg`` of the prior is horizontal, and gravity is its
normal, signed along the prior. Without such a plane the prior itself is returned.
"""

from __future__ import annotations

import numpy as np

CAMERA_DOWN = np.array([0.0, 1.0, 0.0])  # OpenCV camera frame: y points down


def estimate_gravity(points: np.ndarray, prior_down: np.ndarray = CAMERA_DOWN,
                     inlier_m: float = 0.05, max_tilt_deg: float = 35.0,
                     min_support: float = 0.05, iterations: int = 300,
                     max_points: int = 20_000, seed: int = 0) -> np.ndarray:
    """(3,) unit gravity direction in the frame of `points` (N, 3).

    RANSAC over planes of the (subsampled) points whose normal is within `max_tilt_deg` of
    `prior_down`; the plane with the most inliers (within `inlier_m`) is refined by least squares
    on its inliers. Fewer than `min_support` of the points on it: the normalised prior.
    """
    prior = np.asarray(prior_down, np.float64)
    n_prior = np.linalg.norm(prior)
    if not np.isfinite(prior).all() or n_prior == 0:
        raise ValueError(f'prior_down={prior_down!r} must be a finite non-zero 3-vector')
    prior = prior / n_prior
    P = np.asarray(points, np.float64).reshape(-1, 3)
    P = P[np.isfinite(P).all(1)]
    if len(P) < 3:
        return prior
    rng = np.random.default_rng(seed)
    if len(P) > max_points:
        P = P[rng.choice(len(P), max_points, replace=False)]
    cos_tilt = np.cos(np.radians(max_tilt_deg))
    tri = P[rng.integers(0, len(P), (iterations, 3))]  # (I, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1)
    ok = length > 1e-9
    normals[ok] /= length[ok, None]
    ok &= np.abs(normals @ prior) >= cos_tilt
    best, best_count = None, 0
    for i in np.flatnonzero(ok):
        inliers = np.abs((P - tri[i, 0]) @ normals[i]) < inlier_m
        count = int(inliers.sum())
        if count > best_count:
            best, best_count = inliers, count
    if best is None or best_count < min_support * len(P):
        return prior
    Q = P[best] - P[best].mean(0)
    normal = np.linalg.svd(Q, full_matrices=False)[2][-1]
    if abs(normal @ prior) < cos_tilt:
        return prior
    return normal * np.sign(normal @ prior)
