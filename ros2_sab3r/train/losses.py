"""SAB3R training losses, as released: 3D regression, matching, CLIP and DINO feature terms.

Per pair (both views of a batch of B pairs), with the recipe's weights (:class:`LossWeights`)::

    L_v     = mean_{valid|sky}( C * ||X_hat - X|| - alpha * log C )        (view v = 1, 2)
            + w_clip * mean_{pixels, channels}( (S_clip - T_clip)^2 )
            + w_dino * mean_{pixels, channels}( (S_dino - T_dino)^2 )
    L_match = mean_{valid matches}( c * l - 10 * log c ),  c = (desc_conf_1 + desc_conf_2) / 2
    L       = L_1 + L_2 + w_match * L_match

Facts (../shared/reference/sab3r_spec.md §5; MASt3R's Regr3D / ConfLoss / MatchingLoss /
ConfMatchingLoss, InfoNCE 'proper'):

- 3D term: ground truth of both views in view 1's camera frame; Euclidean distance per pixel;
  norm mode '?avg_dis': the ground truth of each pair is divided by the mean distance to the
  origin of its valid points (both views together, sum / (count + 1e-8), clipped at 1e-8);
  the prediction of a non-metric pair by its own mean distance over the same pixels, that of a
  metric-scale pair by the ground truth's factor (so its metric scale is learnt). Sky pixels
  (sky and not valid) count with a fixed distance of 2. The mean runs over every counted pixel
  of the batch; a view with none contributes 0.
- Matching: InfoNCE in its symmetric form on the descriptors at the ground-truth
  correspondences, temperature 0.05: for match k, with s = exp(d1_k . d2_m / T),
  l_k = -log(s_kk / sum_n s_nk) - log(s_kk / sum_m s_km), each ratio clipped below at 1e-8.
  Every sampled correspondence (valid or not) is a negative for the others; only valid ones
  carry a loss. More than ``match_block`` correspondences are shuffled and split into blocks
  of ``match_block`` (the count must be a multiple of it).
- Feature terms: over every pixel (not only valid depth), post-processed student maps
  against the teachers' maps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import math
from typing import Protocol

import torch

NORM_EPS = 1e-8  # avg_dis: sum / (count + 1e-8), factor clipped at 1e-8
INFONCE_EPS = 1e-8  # ratios clipped below before the log


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or infinite; ``term`` names it (e.g. 'clip_2')."""

    def __init__(self, term: str, value: float) -> None:
        super().__init__(f'loss term {term!r} is {value} (not finite); the step cannot be '
                         'applied')
        self.term = term
        self.value = value


@dataclass(frozen=True)
class LossWeights:
    """Loss weights and constants. Defaults: the official full recipe (CLIP + DINO)."""

    alpha: float = 1.0  # confidence regulariser of the 3D term
    matching: float = 0.75
    clip: float = 20.0
    dino: float = 4.0
    matching_alpha: float = 10.0  # confidence regulariser of the matching term
    temperature: float = 0.05
    match_block: int = 8192
    sky_loss: float = 2.0  # distance counted at sky pixels
    normalise_metric: bool = False  # '?avg_dis' (False) or 'avg_dis' (True: every pair)

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if not math.isfinite(value) or value < 0:
                raise ValueError(f'loss weight {f.name} must be finite and >= 0, got {value}')
        if self.alpha <= 0 or self.matching_alpha <= 0:
            raise ValueError('alpha and matching_alpha must be > 0 (they weight -log C)')
        if self.temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {self.temperature}')
        if self.match_block < 1 or int(self.match_block) != self.match_block:
            raise ValueError(f'match_block must be a positive integer, got {self.match_block}')


FULL_RECIPE = LossWeights()
# The official "minimal" recipe: CLIP head only.
MINIMAL_RECIPE = LossWeights(alpha=0.2, matching=0.075, clip=0.4, dino=0.0)


class StudentView(Protocol):
    """What the losses read of one view's post-processed outputs (e.g. model's ViewOutput)."""

    pts3d: torch.Tensor  # (B, H, W, 3); view 2: expressed in view 1's frame
    conf: torch.Tensor  # (B, H, W) > 0 (1 + exp)
    desc: torch.Tensor  # (B, H, W, D) unit descriptors
    desc_conf: torch.Tensor  # (B, H, W) > 0
    clip: torch.Tensor | None  # (B, H, W, 512) or None
    dino: torch.Tensor | None  # (B, H, W, 384) or None


@dataclass(frozen=True)
class ViewTargets:
    """Ground truth and teacher targets of one view."""

    pts3d: torch.Tensor  # (B, H, W, 3) in VIEW 1's camera frame (OpenCV axes)
    valid: torch.Tensor  # (B, H, W) bool: depth known
    sky: torch.Tensor | None = None  # (B, H, W) bool; None = no sky
    clip: torch.Tensor | None = None  # (B, H, W, 512) teacher map, same pixels as the student
    dino: torch.Tensor | None = None  # (B, H, W, 384)


@dataclass(frozen=True)
class PairTargets:
    """Targets of a batch of pairs."""

    view1: ViewTargets
    view2: ViewTargets
    is_metric: torch.Tensor  # (B,) bool: metric-scale source (its scale is learnt)
    corres1: torch.Tensor  # (B, N, 2) int (x, y) in view 1
    corres2: torch.Tensor  # (B, N, 2) int (x, y) in view 2, same order
    corres_valid: torch.Tensor  # (B, N) bool: true correspondences (the rest are negatives)


@dataclass(frozen=True)
class LossTerms:
    """Every term of one step; ``total`` carries the gradient, the rest are detached."""

    total: torch.Tensor  # () weighted sum
    regression: tuple[torch.Tensor, torch.Tensor]  # per view, confidence-weighted 3D term
    point_error: tuple[torch.Tensor, torch.Tensor]  # per view, mean distance (monitoring)
    matching: torch.Tensor  # () confidence-weighted InfoNCE
    clip: tuple[torch.Tensor, torch.Tensor] | None  # per view, unweighted MSE
    dino: tuple[torch.Tensor, torch.Tensor] | None

    def as_floats(self) -> dict[str, float]:
        """Flat names for logging: total, regr_1, regr_2, pts_err_1, ..., match, clip_1, ..."""
        out = {'total': float(self.total.detach())}
        for name, pair in (('regr', self.regression), ('pts_err', self.point_error),
                           ('clip', self.clip), ('dino', self.dino)):
            if pair is not None:
                out[f'{name}_1'], out[f'{name}_2'] = float(pair[0]), float(pair[1])
        out['match'] = float(self.matching)
        return out


# -- 3D regression -----------------------------------------------------------------------------

def _mean_distance(pts1: torch.Tensor, pts2: torch.Tensor, valid1: torch.Tensor,
                   valid2: torch.Tensor) -> torch.Tensor:
    """avg_dis factor per pair: mean ||p|| over the valid points of both views, (B,)."""
    d1 = torch.where(valid1, pts1.norm(dim=-1), 0.0).flatten(1).sum(1)
    d2 = torch.where(valid2, pts2.norm(dim=-1), 0.0).flatten(1).sum(1)
    count = (valid1.flatten(1).sum(1) + valid2.flatten(1).sum(1)).to(d1.dtype)
    return ((d1 + d2) / (count + NORM_EPS)).clamp_min(NORM_EPS)


def regression_terms(pred1: torch.Tensor, pred2: torch.Tensor, conf1: torch.Tensor,
                     conf2: torch.Tensor, targets: PairTargets, weights: LossWeights
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                tuple[torch.Tensor, torch.Tensor]]:
    """Confidence-weighted 3D regression per view, and the mean distance per view."""
    t1, t2 = targets.view1, targets.view2
    valid1, valid2 = t1.valid.bool(), t2.valid.bool()
    gt1 = torch.where(valid1[..., None], t1.pts3d, 0.0)  # invalid GT may hold NaN
    gt2 = torch.where(valid2[..., None], t2.pts3d, 0.0)
    gt_factor = _mean_distance(gt1, gt2, valid1, valid2)[:, None, None, None]
    pred_factor = _mean_distance(pred1, pred2, valid1, valid2)[:, None, None, None]
    own_scale = torch.ones_like(targets.is_metric, dtype=torch.bool)
    if not weights.normalise_metric:
        own_scale = ~targets.is_metric.bool()
    factor = torch.where(own_scale[:, None, None, None], pred_factor, gt_factor)
    gt1, gt2 = gt1 / gt_factor, gt2 / gt_factor
    pred1, pred2 = pred1 / factor, pred2 / factor

    out, err = [], []
    for pred, gt, conf, valid, t in ((pred1, gt1, conf1, valid1, t1),
                                     (pred2, gt2, conf2, valid2, t2)):
        sky = (t.sky.bool() & ~valid) if t.sky is not None else torch.zeros_like(valid)
        counted = valid | sky
        dist = (pred - gt).norm(dim=-1)  # (B, H, W) Euclidean
        dist = torch.where(sky, torch.full_like(dist, weights.sky_loss), dist)[counted]
        c = conf[counted]
        if dist.numel() == 0:
            zero = (pred.sum() + conf.sum()) * 0.0  # keeps the graph for DDP
            out.append(zero)
            err.append(zero.detach())
            continue
        out.append((c * dist - weights.alpha * torch.log(c)).mean())
        err.append(dist.detach().mean())
    return (out[0], out[1]), (err[0], err[1])


# -- matching ----------------------------------------------------------------------------------

def match_blocks(count: int, block: int, batch: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Indices (B, count // block, block) of the correspondences of each block.

    ``count <= block``: one block, in order. Otherwise each pair's correspondences are shuffled
    and cut into blocks of ``block`` (``count`` must be a multiple of ``block``).
    """
    if count <= block:
        return torch.arange(count).expand(batch, 1, count)
    if count % block:
        raise ValueError(f'{count} correspondences per pair cannot be cut into blocks of '
                         f'{block}; sample a multiple of {block}')
    perm = torch.stack([torch.randperm(count, generator=generator) for _ in range(batch)])
    return perm.reshape(batch, count // block, block)


def infonce_proper(desc1: torch.Tensor, desc2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of matched descriptor rows (..., N, D) x2 -> (..., N) per match.

    Written with log-sum-exp (the released code exponentiates first): identical values,
    including the 1e-8 clip, which caps each direction at -log(1e-8).
    """
    sim = desc1 @ desc2.transpose(-2, -1) / temperature  # (..., N, N)
    sim = torch.nan_to_num(sim, nan=-math.inf)
    positive = sim.diagonal(dim1=-2, dim2=-1)
    cap = -math.log(INFONCE_EPS)
    column = (torch.logsumexp(sim, dim=-2) - positive).clamp(max=cap)  # over n, fixed m = k
    row = (torch.logsumexp(sim, dim=-1) - positive).clamp(max=cap)  # over m, fixed n = k
    return column + row


def matching_term(view1: StudentView, view2: StudentView, targets: PairTargets,
                  weights: LossWeights, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Confidence-weighted InfoNCE: mean over valid matches of c * l - matching_alpha * log c."""
    x1, y1 = targets.corres1.long().unbind(-1)
    x2, y2 = targets.corres2.long().unbind(-1)
    b, n = x1.shape
    batch = torch.arange(b, device=x1.device)[:, None].expand(b, n)
    work = torch.promote_types(view1.desc.dtype, torch.float32)
    d1 = view1.desc[batch, y1, x1].to(work)  # (B, N, D)
    d2 = view2.desc[batch, y2, x2].to(work)
    c = 0.5 * (view1.desc_conf[batch, y1, x1] + view2.desc_conf[batch, y2, x2])  # (B, N)
    valid = targets.corres_valid.bool()
    if n == 0 or not valid.any():  # the released loss is 0 without a valid match
        return (view1.desc.sum() + view2.desc.sum() + view1.desc_conf.sum()
                + view2.desc_conf.sum()) * 0.0
    idx = match_blocks(n, weights.match_block, b, generator).to(x1.device)  # (B, K, blk)
    pick = batch[:, :1, None].expand_as(idx)
    loss = infonce_proper(d1[pick, idx], d2[pick, idx], weights.temperature)  # (B, K, blk)
    keep = valid[pick, idx]
    c = c[pick, idx][keep]
    return (c * loss[keep] - weights.matching_alpha * torch.log(c)).mean()


# -- features ----------------------------------------------------------------------------------

def feature_mse(student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
    """Mean over every pixel of the mean over channels of the squared difference."""
    if student.shape != teacher.shape:
        raise ValueError(f'{name}: student map {tuple(student.shape)} and teacher map '
                         f'{tuple(teacher.shape)} differ; the teacher must see the same pixels')
    return ((student - teacher.detach().to(student.dtype)) ** 2).mean()


# -- total -------------------------------------------------------------------------------------

def _check_finite(terms: dict[str, torch.Tensor]) -> None:
    for name, value in terms.items():
        v = float(value.detach())
        if not math.isfinite(v):
            raise NonFiniteLossError(name, v)


def sab3r_loss(view1: StudentView, view2: StudentView, targets: PairTargets,
               weights: LossWeights = FULL_RECIPE, *, generator: torch.Generator | None = None
               ) -> LossTerms:
    """Every term of the released SAB3R loss for a batch of pairs, and their weighted total.

    A feature term is computed when its weight is > 0; then the student must have that head and
    the targets its teacher map. Raises :class:`NonFiniteLossError` naming the first non-finite
    term. ``generator`` drives the block shuffle of the matching term (more than
    ``weights.match_block`` correspondences per pair).
    """
    weights.validate()
    regression, point_error = regression_terms(
        view1.pts3d, view2.pts3d, view1.conf, view2.conf, targets, weights)
    matching = matching_term(view1, view2, targets, weights, generator)
    per_term = {'regr_1': regression[0], 'regr_2': regression[1], 'match': matching}
    features: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {'clip': None, 'dino': None}
    for name in features:
        if getattr(weights, name) <= 0:
            continue
        pair = []
        for v, (student, target) in enumerate(((view1, targets.view1), (view2, targets.view2)),
                                              start=1):
            s, t = getattr(student, name), getattr(target, name)
            if s is None or t is None:
                missing = 'student has no ' + name + ' head' if s is None else 'no teacher map'
                raise ValueError(f'{name} weight is {getattr(weights, name)} but view {v} has '
                                 f'{missing}')
            pair.append(feature_mse(s, t, f'{name}_{v}'))
            per_term[f'{name}_{v}'] = pair[-1]
        features[name] = (pair[0], pair[1])
    _check_finite(per_term)

    total = regression[0] + regression[1] + weights.matching * matching
    for name, pair in features.items():
        if pair is not None:
            total = total + getattr(weights, name) * (pair[0] + pair[1])
    _check_finite({'total': total})

    def detached(pair):
        return None if pair is None else (pair[0].detach(), pair[1].detach())

    return LossTerms(total=total, regression=detached(regression), point_error=point_error,
                     matching=matching.detach(), clip=detached(features['clip']),
                     dino=detached(features['dino']))
