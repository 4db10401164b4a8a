"""Trajectory error after similarity alignment (ATE), for evaluation and tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_sab3r.geometry.registration import umeyama
from ros2_sab3r.geometry.transforms import rotation_angle_deg


@dataclass(frozen=True)
class TrajectoryError:
    translation_rmse_m: float
    translation_max_m: float
    rotation_mean_deg: float
    rotation_max_deg: float
    scale: float  # estimated-to-ground-truth scale of the alignment
    n_poses: int


def absolute_trajectory_error(T_est: list[np.ndarray], T_gt: list[np.ndarray],
                              with_scale: bool = True) -> TrajectoryError:
    """ATE of estimated camera poses against ground truth after a (similarity) alignment.

    The alignment is the least-squares fit of camera centres (Umeyama); rotation errors are the
    angles of R_gt^T (R_align R_est) per pose.
    """
    if len(T_est) != len(T_gt) or len(T_est) < 3:
        raise ValueError(f'ATE needs >= 3 matching poses, got {len(T_est)} and {len(T_gt)}')
    pe = np.array([T[:3, 3] for T in T_est])
    pg = np.array([T[:3, 3] for T in T_gt])
    sim = umeyama(pe, pg, with_scale=with_scale)
    aligned = sim.s * pe @ sim.R.T + sim.t
    err = np.linalg.norm(aligned - pg, axis=-1)
    rot = [rotation_angle_deg(Tg[:3, :3].T @ sim.R @ Te[:3, :3]) for Te, Tg in zip(T_est, T_gt)]
    return TrajectoryError(float(np.sqrt((err ** 2).mean())), float(err.max()),
                           float(np.mean(rot)), float(np.max(rot)), sim.s, len(T_est))
