"""Oriented 3D boxes around point sets, and their overlap."""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.transform import Rotation

from ros2_sab3r.types import OrientedBox


def _box_from_axes(points: np.ndarray, R: np.ndarray, min_size: float) -> OrientedBox:
    local = points @ R  # (N, 3) coordinates along the box axes (columns of R)
    lo, hi = local.min(0), local.max(0)
    size = np.maximum(hi - lo, min_size)
    center = R @ ((lo + hi) / 2)
    if np.linalg.det(R) < 0:
        R = R.copy()
        R[:, 2] *= -1
    return OrientedBox(center=center, quat_xyzw=Rotation.from_matrix(R).as_quat(),
                       size=size.astype(np.float64))


def fit_box(points: np.ndarray, gravity: np.ndarray | None = None,
            min_size: float = 0.0) -> OrientedBox:
    """Smallest-footprint box around (N, 3) points.

    With a gravity direction the box is upright: its z axis is 'up' (opposite gravity) and its
    footprint is the minimum-area rectangle of the points projected on the floor plane (rotating
    calipers over the convex hull edges; a hull edge is always flush with the optimal rectangle).
    Without gravity the axes are the principal axes of the points (PCA). Every edge is at least
    `min_size` long (a flat or single-voxel instance still gets a box with volume).
    """
    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 3 or len(P) == 0:
        raise ValueError(f'fit_box needs (N, 3) points with N > 0, got {P.shape}')
    if gravity is None:
        if len(P) < 3:
            return _box_from_axes(P, np.eye(3), min_size)
        _, vecs = np.linalg.eigh(np.cov(P.T))
        return _box_from_axes(P, vecs[:, ::-1].copy(), min_size)
    up = -np.asarray(gravity, dtype=np.float64)
    up /= np.linalg.norm(up)
    e1 = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    xy = np.stack([P @ e1, P @ e2], -1)  # (N, 2) floor-plane coordinates
    theta = 0.0
    try:
        hull = xy[ConvexHull(xy).vertices]
        edges = np.roll(hull, -1, axis=0) - hull
        angles = np.arctan2(edges[:, 1], edges[:, 0])  # (K,) candidate orientations
        c, s = np.cos(angles), np.sin(angles)
        u = hull @ np.stack([c, s])  # (V, K) coordinate along each candidate axis
        v = hull @ np.stack([-s, c])
        area = (u.max(0) - u.min(0)) * (v.max(0) - v.min(0))
        theta = float(angles[np.argmin(area)])
    except (QhullError, ValueError):
        pass  # fewer than 3 distinct floor points: any orientation is as good
    ax = np.cos(theta) * e1 + np.sin(theta) * e2
    ay = np.cross(up, ax)
    return _box_from_axes(P, np.stack([ax, ay, up], axis=1), min_size)


def box_contains(box: OrientedBox, points: np.ndarray) -> np.ndarray:
    """(N,) bool: points (N, 3) inside the box."""
    local = (np.asarray(points) - box.center) @ box.rotation()
    return (np.abs(local) <= box.size / 2).all(-1)


def box_corners(box: OrientedBox) -> np.ndarray:
    """(8, 3) corners of the box."""
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    return box.center + (signs * box.size / 2) @ box.rotation().T


def box_iou(a: OrientedBox, b: OrientedBox, samples_per_axis: int = 64) -> float:
    """Volume IoU of two oriented boxes, estimated on a regular grid over their joint extent.

    Exact oriented-box intersection is a convex polytope clip; a grid estimate (error ~1% at 64
    samples per axis) is simpler and plenty for evaluation. Not for per-frame use.
    """
    corners = np.concatenate([box_corners(a), box_corners(b)])
    lo, hi = corners.min(0), corners.max(0)
    axes = [np.linspace(lo[k], hi[k], samples_per_axis) for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)
    ina, inb = box_contains(a, grid), box_contains(b, grid)
    union = (ina | inb).sum()
    return float((ina & inb).sum() / union) if union else 0.0
