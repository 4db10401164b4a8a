"""Focal length from a pointmap (spec §8.1, Weiszfeld variant), when no CameraInfo is given."""

from __future__ import annotations

import numpy as np

from ros2_sab3r.types import FrameRejected


class FocalError(FrameRejected):
    """The pointmap has too few valid points to estimate a focal length."""


def estimate_focal(X: np.ndarray, mask: np.ndarray | None = None,
                   pp: tuple[float, float] | None = None, iterations: int = 10,
                   subsample: int = 2) -> float:
    """Focal length in pixels of the camera that produced X, (H, W, 3) points in its own frame.

    Minimises sum_i ||p_i - f * a_i|| over pixels, a = (x/z, y/z), p = pixel - pp, by iteratively
    reweighted least squares (Weiszfeld): a robust fit that ignores far-off pixels. The principal
    point defaults to (W/2, H/2), the pointmap convention. The result is clipped to the field of
    view range [~1 deg, ~170 deg] so that a degenerate pointmap cannot return nonsense silently.
    """
    H, W = X.shape[:2]
    if pp is None:
        pp = (W / 2, H / 2)
    y, x = np.mgrid[0:H:subsample, 0:W:subsample]
    P = X[::subsample, ::subsample].reshape(-1, 3).astype(np.float64)
    p = np.stack([x.reshape(-1) - pp[0], y.reshape(-1) - pp[1]], -1)  # (N, 2)
    valid = np.isfinite(P).all(-1) & (P[:, 2] > 1e-6)
    if mask is not None:
        valid &= mask[::subsample, ::subsample].reshape(-1)
    if valid.sum() < 10:
        raise FocalError(
            f'cannot estimate the focal length: only {int(valid.sum())} valid points in the '
            'pointmap; give the camera intrinsics (CameraInfo) or check the backend output')
    a = P[valid, :2] / P[valid, 2:3]
    p = p[valid]
    ap = (a * p).sum(-1)
    aa = (a * a).sum(-1)
    f = ap.mean() / max(aa.mean(), 1e-12)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.linalg.norm(p - f * a, axis=-1), 1e-8)
        f = (w * ap).mean() / max((w * aa).mean(), 1e-12)
    f_min = max(H, W) / 2 / np.tan(np.radians(85.0))
    f_max = max(H, W) / 2 / np.tan(np.radians(0.5))
    return float(np.clip(f, f_min, f_max))


def intrinsics_from_focal(f: float, width: int, height: int) -> np.ndarray:
    """(3, 3) K with square pixels and the principal point at (W/2, H/2)."""
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float64)
