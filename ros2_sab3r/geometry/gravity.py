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
                     min_support: float = 0.1, iterations: int = 1000,
                     max_points: int = 10_000, max_score_points: int = 2000,
                     refine_candidates: int = 5,
                     seed: int = 0) -> np.ndarray:
    """(3,) unit gravity direction in the frame of `points` (N, 3).

    RANSAC over planes of the (subsampled) points whose normal is within `max_tilt_deg` of
    `prior_down`, ranked by their inliers (within `inlier_m`) among `max_score_points` points;
    the best `refine_candidates` are refined by least squares on their inliers and the one with
    the most inliers wins. Fewer than `min_support` of the points on it: the normalised prior.
    """
    prior = np.asarray(prior_down, np.float64)
    n_prior = np.linalg.norm(prior)
    if not np.isfinite(prior).all() or n_prior == 0:
        raise ValueError(f'prior_down={prior_down!r} must be a finite non-zero 3-vector')
    prior = prior / n_prior
    P = np.asarray(points).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    if len(P) > max_points:  # a random subset (with repetition: cheap on large maps)
        P = P[rng.integers(0, len(P), max_points)]
    P = P.astype(np.float64)
    P = P[np.isfinite(P).all(1)]
    if len(P) < 3:
        return prior
    cos_tilt = np.cos(np.radians(max_tilt_deg))
    tri = P[rng.integers(0, len(P), (iterations, 3))]  # (I, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1)
    ok = length > 1e-9
    normals[ok] /= length[ok, None]
    ok &= np.abs(normals @ prior) >= cos_tilt
    counts = np.zeros(len(tri), np.int64)
    score_on = P[rng.integers(0, len(P), min(max_score_points, len(P)))]  # ranking subset
    idx = np.flatnonzero(ok)
    for lo in range(0, len(idx), 256):  # (256, M) distances at a time
        i = idx[lo:lo + 256]
        dist = score_on @ normals[i].T - (tri[i, 0] * normals[i]).sum(1)  # (M, k)
        counts[i] = (np.abs(dist) < inlier_m).sum(0)
    best_normal, best_count = None, 0
    # The best few hypotheses, each refined by least squares on its inliers (a hypothesis
    # from three close points is tilted; the refit settles on the plane itself).
    for i in np.argsort(-counts)[:refine_candidates]:
        if counts[i] == 0:
            break
        normal, point = normals[i], tri[i, 0]
        for _ in range(4):
            inliers = np.abs((P - point) @ normal) < inlier_m
            if inliers.sum() < 3:
                break
            point = P[inliers].mean(0)
            normal = np.linalg.svd(P[inliers] - point, full_matrices=False)[2][-1]
        count = int((np.abs((P - point) @ normal) < inlier_m).sum())
        if abs(normal @ prior) >= cos_tilt and count > best_count:
            best_normal, best_count = normal, count
    if best_normal is None or best_count < min_support * len(P):
        return prior
    return best_normal * np.sign(best_normal @ prior)
