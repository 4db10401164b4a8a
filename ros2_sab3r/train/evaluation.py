"""Evaluation during training: teacher cosine and depth on held-out pairs, and forgetting.

Held-out pairs (``data.held_out``) are centre-cropped without jitter, so every evaluation sees
the same pixels. Figures (all means over the held-out pairs, view 1 and view 2 together):

- ``cos_clip``, ``cos_dino``: per-pixel cosine between the student's head and its teacher;
- ``depth_rel``: median relative depth error against the ground truth after a median scale
  alignment (pairs with geometry only);
- ``depth_vs_initial``: median relative difference between the student's depth and the initial
  model's (how far the geometry moved; 0 when it is untouched);
- ``rot_vs_initial_deg``, ``tdir_vs_initial_deg``: mean angle between the relative pose the
  student's pointmaps give each pair and the initial model's (rotation, translation direction;
  the pose of view 2 in view 1 by a weighted Umeyama fit of view 2's own pointmap, from the pair
  decoded in the other order, onto its pointmap in view 1's frame);
- pictures (:func:`pca_picture`): the held-out crops beside their teacher's and the student's
  features in the teacher's first three principal components, one row per view and head;
- per bag of ``run.eval_bags``, Map-and-Locate and depth by sab3r-eval itself
  (:func:`map_and_locate`): ``bag<i>/<section>.<figure>``, e.g. ``bag0/locate.success_rate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ros2_sab3r.geometry.registration import RegistrationError, umeyama
from ros2_sab3r.geometry.transforms import rotation_angle_deg
from ros2_sab3r.model.checkpoint import save_network
from ros2_sab3r.model.network import Sab3rNet
from ros2_sab3r.model.outputs import PairOutput
from ros2_sab3r.train.data import (
    Batch,
    PairSpec,
    SceneViews,
    collate,
    load_source,
    make_pair,
    select_pairs,
    student_input,
)
from ros2_sab3r.train.recipe import DataSource, Recipe

logger = logging.getLogger(__name__)

BAG_SECTIONS = ('pose', 'depth', 'sequence_map', 'locate')  # sab3r-eval figures logged


def held_out_batches(scenes: Sequence[SceneViews], specs: Sequence[PairSpec], recipe: Recipe,
                     device: torch.device | str = 'cpu') -> list[Batch]:
    """One batch per held-out pair: centre crop at scale 1, no colour jitter, seeded."""
    data = replace(recipe.data, crop='centre', scale_range=(1.0, 1.0), color_jitter=0.0)
    batches = []
    for i, spec in enumerate(specs):
        scene = scenes[spec.scene]
        rng = np.random.default_rng([recipe.run.seed, 3, i])
        pair = make_pair(scene.views[spec.first], scene.views[spec.second], data, rng,
                         scene.is_metric)
        batches.append(collate([pair]).to(device))
    return batches


def source_batches(sources: Sequence[DataSource], recipe: Recipe, max_pairs: int = 8,
                   device: torch.device | str = 'cpu') -> list[Batch]:
    """Evaluation batches from sources the student never trained on (unseen views of a scene,
    another scene, a bag): at most ``max_pairs`` pairs per source, evenly spread over its
    co-visible pairs (``data.min_overlap`` .. ``data.max_overlap``), cropped as held-out pairs."""
    scenes = [load_source(s) for s in sources]
    specs = []
    for s, scene in enumerate(scenes):
        pairs = select_pairs([scene], recipe.data.min_overlap, recipe.data.max_overlap)
        pick = np.unique(np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)) \
            if pairs else []
        specs += [replace(pairs[i], scene=s) for i in pick]
    return held_out_batches(scenes, specs, recipe, device)


@torch.no_grad()
def forward(net: Sab3rNet, batch: Batch) -> PairOutput:
    """The student in float32 on a batch (the crops mapped to [-1, 1])."""
    return net(student_input(batch.img1), student_input(batch.img2))


def feature_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean per-pixel cosine of (B, H, W, C) maps."""
    return float(F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean())


def depth_relative_error(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> float:
    """Median |s z_pred - z_gt| / z_gt over valid pixels, s the median ratio (scale-free)."""
    z_pred, z_gt = pred[..., 2][valid], gt[..., 2][valid]
    keep = (z_pred > 0) & (z_gt > 0)
    if not bool(keep.any()):
        return float('nan')
    z_pred, z_gt = z_pred[keep], z_gt[keep]
    scale = torch.median(z_gt / z_pred)
    return float(torch.median((scale * z_pred - z_gt).abs() / z_gt))


def initial_depths(net: Sab3rNet, batches: Sequence[Batch]) -> list[tuple[torch.Tensor, ...]]:
    """Depth maps (view 1, view 2) of the initial model: what forgetting is measured against."""
    was = net.training
    net.eval()
    try:
        out = [forward(net, b) for b in batches]
    finally:
        net.train(was)
    return [(o.view1.pts3d[..., 2].cpu(), o.view2.pts3d[..., 2].cpu()) for o in out]


def relative_poses(net: Sab3rNet, batch: Batch, stride: int = 2) -> np.ndarray:
    """(B, 4, 4) pose T_C1C2 of view 2 in view 1 per pair (translation at the pair's scale;
    NaN where the fit fails), from the student's pointmaps alone (see the module docstring)."""
    with torch.no_grad():
        ab = forward(net, batch)
        ba = net(student_input(batch.img2), student_input(batch.img1))
    Q = ab.view2.pts3d[:, ::stride, ::stride].flatten(1, 2).double().cpu().numpy()  # (B, N, 3)
    P = ba.view1.pts3d[:, ::stride, ::stride].flatten(1, 2).double().cpu().numpy()
    w = (ab.view2.conf * ba.view1.conf)[:, ::stride, ::stride].flatten(1).sqrt()
    w = w.double().cpu().numpy()
    out = np.full((len(Q), 4, 4), np.nan)
    for b in range(len(Q)):
        try:
            sim = umeyama(P[b], Q[b], w[b])
        except RegistrationError:
            continue
        out[b] = np.eye(4)
        out[b, :3, :3], out[b, :3, 3] = sim.R, sim.t
    return out


def initial_poses(net: Sab3rNet, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Relative poses of the initial model per batch, (B, 4, 4) float64 tensors (checkpoints
    hold tensors): what pose forgetting is measured against."""
    was = net.training
    net.eval()
    try:
        return [torch.from_numpy(relative_poses(net, b)) for b in batches]
    finally:
        net.train(was)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two 3-vectors (NaN when either is ~0)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na < 1e-12 or nb < 1e-12:
        return float('nan')
    return float(np.degrees(np.arccos(np.clip(a @ b / (na * nb), -1.0, 1.0))))


@torch.no_grad()
def evaluate_batches(net: Sab3rNet, teachers: Mapping[str, nn.Module], batches: Sequence[Batch],
                     initial: Sequence[tuple[torch.Tensor, ...]] | None = None,
                     poses: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """Figures of the module docstring (keys present when they can be computed); ``initial``
    and ``poses`` are the initial model's :func:`initial_depths` and :func:`initial_poses`."""
    was = net.training
    net.eval()
    sums: dict[str, list[float]] = {}
    try:
        for i, batch in enumerate(batches):
            out = forward(net, batch)
            if poses is not None:
                for T, T0 in zip(relative_poses(net, batch), poses[i].numpy()):
                    if np.isfinite(T).all() and np.isfinite(T0).all():
                        sums.setdefault('rot_vs_initial_deg', []).append(
                            rotation_angle_deg(T0[:3, :3].T @ T[:3, :3]))
                        sums.setdefault('tdir_vs_initial_deg', []).append(
                            _angle_deg(T[:3, 3], T0[:3, 3]))
            views = ((out.view1, batch.img1, batch.targets.view1),
                     (out.view2, batch.img2, batch.targets.view2))
            for v, (view, img, target) in enumerate(views):
                for head, teacher in teachers.items():
                    student = getattr(view, head)
                    if student is not None:
                        sums.setdefault(f'cos_{head}', []).append(
                            feature_cosine(student, teacher(img)))
                if bool(batch.has_geometry.all()) and bool(target.valid.any()):
                    sums.setdefault('depth_rel', []).append(
                        depth_relative_error(view.pts3d, target.pts3d, target.valid))
                if initial is not None:
                    z0 = initial[i][v].to(view.pts3d.device)
                    z = view.pts3d[..., 2]
                    sums.setdefault('depth_vs_initial', []).append(
                        float(torch.median((z - z0).abs() / z0.abs().clamp_min(1e-6))))
    finally:
        net.train(was)
    out = {}
    for k, values in sums.items():
        finite = [v for v in values if np.isfinite(v)]
        if finite:
            out[k] = float(np.mean(finite))
    return out


def map_and_locate(net: Sab3rNet, bag: str | Path, args: Sequence[str], out_dir: Path
                   ) -> dict[str, float]:
    """sab3r-eval on ``bag`` (options ``args``) with the student's current weights (written to
    ``out_dir/student.safetensors``, the node's format): its report lands in ``out_dir`` and its
    figures (sections :data:`BAG_SECTIONS`) come back flat, e.g. ``locate.success_rate``.
    A run sab3r-eval cannot finish (e.g. a student whose depth is still unusable) is logged
    with its reason and gives no figures: training goes on."""
    from ros2_sab3r.eval.cli import main as sab3r_eval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save_network(net, out_dir / 'student.safetensors')
    argv = [str(bag), '--checkpoint', str(weights), '--out', str(out_dir), '--no-progress',
            *args]
    try:
        code = sab3r_eval(argv)
    except Exception as exc:  # noqa: BLE001 - evaluation must not end the training run
        logger.warning('sab3r-eval %s failed (%s: %s); no Map-and-Locate figures this time',
                       bag, type(exc).__name__, exc)
        return {}
    results = out_dir / 'results.json'
    if code != 0 or not results.is_file():
        logger.warning('sab3r-eval %s exited with %d (see its error above); no figures', bag,
                       code)
        return {}
    report = json.loads(results.read_text(encoding='utf-8'))
    return {f'{section}.{k}': float(v) for section in BAG_SECTIONS
            for k, v in (report.get(section) or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'radius_m'}


def _pca_rgb(features: np.ndarray, basis: np.ndarray, mean: np.ndarray, lo: np.ndarray,
             hi: np.ndarray) -> np.ndarray:
    """(H, W, C) features -> (H, W, 3) uint8: projection on ``basis`` (3, C) scaled to lo..hi."""
    x = (features.reshape(-1, features.shape[-1]) - mean) @ basis.T
    x = np.clip((x - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8).reshape(*features.shape[:2], 3)


def pca_picture(image: np.ndarray, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """One row (H, 3 W, 3) uint8: the crop, its teacher map and the student's map in the
    teacher's first three principal components (one basis and one colour scale for both, the
    teacher's 1st-99th percentiles, so equal maps give equal pictures).

    ``image`` (H, W, 3) uint8; ``teacher`` and ``student`` (h, w, C) at any common grid,
    shown at the image's size (nearest).
    """
    flat = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64)
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:3]
    if len(basis) < 3:  # fewer than 3 channels: pad with zero components
        basis = np.concatenate([basis, np.zeros((3 - len(basis), flat.shape[1]))])
    proj = (flat - mean) @ basis.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    h, w = image.shape[:2]
    panels = [image]
    for features in (teacher, student):
        rgb = _pca_rgb(features.astype(np.float64), basis, mean, lo, hi)
        rows = np.arange(h) * rgb.shape[0] // h
        cols = np.arange(w) * rgb.shape[1] // w
        panels.append(rgb[rows[:, None], cols[None, :]])
    return np.concatenate(panels, axis=1)


@torch.no_grad()
def pca_pictures(net: Sab3rNet, teachers: Mapping[str, nn.Module], batches: Sequence[Batch]
                 ) -> np.ndarray | None:
    """Rows of :func:`pca_picture` for both views of ``batches``' first pairs and every head
    with a teacher, stacked into one (rows * H, 3 W, 3) uint8 picture (None without teachers)."""
    if not teachers or not batches:
        return None
    was = net.training
    net.eval()
    rows = []
    try:
        for batch in batches:
            out = forward(net, batch)
            for view, img in ((out.view1, batch.img1), (out.view2, batch.img2)):
                for head, teacher in teachers.items():
                    student = getattr(view, head)
                    if student is None:
                        continue
                    rgb = np.round(img[0].permute(1, 2, 0).float().cpu().numpy() * 255)
                    rows.append(pca_picture(rgb.astype(np.uint8),
                                            teacher(img[:1]).float()[0].cpu().numpy(),
                                            student[0].float().cpu().numpy()))
    finally:
        net.train(was)
    return np.concatenate(rows, axis=0) if rows else None
