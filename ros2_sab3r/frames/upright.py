"""The published map made upright when nothing gives it a vertical (unposed mode).

An unposed map's frame is its first keyframe's camera (OpenCV: y down, z forward), so RViz and
every consumer of ``map`` would see the world on its side. The node publishes the map, poses,
TF and Locate answers in an upright frame U instead: the smallest rotation of the map frame W
that takes gravity to -z (REP-103: z up), origin and heading kept. Gravity comes from the
robot's TF when it gives the camera in a z-up ``odom`` (:func:`down_from_odom`), else from the
map's floor plane (``Pipeline.gravity``). The map itself, and map files, stay in W.
"""

from __future__ import annotations

import numpy as np

UP = np.array([0.0, 0.0, 1.0])


def upright_transform(down: np.ndarray | None) -> np.ndarray | None:
    """(4, 4) T_UW rotating the gravity direction `down` (in W) onto -z, the smallest such
    rotation; None when `down` is None or not a finite non-zero vector."""
    if down is None:
        return None
    a = np.asarray(down, np.float64).reshape(3)
    n = np.linalg.norm(a)
    if not np.isfinite(a).all() or n == 0:
        return None
    a = a / n
    b = -UP
    c = float(a @ b)
    T = np.eye(4)
    if c < -1.0 + 1e-12:  # down is +z: half a turn about x
        T[:3, :3] = np.diag([1.0, -1.0, -1.0])
        return T
    v = np.cross(a, b)
    V = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    T[:3, :3] = np.eye(3) + V + V @ V / (1.0 + c)
    return T


def down_from_odom(T_WC: np.ndarray, T_OC: np.ndarray) -> np.ndarray:
    """Gravity in the map frame W from the robot's TF: odom is z-up (REP-105), so down is
    odom's -z carried through the camera: R_WC R_OC^T (-z)."""
    return T_WC[:3, :3] @ (T_OC[:3, :3].T @ -UP)


def apply(T: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(N, 3) points mapped by the (4, 4) transform T, float32."""
    X = np.asarray(X).reshape(-1, 3)
    return (X @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32)).astype(np.float32)
