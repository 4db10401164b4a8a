"""Rigid and similarity transforms (4x4 homogeneous, float64)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.spatial.transform import Rotation

from ros2_sab3r.types import LocatedObject, OrientedBox


def make_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(3, 3) rotation and (3,) translation -> (4, 4) transform."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform without a general matrix inverse."""
    R, t = T[:3, :3], T[:3, 3]
    return make_T(R.T, -R.T @ t)


def apply(T: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Transform points (..., 3) by a (4, 4) transform; keeps X's float dtype."""
    return (X @ T[:3, :3].T.astype(X.dtype) + T[:3, 3].astype(X.dtype)).astype(X.dtype)


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a (3, 3) rotation, degrees, numerically safe near 0 and 180."""
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def pose_distance(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """(translation m, rotation deg) between two camera poses T_WC."""
    T_ab = invert(T_a) @ T_b
    return float(np.linalg.norm(T_ab[:3, 3])), rotation_angle_deg(T_ab[:3, :3])


def is_rigid(T: np.ndarray, tol: float = 1e-3) -> bool:
    """True for a finite (4, 4) transform with an orthonormal, right-handed rotation."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        return False
    R = T[:3, :3]
    return bool(np.allclose(R.T @ R, np.eye(3), atol=tol) and np.linalg.det(R) > 0
                and np.allclose(T[3], [0, 0, 0, 1], atol=tol))


def transform_located(obj: LocatedObject, T_TM: np.ndarray) -> LocatedObject:
    """Express a located object in another frame: T_TM maps map points into the target frame."""
    R, t = T_TM[:3, :3], T_TM[:3, 3]
    box = obj.box
    if box is not None:
        q = (Rotation.from_matrix(R) * Rotation.from_quat(box.quat_xyzw)).as_quat()
        box = OrientedBox(center=R @ box.center + t, quat_xyzw=q, size=box.size)
    return replace(
        obj,
        centroid=None if obj.centroid is None else R @ obj.centroid + t,
        box=box,
        points=None if obj.points is None else (obj.points @ R.T + t).astype(np.float32))
