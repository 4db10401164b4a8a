"""Losses against float64 references written from the spec's formulas (loops in numpy)."""

from __future__ import annotations

from dataclasses import dataclass, replace
import math

import numpy as np
import pytest
import torch

from ros2_sab3r.train.losses import (
    FULL_RECIPE,
    LossWeights,
    NonFiniteLossError,
    PairTargets,
    ViewTargets,
    match_blocks,
    sab3r_loss,
)

pytestmark = pytest.mark.train

B, H, W, D = 2, 6, 5, 8


@dataclass(frozen=True)
class View:
    pts3d: torch.Tensor
    conf: torch.Tensor
    desc: torch.Tensor
    desc_conf: torch.Tensor
    clip: torch.Tensor | None = None
    dino: torch.Tensor | None = None


def _views(rng: np.random.Generator, n: int = 10, clip: int = 7, dino: int = 5):
    def t(a):
        return torch.tensor(a, dtype=torch.float64)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    views = [View(pts3d=t(rng.normal(size=(B, H, W, 3)) + [0, 0, 3]),
                  conf=t(1 + np.exp(rng.normal(size=(B, H, W)))),
                  desc=t(unit(rng.normal(size=(B, H, W, D)))),
                  desc_conf=t(1 + np.exp(rng.normal(size=(B, H, W)))),
                  clip=t(rng.normal(size=(B, H, W, clip))),
                  dino=t(rng.normal(size=(B, H, W, dino)))) for _ in range(2)]
    gts = []
    for v in range(2):
        pts = rng.normal(size=(B, H, W, 3)) * 0.5 + [0, 0, 2 + v]
        valid = rng.random((B, H, W)) > 0.25
        sky = rng.random((B, H, W)) > 0.7  # some sky pixels are valid: those are not sky
        pts[~valid] = np.nan  # invalid ground truth must not leak
        gts.append(ViewTargets(pts3d=t(pts), valid=torch.tensor(valid), sky=torch.tensor(sky),
                               clip=t(rng.normal(size=(B, H, W, clip))),
                               dino=t(rng.normal(size=(B, H, W, dino)))))
    xy = [np.stack([rng.integers(0, W, (B, n)), rng.integers(0, H, (B, n))], -1)
          for _ in range(2)]
    valid = rng.random((B, n)) > 0.4
    valid[:, 0] = True
    targets = PairTargets(view1=gts[0], view2=gts[1],
                          is_metric=torch.tensor([True, False]),
                          corres1=torch.tensor(xy[0]), corres2=torch.tensor(xy[1]),
                          corres_valid=torch.tensor(valid))
    return views, targets


def _np(x):
    return None if x is None else x.detach().numpy()


def ref_regression(views, targets, alpha, sky_loss=2.0):
    """Regr3D + ConfLoss, '?avg_dis', per view, by explicit loops (float64)."""
    t = (targets.view1, targets.view2)
    pred = [_np(v.pts3d) for v in views]
    gt = [_np(x.pts3d) for x in t]
    valid = [_np(x.valid) for x in t]
    sky = [_np(x.sky) & ~_np(x.valid) for x in t]
    conf = [_np(v.conf) for v in views]
    metric = _np(targets.is_metric)
    terms = [[], []]
    for b in range(B):
        def avg(pts, b=b):
            total, count = 0.0, 0
            for v in range(2):
                for i in range(H):
                    for j in range(W):
                        if valid[v][b, i, j]:
                            total += math.sqrt(sum(pts[v][b, i, j] ** 2))
                            count += 1
            return max(total / (count + 1e-8), 1e-8)
        g = avg(gt)
        p = g if metric[b] else avg(pred)
        for v in range(2):
            for i in range(H):
                for j in range(W):
                    if valid[v][b, i, j]:
                        dist = np.linalg.norm(pred[v][b, i, j] / p - gt[v][b, i, j] / g)
                    elif sky[v][b, i, j]:
                        dist = sky_loss
                    else:
                        continue
                    c = conf[v][b, i, j]
                    terms[v].append(c * dist - alpha * math.log(c))
    return [float(np.mean(x)) for x in terms]


def ref_matching(views, targets, temperature=0.05, alpha=10.0, blocks=None):
    """Confidence-weighted symmetric InfoNCE, by explicit sums (float64)."""
    d1, d2 = _np(views[0].desc), _np(views[1].desc)
    c1, c2 = _np(views[0].desc_conf), _np(views[1].desc_conf)
    p1, p2 = _np(targets.corres1), _np(targets.corres2)
    ok = _np(targets.corres_valid)
    n = p1.shape[1]
    out = []
    for b in range(B):
        groups = [list(range(n))] if blocks is None else [list(g) for g in blocks[b]]
        for group in groups:
            a = np.array([d1[b, p1[b, k, 1], p1[b, k, 0]] for k in group])
            z = np.array([d2[b, p2[b, k, 1], p2[b, k, 0]] for k in group])
            s = np.exp(a @ z.T / temperature)
            for r, k in enumerate(group):
                if not ok[b, k]:
                    continue
                loss = -(math.log(max(s[r, r] / s[:, r].sum(), 1e-8))
                         + math.log(max(s[r, r] / s[r, :].sum(), 1e-8)))
                c = 0.5 * (c1[b, p1[b, k, 1], p1[b, k, 0]] + c2[b, p2[b, k, 1], p2[b, k, 0]])
                out.append(c * loss - alpha * math.log(c))
    return float(np.mean(out))


def ref_mse(s, t):
    s, t = _np(s), _np(t)
    per_pixel = [np.mean((s[b, i, j] - t[b, i, j]) ** 2)
                 for b in range(B) for i in range(H) for j in range(W)]
    return float(np.mean(per_pixel))


def test_every_term_and_the_total_match_float64_references():
    views, targets = _views(np.random.default_rng(0))
    terms = sab3r_loss(views[0], views[1], targets, FULL_RECIPE)
    regr = ref_regression(views, targets, alpha=1.0)
    match = ref_matching(views, targets)
    clip = [ref_mse(v.clip, t.clip) for v, t in zip(views, (targets.view1, targets.view2))]
    dino = [ref_mse(v.dino, t.dino) for v, t in zip(views, (targets.view1, targets.view2))]
    got = terms.as_floats()
    assert got['regr_1'] == pytest.approx(regr[0], rel=1e-12)
    assert got['regr_2'] == pytest.approx(regr[1], rel=1e-12)
    assert got['match'] == pytest.approx(match, rel=1e-12)
    assert (got['clip_1'], got['clip_2']) == pytest.approx(clip, rel=1e-12)
    assert (got['dino_1'], got['dino_2']) == pytest.approx(dino, rel=1e-12)
    total = sum(regr) + 0.75 * match + 20 * sum(clip) + 4 * sum(dino)
    assert float(terms.total) == pytest.approx(total, rel=1e-12)
    assert terms.total.requires_grad is False  # inputs without grad here
    assert set(got) == {'total', 'regr_1', 'regr_2', 'pts_err_1', 'pts_err_2', 'match',
                        'clip_1', 'clip_2', 'dino_1', 'dino_2'}


def test_weights_are_parameters_and_metric_pairs_keep_their_scale():
    views, targets = _views(np.random.default_rng(1))
    weights = LossWeights(alpha=0.2, matching=0.075, clip=0.4, dino=0.0)
    terms = sab3r_loss(views[0], views[1], targets, weights)
    regr = ref_regression(views, targets, alpha=0.2)
    clip = [ref_mse(v.clip, t.clip) for v, t in zip(views, (targets.view1, targets.view2))]
    assert terms.dino is None
    total = sum(regr) + 0.075 * ref_matching(views, targets) + 0.4 * sum(clip)
    assert float(terms.total) == pytest.approx(total, rel=1e-12)
    # Scaling a metric pair's prediction changes its loss; a non-metric pair's does not.
    scaled = [replace(v, pts3d=v.pts3d * torch.tensor([3.0, 3.0]).view(B, 1, 1, 1))
              for v in views]
    for metric, changes in (([False, False], False), ([True, True], True)):
        t = replace(targets, is_metric=torch.tensor(metric))
        a = sab3r_loss(views[0], views[1], t, weights).regression
        b = sab3r_loss(scaled[0], scaled[1], t, weights).regression
        assert (abs(float(a[0]) - float(b[0])) > 1e-3) == changes


def test_blocks_shuffle_and_partition_the_correspondences():
    rng = np.random.default_rng(2)
    views, targets = _views(rng, n=12)
    weights = replace(FULL_RECIPE, match_block=4)
    gen = torch.Generator().manual_seed(5)
    blocks = match_blocks(12, 4, B, torch.Generator().manual_seed(5))
    assert blocks.shape == (B, 3, 4)
    for b in range(B):
        assert sorted(blocks[b].flatten().tolist()) == list(range(12))
    terms = sab3r_loss(views[0], views[1], targets, weights, generator=gen)
    assert float(terms.matching) == pytest.approx(
        ref_matching(views, targets, blocks=blocks.numpy()), rel=1e-12)
    # Blocks restrict the negatives, so the value differs from the unblocked one.
    assert float(terms.matching) != pytest.approx(ref_matching(views, targets), rel=1e-6)
    with pytest.raises(ValueError, match='multiple of 5'):
        sab3r_loss(views[0], views[1], targets, replace(FULL_RECIPE, match_block=5))


def test_gradient_flows_and_no_valid_match_gives_zero():
    views, targets = _views(np.random.default_rng(3))
    views = [View(**{k: (None if getattr(v, k) is None
                         else getattr(v, k).clone().requires_grad_(True))
                     for k in ('pts3d', 'conf', 'desc', 'desc_conf', 'clip', 'dino')})
             for v in views]
    terms = sab3r_loss(views[0], views[1], targets)
    terms.total.backward()
    assert all(torch.isfinite(v.pts3d.grad).all() and v.clip.grad.abs().sum() > 0 for v in views)
    none_valid = replace(targets, corres_valid=torch.zeros_like(targets.corres_valid))
    assert float(sab3r_loss(views[0], views[1], none_valid).matching) == 0.0


@pytest.mark.parametrize('term', ['clip_2', 'regr_1', 'match'])
def test_non_finite_term_is_named(term):
    views, targets = _views(np.random.default_rng(4))
    if term == 'clip_2':
        clip = views[1].clip.clone()
        clip[0, 0, 0, 0] = math.nan
        views[1] = replace(views[1], clip=clip)
    elif term == 'regr_1':
        views[0] = replace(views[0], conf=views[0].conf * 0.0)  # log 0
    else:
        desc = views[1].desc.clone()
        desc[:] = math.inf
        views[1] = replace(views[1], desc=desc)
        targets = replace(targets, view1=replace(targets.view1, clip=None), view2=targets.view2)
        views = [replace(v, clip=None) for v in views]
        with pytest.raises(NonFiniteLossError, match="'match'"):
            sab3r_loss(views[0], views[1], targets, replace(FULL_RECIPE, clip=0.0))
        return
    with pytest.raises(NonFiniteLossError, match=repr(term)) as info:
        sab3r_loss(views[0], views[1], targets)
    assert info.value.term == term


def test_missing_head_or_teacher_map_is_an_error():
    views, targets = _views(np.random.default_rng(5))
    with pytest.raises(ValueError, match='view 2 has no teacher map'):
        sab3r_loss(views[0], views[1], replace(targets, view2=replace(targets.view2, dino=None)))
    with pytest.raises(ValueError, match='loss weight clip'):
        sab3r_loss(views[0], views[1], targets, replace(FULL_RECIPE, clip=-1.0))
