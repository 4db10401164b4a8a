"""Dense descriptor matching: fast reciprocal nearest neighbours (MASt3R's matcher).

Seeds on a regular grid of image 1 walk 1 -> 2 -> 1 by nearest neighbour (largest dot product)
until they come back to where they started (a reciprocal pair) or ``max_iter`` rounds pass.
Everything is vectorised; the similarity matrix is computed in blocks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Matches:
    """Pixel correspondences between two images, as (x, y) integer coordinates."""

    xy1: np.ndarray  # (M, 2) int64, (x, y) in image 1
    xy2: np.ndarray  # (M, 2) int64, (x, y) in image 2

    def __len__(self) -> int:
        return int(self.xy1.shape[0])


def _nearest(queries: torch.Tensor, database: torch.Tensor, block_size: int) -> torch.Tensor:
    """Index in ``database`` (N, D) of the largest dot product for each query (M, D)."""
    out = []
    for start in range(0, queries.shape[0], block_size):
        sim = queries[start:start + block_size] @ database.T  # (m, N)
        out.append(sim.argmax(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.long, device=queries.device)
    return torch.cat(out)


def _as_tensor(desc: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    t = torch.as_tensor(desc)
    if t.ndim != 3:
        raise ValueError(f'descriptor maps are (H, W, D), got {tuple(t.shape)}')
    return t.to(device=device, dtype=torch.float32)


def reciprocal_seeds(shape: tuple[int, int], subsample: int) -> np.ndarray:
    """Flat indices (y * W + x) of the seed grid: pixel centres subsample // 2 + k * subsample."""
    h, w = shape
    ys = np.arange(subsample // 2, h, subsample)
    xs = np.arange(subsample // 2, w, subsample)
    return np.unique((xs[None, :] + w * ys[:, None]).ravel())


def fast_reciprocal_nns(desc1: np.ndarray | torch.Tensor, desc2: np.ndarray | torch.Tensor,
                        subsample: int = 8, max_iter: int = 10, block_size: int = 2 ** 13,
                        device: str | torch.device = 'cpu',
                        seeds: np.ndarray | None = None) -> Matches:
    """Reciprocal nearest-neighbour matches of descriptor maps (H1, W1, D) and (H2, W2, D).

    Returns unique pairs sorted by the flat index in image 1 then in image 2.
    """
    d1, d2 = _as_tensor(desc1, device), _as_tensor(desc2, device)
    (h1, w1, dim), (h2, w2, dim2) = d1.shape, d2.shape
    if dim != dim2:
        raise ValueError(f'descriptor widths differ: {dim} and {dim2}')
    flat1, flat2 = d1.reshape(-1, dim), d2.reshape(-1, dim)  # (N1, D), (N2, D)
    seed = reciprocal_seeds((h1, w1), subsample) if seeds is None else np.asarray(seeds)
    xy1 = torch.as_tensor(seed, dtype=torch.long, device=flat1.device)  # (S,)
    xy2 = torch.full_like(xy1, -1)
    notyet = torch.ones_like(xy1, dtype=torch.bool)
    for _ in range(max_iter):
        active = notyet.nonzero().squeeze(1)
        if active.numel() == 0:
            break
        new_xy2 = _nearest(flat1[xy1[active]], flat2, block_size)
        still = new_xy2 != xy2[active]  # moved in image 2: not converged yet
        xy2 = xy2.index_put((active,), new_xy2)
        active = active[still]
        new_xy1 = _nearest(flat2[xy2[active]], flat1, block_size)
        back = new_xy1 != xy1[active]  # did not return to its start: keep walking
        xy1 = xy1.index_put((active,), new_xy1)
        keep = torch.zeros_like(notyet)
        notyet = keep.index_put((active[back],), torch.ones_like(back[back]))
    converged = ~notyet
    p1, p2 = xy1[converged].cpu().numpy(), xy2[converged].cpu().numpy()
    # Unique pairs sorted by (index in 1, index in 2).
    pair = np.unique(p1.astype(np.int64) * (h2 * w2) + p2.astype(np.int64))
    p1, p2 = pair // (h2 * w2), pair % (h2 * w2)
    return Matches(xy1=np.stack([p1 % w1, p1 // w1], axis=1),
                   xy2=np.stack([p2 % w2, p2 // w2], axis=1))


def drop_border_matches(matches: Matches, shape1: tuple[int, int], shape2: tuple[int, int],
                        border: int = 3) -> Matches:
    """Keep matches at least ``border`` pixels inside both images (official README recipe)."""
    def inside(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        return ((xy[:, 0] >= border) & (xy[:, 0] < w - border)
                & (xy[:, 1] >= border) & (xy[:, 1] < h - border))

    keep = inside(matches.xy1, shape1) & inside(matches.xy2, shape2)
    return Matches(xy1=matches.xy1[keep], xy2=matches.xy2[keep])
