"""Evaluation metrics, each defined as its source defines it (cited per function).

Ratios are returned in percent, like the tables of the SAB3R paper; distances in metres of the
ground-truth world; angles in degrees. Nothing here knows about bags or the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.boxes import box_iou
from ros2_sab3r.geometry.registration import umeyama
from ros2_sab3r.types import OrientedBox

VOID = 0  # class id of void/unlabelled ground truth; predicted points without a label get -1


# ---------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Similarity3:
    """world = s * R @ x + t: maps predicted (map) coordinates into the ground-truth world."""

    s: float
    R: np.ndarray  # (3, 3)
    t: np.ndarray  # (3,)

    @classmethod
    def identity(cls) -> Similarity3:
        return cls(1.0, np.eye(3), np.zeros(3))

    def points(self, X: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N, 3) float64."""
        return self.s * np.asarray(X, np.float64) @ self.R.T + self.t

    def pose(self, T_MC: np.ndarray) -> np.ndarray:
        """A camera pose in the map -> its pose in the world (rotation and scaled position)."""
        T = np.eye(4)
        T[:3, :3] = self.R @ T_MC[:3, :3]
        T[:3, 3] = self.points(T_MC[None, :3, 3])[0]
        return T

    def box(self, box: OrientedBox) -> OrientedBox:
        R = self.R @ box.rotation()
        return OrientedBox(center=self.points(box.center[None])[0],
                           quat_xyzw=Rotation.from_matrix(R).as_quat(),
                           size=self.s * np.asarray(box.size, np.float64))


def one_view_alignment(T_WC_gt: np.ndarray, T_MC_pred: np.ndarray, depth_gt: np.ndarray,
                       depth_pred: np.ndarray, with_scale: bool = True) -> Similarity3:
    """Map -> world from ONE ground-truth image (SAB3R §4: 'use one ground truth image's depth
    and pose for scaling and alignment to the ground truth coordinates').

    Scale: median over pixels valid in both of gt/pred depth (``with_scale=False`` for metric
    maps). Then the view's predicted camera is put onto its ground-truth pose.
    """
    s = 1.0
    if with_scale:
        valid = np.isfinite(depth_gt) & np.isfinite(depth_pred) & (depth_gt > 0) & (
            depth_pred > 0)
        if valid.sum() < 10:
            raise ValueError('the alignment view has fewer than 10 pixels with both a predicted '
                             'and a ground-truth depth; cannot fix the scale')
        s = float(np.median(depth_gt[valid] / depth_pred[valid]))
    # world = T_gt * (s * inv(T_pred) * x): rotate/translate after scaling the camera-frame points
    R_gt, t_gt = T_WC_gt[:3, :3], T_WC_gt[:3, 3]
    R_p, t_p = T_MC_pred[:3, :3], T_MC_pred[:3, 3]
    R = R_gt @ R_p.T
    t = t_gt - s * R @ t_p
    return Similarity3(s, R, t)


# ----------------------------------------------------------------------------- Map and Locate
def map_and_locate(pred_X: np.ndarray, pred_label: np.ndarray, gt_X: np.ndarray,
                   gt_label: np.ndarray, class_names: dict[int, str]) -> dict:
    """Map-and-Locate metrics of SAB3R §4 on aligned points.

    - mIoU and Acc: every ground-truth point takes the label of its nearest predicted point;
      IoU per class = |pred=c and gt=c| / |pred=c or gt=c| over the ground-truth points, mIoU the
      mean over classes present in the ground truth; Acc = share of correctly labelled points.
    - Completeness (as the paper defines it: the distance from each *predicted* point to its
      nearest ground-truth point, both filtered to one label): mean and median per label, and
      their averages over labels that have predicted points. Lower is better.

    pred_X (N, 3) / pred_label (N,) (-1: no label); gt_X (M, 3) / gt_label (M,) without void.
    """
    gt_label = np.asarray(gt_label)
    classes = [int(c) for c in np.unique(gt_label) if c != VOID]
    if len(pred_X) == 0:
        raise ValueError('no predicted points to evaluate')
    _, nn = cKDTree(pred_X).query(gt_X, k=1)
    assigned = np.asarray(pred_label)[nn]
    per_class = {}
    for c in classes:
        inter = int(np.sum((assigned == c) & (gt_label == c)))
        union = int(np.sum((assigned == c) | (gt_label == c)))
        per_class[class_names.get(c, str(c))] = 100.0 * inter / union if union else 0.0
    comp_mean, comp_median = {}, {}
    for c in classes:
        P = pred_X[pred_label == c]
        if len(P) == 0:
            continue
        d, _ = cKDTree(gt_X[gt_label == c]).query(P, k=1)
        name = class_names.get(c, str(c))
        comp_mean[name], comp_median[name] = float(d.mean()), float(np.median(d))
    return {
        'mIoU': float(np.mean(list(per_class.values()))) if per_class else 0.0,
        'Acc': 100.0 * float(np.mean(assigned == gt_label)),
        'Comp': float(np.mean(list(comp_mean.values()))) if comp_mean else None,
        'Median Comp': float(np.mean(list(comp_median.values()))) if comp_median else None,
        'per_class_IoU': per_class,
        'per_class_Comp': comp_mean,
        'per_class_Median_Comp': comp_median,
        'classes_without_prediction': sorted(set(per_class) - set(comp_mean)),
        'gt_points': int(len(gt_X)),
        'pred_points': int(len(pred_X)),
    }


# -------------------------------------------------------------------------------------- depth
def depth_errors(pred: np.ndarray, gt: np.ndarray, scale: str = 'median') -> dict | None:
    """AbsRel and delta<1.25 of one image (SAB3R supplementary A.2, following DUSt3R).

    AbsRel = mean |y - y_hat| / y; delta_1.25 = share of pixels with max(y_hat/y, y/y_hat) < 1.25,
    over pixels with a valid ground truth. ``scale='median'``: the prediction is first multiplied
    by median(y) / median(y_hat) (scale-invariant, for pointmaps without metric scale);
    ``'none'``: compared as is (metric predictions). None when no pixel is valid.
    """
    valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
    if valid.sum() == 0:
        return None
    y, y_hat = gt[valid].astype(np.float64), pred[valid].astype(np.float64)
    k = float(np.median(y) / np.median(y_hat)) if scale == 'median' else 1.0
    y_hat = k * y_hat
    ratio = np.maximum(y_hat / y, y / y_hat)
    return {'AbsRel': float(np.mean(np.abs(y - y_hat) / y)),
            'delta<1.25': 100.0 * float(np.mean(ratio < 1.25)), 'scale': k,
            'pixels': int(valid.sum())}


# --------------------------------------------------------------------------------------- pose
def relative_pose_errors(T_pred: list[np.ndarray], T_gt: list[np.ndarray], max_pairs: int = 5000,
                         min_baseline_m: float = 1e-3, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation-direction errors (degrees) of every pair (i < j) of cameras.

    SAB3R supplementary A.2 (CO3Dv2 protocol): e_rot = arccos((tr(R^T R_hat) - 1) / 2) and
    e_trans = arccos(t . t_hat / (|t| |t_hat|)) of the relative pose of each pair (camera i from
    camera j). The translation angle ignores scale, so unposed maps need no alignment. Pairs whose
    ground-truth baseline is below `min_baseline_m` have no direction: their e_trans is NaN. Above
    `max_pairs` pairs, a fixed random subset is used.
    """
    n = len(T_pred)
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), max_pairs, replace=False))
        i, j = i[keep], j[keep]
    P = np.stack(T_pred).astype(np.float64)
    G = np.stack(T_gt).astype(np.float64)
    e_rot = np.empty(len(i))
    e_tr = np.empty(len(i))
    for k, (a, b) in enumerate(zip(i, j)):
        rel_p = np.linalg.inv(P[a]) @ P[b]
        rel_g = np.linalg.inv(G[a]) @ G[b]
        cos = (np.trace(rel_g[:3, :3].T @ rel_p[:3, :3]) - 1) / 2
        e_rot[k] = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        t, t_hat = rel_g[:3, 3], rel_p[:3, 3]
        nt, nh = np.linalg.norm(t), np.linalg.norm(t_hat)
        if nt < min_baseline_m or nh <= 1e-12:
            e_tr[k] = np.nan
        else:
            e_tr[k] = np.degrees(np.arccos(np.clip(t @ t_hat / (nt * nh), -1.0, 1.0)))
    return e_rot, e_tr


def pose_accuracy(e_rot: np.ndarray, e_trans: np.ndarray, tau: float = 15.0,
                  max_deg: int = 30) -> dict:
    """RRA@tau, RTA@tau and mAA(max_deg) (SAB3R supplementary A.2), in percent.

    RRA@t / RTA@t: share of pairs with rotation / translation error below t (pairs without a
    translation direction are left out of RTA). mAA(30) = (1/30) * integral over t in [0, 30] of
    min(RRA@t, RTA@t), evaluated at t = 1, 2, ..., 30 degrees (the integral as a mean over 1-degree
    steps).
    """
    e_rot = np.asarray(e_rot, np.float64)
    e_trans = np.asarray(e_trans, np.float64)
    e_trans = e_trans[np.isfinite(e_trans)]

    def acc(e: np.ndarray, t: float) -> float:
        return 100.0 * float(np.mean(e < t)) if len(e) else 0.0

    thresholds = np.arange(1, max_deg + 1, dtype=np.float64)
    curve = [min(acc(e_rot, t), acc(e_trans, t)) for t in thresholds]
    return {f'RRA@{tau:g}': acc(e_rot, tau), f'RTA@{tau:g}': acc(e_trans, tau),
            f'mAA({max_deg})': float(np.mean(curve)), 'pairs': int(len(e_rot)),
            'pairs_with_translation': int(len(e_trans)),
            'median_rotation_error_deg': float(np.median(e_rot)) if len(e_rot) else None,
            'median_translation_error_deg': float(np.median(e_trans)) if len(e_trans) else None}


def trajectory_ate(P_pred: np.ndarray, P_gt: np.ndarray) -> float:
    """RMS position error after the best similarity alignment of all positions (Umeyama).

    Not a paper metric: a summary of the trajectory plot, where the protocol's one-view
    alignment shows drift instead.
    """
    sim = umeyama(P_pred, P_gt, with_scale=True)
    return float(np.sqrt(np.mean(np.sum((sim.s * P_pred @ sim.R.T + sim.t - P_gt) ** 2, -1))))


# ------------------------------------------------------------------------------------- locate
@dataclass(frozen=True)
class InstanceTruth:
    """A ground-truth object: its observed surface points (voxelised) in the world."""

    instance_id: int
    label: str
    points: np.ndarray  # (N, 3) float64 world
    centroid: np.ndarray  # (3,)
    box: OrientedBox


def locate_outcome(label: str, pred_centroid: np.ndarray | None, pred_box: OrientedBox | None,
                   instances: list[InstanceTruth], radius_m: float) -> dict:
    """One Locate query against the ground truth (centroid, box already in world coordinates).

    success: the answer's centroid lies within `radius_m` of the centroid of a ground-truth
    instance of that label; box IoU is against that nearest instance's box (oriented-box volume
    IoU). An absent label is correct when the answer is NOT_FOUND (``pred_centroid is None``).
    """
    same = [g for g in instances if g.label == label]
    if not same:
        return {'query': label, 'present': False, 'found': pred_centroid is not None,
                'correct': pred_centroid is None}
    if pred_centroid is None:
        return {'query': label, 'present': True, 'found': False, 'success': False,
                'distance_m': None, 'box_iou': 0.0}
    d = [float(np.linalg.norm(g.centroid - pred_centroid)) for g in same]
    g = same[int(np.argmin(d))]
    iou = box_iou(pred_box, g.box) if pred_box is not None else 0.0
    return {'query': label, 'present': True, 'found': True, 'success': min(d) <= radius_m,
            'distance_m': min(d), 'box_iou': float(iou), 'instance_id': g.instance_id}
