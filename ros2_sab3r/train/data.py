"""Training data: views from sources, co-visible pairs, augmented crops and their ground truth.

Flow (ARCHITECTURE.md, "Training flows one way"): a source (a synthetic scene, a rosbag as
``sab3r-convert`` writes or a robot records) gives :class:`SceneViews` (image, K, depth, T_WC, each
possibly missing); :func:`select_pairs` keeps the ordered pairs whose co-visibility (depth + pose)
lies in the recipe's range; :func:`make_pair` crops both views (:mod:`.augment`) and computes,
in the crops' pixels:

- ``X1``, ``X2``: ground-truth pointmaps, both in view 1's camera frame (OpenCV axes), zero where
  the depth is unknown (``valid`` False);
- correspondences: valid pixels of view 1 projected into view 2 (``T_C2C1``, ``K2``), rounded to
  the nearest pixel, kept where view 2's depth agrees (not occluded); the rest of the requested
  count are random non-matching pixel pairs (negatives, ``corres_valid`` False).

Sources without depth or poses give pairs with no geometry (``has_geometry`` False): every
``valid`` False and no true correspondence, so the 3D and matching terms are zero; the recipe's
``data.geometry_guard`` then trains the heads only or distils against the frozen initial model.

Sampling is a pure function of the global sample index ``k`` (:class:`PairStream`): epoch
permutation from (seed, epoch), augmentation RNG from (seed, k). Resuming at step ``s`` therefore
only needs ``s`` (no loader state), and every rank draws disjoint samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
import logging
from pathlib import Path

import numpy as np
import torch

from ros2_sab3r.sim.synthetic import backproject, make_scene
from ros2_sab3r.train.augment import color_jitter, plan_crop, plan_principal_crop
from ros2_sab3r.train.losses import PairTargets, ViewTargets
from ros2_sab3r.train.recipe import DataSection, DataSource

logger = logging.getLogger(__name__)

DEPTH_AGREEMENT = 0.02  # relative depth difference still counted as the same surface
COVISIBILITY_STRIDE = 4  # pixels of view 1 tested when selecting pairs


class DataError(ValueError):
    """A data source that cannot give training pairs; names the source and the fix."""


@dataclass(frozen=True)
class View:
    rgb: np.ndarray  # (H, W, 3) uint8
    K: np.ndarray | None  # (3, 3)
    depth: np.ndarray | None  # (H, W) float32 camera z, metres; NaN or <= 0 = unknown
    T_WC: np.ndarray | None  # (4, 4) world from camera

    @property
    def has_geometry(self) -> bool:
        return self.K is not None and self.depth is not None and self.T_WC is not None


@dataclass(frozen=True)
class SceneViews:
    name: str
    views: tuple[View, ...]
    is_metric: bool

    @property
    def has_geometry(self) -> bool:
        return all(v.has_geometry for v in self.views)


def synthetic_views(source: DataSource) -> SceneViews:
    """Render ``source.frames`` views of the synthetic scene ``source.seed``."""
    height, width = source.render_size
    frames = make_scene(source.seed).sequence(source.frames, width=width, height=height,
                                              kind=source.trajectory)
    views = tuple(View(f.rgb, f.K, f.depth, f.T_WC) for f in frames)
    return SceneViews(f'synthetic:{source.seed}', views, source.is_metric)


def bag_views(source: DataSource) -> SceneViews:
    """Views of a rosbag: images, CameraInfo K, depth, poses from ``pose_topic`` or TF."""
    from ros2_sab3r.eval.bag import BagError, BagTopics, read_bag

    path = Path(source.path).expanduser()
    topics = BagTopics(pose=source.pose_topic) if source.pose_topic else BagTopics()
    try:
        bag = read_bag(path, topics, stride=source.stride, max_frames=source.frames,
                       tf_map_frame=source.tf_map_frame, progress=False)
    except BagError as exc:
        raise DataError(f'data source bag {path}: {exc}') from None
    views = []
    for frame in bag.frames:
        T_WC = frame.truth.T_WC if frame.truth.T_WC is not None else frame.camera.T_WC
        views.append(View(frame.camera.image, frame.camera.K, frame.truth.depth, T_WC))
    scene = SceneViews(f'bag:{path.name}', tuple(views), source.is_metric)
    if len(views) < 2:
        raise DataError(f'data source bag {path} has {len(views)} frame(s); pairs need at least '
                        '2 (lower stride or record longer)')
    if not scene.has_geometry:
        missing = [name for name, ok in (
            ('K (camera_info)', all(v.K is not None for v in views)),
            ('depth', all(v.depth is not None for v in views)),
            ('poses (/gt/pose, or TF with tf_map_frame)', all(v.T_WC is not None for v in views)))
            if not ok]
        logger.warning('bag %s lacks %s: its pairs carry no geometry (the geometry guard '
                       'applies)', path, ', '.join(missing))
    return scene


def load_source(source: DataSource) -> SceneViews:
    source.validate('source')
    return synthetic_views(source) if source.kind == 'synthetic' else bag_views(source)


# -- geometry ---------------------------------------------------------------------------------

def _valid_depth(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def relative_pose(T_WC1: np.ndarray, T_WC2: np.ndarray) -> np.ndarray:
    """T_C1C2: view 2's camera frame into view 1's."""
    return np.linalg.inv(T_WC1) @ T_WC2


def project(X: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 3) camera points -> (..., 2) pixel coordinates (x, y) and depth z."""
    z = X[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        uv = (X[..., :2] / z[..., None]) * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    return uv, z


def _matches(X1: np.ndarray, depth2: np.ndarray, K2: np.ndarray, T_C2C1: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (x2, y2) of view-1 points X1 (N, 3, view 1 frame) and whether they are true
    matches (in view 2's image, in front, not occluded)."""
    X2 = X1 @ T_C2C1[:3, :3].T + T_C2C1[:3, 3]
    uv, z = project(X2, K2)
    h, w = depth2.shape
    xy = np.rint(np.nan_to_num(uv, nan=-1.0, posinf=-1.0, neginf=-1.0)).astype(np.int64)
    inside = (z > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    xy = np.where(inside[:, None], xy, 0)
    d2 = depth2[xy[:, 1], xy[:, 0]]
    ok = inside & _valid_depth(d2) & (np.abs(d2 - z) <= DEPTH_AGREEMENT * np.abs(z))
    return xy, ok


def covisibility(view1: View, view2: View, stride: int = COVISIBILITY_STRIDE) -> float:
    """Share of view 1's valid pixels (every ``stride``-th) seen, unoccluded, by view 2."""
    if not (view1.has_geometry and view2.has_geometry):
        return float('nan')
    depth = view1.depth[::stride, ::stride]
    K = view1.K.copy()
    K[:2] /= stride  # pixel i of the subsampled map is pixel stride * i
    valid = _valid_depth(depth)
    if not valid.any():
        return 0.0
    X1 = backproject(np.where(valid, depth, 0), K)[valid].astype(np.float64)
    T_C2C1 = relative_pose(view2.T_WC, view1.T_WC)
    _, ok = _matches(X1, view2.depth, view2.K, T_C2C1)
    return float(ok.mean())


@dataclass(frozen=True)
class PairSpec:
    scene: int
    first: int
    second: int
    overlap: float  # co-visibility of first in second (NaN without geometry)


def select_pairs(scenes: Sequence[SceneViews], min_overlap: float, max_overlap: float,
                 max_gap: int = 0) -> list[PairSpec]:
    """Unordered view pairs (first < second) whose co-visibility is in [min, max].

    Scenes without geometry pair each view with its next ``max_gap`` (default 3) views.
    """
    pairs = []
    for s, scene in enumerate(scenes):
        n = len(scene.views)
        for i in range(n):
            for j in range(i + 1, n):
                if not scene.has_geometry:
                    if j - i <= (max_gap or 3):
                        pairs.append(PairSpec(s, i, j, float('nan')))
                    continue
                overlap = covisibility(scene.views[i], scene.views[j])
                if min_overlap <= overlap <= max_overlap:
                    pairs.append(PairSpec(s, i, j, overlap))
    return pairs


# -- one augmented pair -----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingPair:
    """One augmented pair in the crops' pixels (numpy; :func:`collate` makes tensors)."""

    rgb1: np.ndarray  # (h, w, 3) uint8: the crop the student AND the teachers see (by default)
    rgb2: np.ndarray
    K1: np.ndarray | None  # (3, 3) of the crops
    K2: np.ndarray | None
    X1: np.ndarray  # (h, w, 3) float32, view 1 frame; 0 where not valid
    X2: np.ndarray  # (h, w, 3) float32, view 1 frame
    valid1: np.ndarray  # (h, w) bool
    valid2: np.ndarray
    corres1: np.ndarray  # (N, 2) int64 (x, y) in view 1
    corres2: np.ndarray  # (N, 2) int64 (x, y) in view 2
    corres_valid: np.ndarray  # (N,) bool
    is_metric: bool
    has_geometry: bool
    # Reproduction only (teachers.<head>.uncropped_input): the official teachers' view, else None
    teacher1: np.ndarray | None = None  # (h, w, 3) uint8, see :func:`teacher_view`
    teacher2: np.ndarray | None = None


def teacher_view(view: View, data: DataSection) -> np.ndarray:
    """The image the official teachers saw (reproduction only, ``uncropped_input``).

    The official reader made the view at the training resolution (Lanczos cover rescale, crop
    centred on the principal point) and the teacher inputs from it at once, with their own
    ToTensor + ImageNet normalisation; MASt3R's random crop (our ``scale_range`` factor and
    random offset) and the colour jitter of the dataset transform came after, on the student's
    image only. So this is :func:`.augment.plan_principal_crop` of the source, without jitter:
    its pixels do not correspond to the student's (as in the official trainer).
    """
    return plan_principal_crop(view.rgb.shape[:2], data.resolution, view.K).image(view.rgb)


def _crop_view(view: View, data: DataSection, rng: np.random.Generator):
    lo, hi = data.scale_range
    factor = float(rng.uniform(lo, hi)) if hi > lo else lo
    crop = plan_crop(view.rgb.shape[:2], data.resolution, factor,
                     rng if data.crop == 'random' else None)
    rgb = color_jitter(crop.image(view.rgb), data.color_jitter, rng)
    K = crop.intrinsics(view.K) if view.K is not None else None
    depth = crop.nearest(view.depth) if view.depth is not None else None
    return rgb, K, depth


def sample_correspondences(X1: np.ndarray, valid1: np.ndarray, depth2: np.ndarray,
                           K2: np.ndarray, T_C2C1: np.ndarray, count: int, negatives: float,
                           rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` correspondences: true matches (with replacement when fewer exist) and at least
    ``negatives`` of the count as random non-matching pixel pairs."""
    h, w = valid1.shape
    ys, xs = np.nonzero(valid1)
    xy2, ok = _matches(X1[ys, xs].astype(np.float64), depth2, K2, T_C2C1)
    pos1 = np.stack([xs, ys], -1)[ok]
    pos2 = xy2[ok]
    n_pos = 0 if len(pos1) == 0 else count - int(round(count * negatives))
    pick = rng.choice(len(pos1), n_pos, replace=len(pos1) < n_pos) if n_pos else np.zeros(0, int)
    neg = count - n_pos
    neg1 = np.stack([rng.integers(0, w, neg), rng.integers(0, h, neg)], -1)
    neg2 = np.stack([rng.integers(0, depth2.shape[1], neg),
                     rng.integers(0, depth2.shape[0], neg)], -1)
    corres1 = np.concatenate([pos1[pick], neg1]).astype(np.int64)
    corres2 = np.concatenate([pos2[pick], neg2]).astype(np.int64)
    valid = np.concatenate([np.ones(n_pos, bool), np.zeros(neg, bool)])
    return corres1, corres2, valid


def make_pair(view1: View, view2: View, data: DataSection, rng: np.random.Generator,
              is_metric: bool = True, teacher_views: bool = False) -> TrainingPair:
    """Crop both views (one draw each) and compute the pair's ground truth in the crops;
    ``teacher_views`` adds :func:`teacher_view` of each (draws nothing from ``rng``)."""
    pair = _make_pair(view1, view2, data, rng, is_metric)
    if not teacher_views:
        return pair
    return replace(pair, teacher1=teacher_view(view1, data), teacher2=teacher_view(view2, data))


def _make_pair(view1: View, view2: View, data: DataSection, rng: np.random.Generator,
               is_metric: bool) -> TrainingPair:
    rgb1, K1, depth1 = _crop_view(view1, data, rng)
    rgb2, K2, depth2 = _crop_view(view2, data, rng)
    h, w = data.resolution
    geometry = view1.has_geometry and view2.has_geometry
    if not geometry:
        zeros, none = np.zeros((h, w, 3), np.float32), np.zeros((h, w), bool)
        n = data.correspondences
        c1 = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], -1).astype(np.int64)
        c2 = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], -1).astype(np.int64)
        return TrainingPair(rgb1, rgb2, K1, K2, zeros, zeros.copy(), none, none.copy(), c1, c2,
                            np.zeros(n, bool), is_metric, False)
    valid1, valid2 = _valid_depth(depth1), _valid_depth(depth2)
    X1 = backproject(np.where(valid1, depth1, 0), K1)
    T_C1C2 = relative_pose(view1.T_WC, view2.T_WC)
    X2_own = backproject(np.where(valid2, depth2, 0), K2)
    X2 = (X2_own.astype(np.float64) @ T_C1C2[:3, :3].T + T_C1C2[:3, 3]).astype(np.float32)
    X1 = np.where(valid1[..., None], X1, 0).astype(np.float32)
    X2 = np.where(valid2[..., None], X2, 0).astype(np.float32)
    c1, c2, cv = sample_correspondences(X1, valid1, np.where(valid2, depth2, np.nan), K2,
                                        np.linalg.inv(T_C1C2), data.correspondences,
                                        data.negatives, rng)
    return TrainingPair(rgb1, rgb2, K1, K2, X1, X2, valid1, valid2, c1, c2, cv, is_metric, True)


# -- stream, dataset, batches -----------------------------------------------------------------

@dataclass(frozen=True)
class PairStream:
    """Global sample index k -> (pair index, swapped) : a seeded permutation per epoch.

    With ``symmetrise`` samples 2m and 2m + 1 are the same pair (same crops) in both orders.
    """

    n_pairs: int
    seed: int
    symmetrise: bool = True

    def pair_of(self, k: int) -> tuple[int, bool, int]:
        """(pair index, views swapped, augmentation key) of global sample k."""
        base, swapped = (k // 2, bool(k % 2)) if self.symmetrise else (k, False)
        epoch, pos = divmod(base, self.n_pairs)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_pairs)
        return int(order[pos]), swapped, base


class PairDataset(torch.utils.data.Dataset):
    """Item k is global sample k (see :class:`PairStream`); deterministic in (seed, k)."""

    def __init__(self, scenes: Sequence[SceneViews], pairs: Sequence[PairSpec],
                 data: DataSection, seed: int, symmetrise: bool = True,
                 teacher_views: bool = False) -> None:
        if not pairs:
            raise DataError('no training pairs: the sources gave no view pairs with '
                            f'co-visibility in [{data.min_overlap}, {data.max_overlap}] '
                            '(more frames, a denser trajectory or a lower data.min_overlap)')
        self.scenes = list(scenes)
        self.pairs = list(pairs)
        self.data = data
        self.seed = seed
        self.teacher_views = teacher_views  # reproduction only: see :func:`teacher_view`
        self.stream = PairStream(len(pairs), seed, symmetrise)

    def __len__(self) -> int:
        return 2**62  # an endless stream; the engine decides how far to read

    def __getitem__(self, k: int) -> TrainingPair:
        index, swapped, key = self.stream.pair_of(int(k))
        spec = self.pairs[index]
        scene = self.scenes[spec.scene]
        rng = np.random.default_rng([self.seed, 1, key])
        pair = make_pair(scene.views[spec.first], scene.views[spec.second], self.data, rng,
                         scene.is_metric, self.teacher_views)
        return swap_views(pair, scene.views[spec.first], scene.views[spec.second]) \
            if swapped else pair


def swap_views(pair: TrainingPair, view1: View, view2: View) -> TrainingPair:
    """The same crops in the other order: ground truth re-expressed in the new view 1's frame."""
    if not pair.has_geometry:
        return TrainingPair(pair.rgb2, pair.rgb1, pair.K2, pair.K1, pair.X2, pair.X1,
                            pair.valid2, pair.valid1, pair.corres2, pair.corres1,
                            pair.corres_valid, pair.is_metric, False, pair.teacher2,
                            pair.teacher1)
    T_C2C1 = relative_pose(view2.T_WC, view1.T_WC)

    def moved(X, valid):
        out = X.astype(np.float64) @ T_C2C1[:3, :3].T + T_C2C1[:3, 3]
        return np.where(valid[..., None], out, 0).astype(np.float32)

    return TrainingPair(pair.rgb2, pair.rgb1, pair.K2, pair.K1, moved(pair.X2, pair.valid2),
                        moved(pair.X1, pair.valid1), pair.valid2, pair.valid1, pair.corres2,
                        pair.corres1, pair.corres_valid, pair.is_metric, True, pair.teacher2,
                        pair.teacher1)


@dataclass(frozen=True)
class Batch:
    """A batch of pairs as tensors: images in [0, 1] (the student maps them to [-1, 1])."""

    img1: torch.Tensor  # (B, 3, h, w) float32 in [0, 1]: student and teachers, same pixels
    img2: torch.Tensor
    targets: PairTargets
    has_geometry: torch.Tensor  # (B,) bool
    teacher1: torch.Tensor | None = None  # reproduction only: :func:`teacher_view`, [0, 1]
    teacher2: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        t = self.targets
        views = [ViewTargets(move(v.pts3d), move(v.valid)) for v in (t.view1, t.view2)]
        targets = PairTargets(views[0], views[1], move(t.is_metric), move(t.corres1),
                              move(t.corres2), move(t.corres_valid))
        return Batch(move(self.img1), move(self.img2), targets, move(self.has_geometry),
                     move(self.teacher1), move(self.teacher2))


def student_input(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] crop -> the network's [-1, 1] input (ToTensor then Normalize(0.5, 0.5))."""
    return (images - 0.5) / 0.5


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, h, w) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255.0)


def collate(pairs: Sequence[TrainingPair]) -> Batch:
    def stack(name, fn=torch.from_numpy):
        return torch.stack([fn(np.ascontiguousarray(getattr(p, name))) for p in pairs])

    view1 = ViewTargets(stack('X1'), stack('valid1'))
    view2 = ViewTargets(stack('X2'), stack('valid2'))
    targets = PairTargets(view1, view2, torch.tensor([p.is_metric for p in pairs]),
                          stack('corres1'), stack('corres2'), stack('corres_valid'))
    teachers = all(p.teacher1 is not None for p in pairs)
    return Batch(stack('rgb1', image_tensor), stack('rgb2', image_tensor), targets,
                 torch.tensor([p.has_geometry for p in pairs]),
                 stack('teacher1', image_tensor) if teachers else None,
                 stack('teacher2', image_tensor) if teachers else None)


def split_held_out(pairs: Sequence[PairSpec], share: float, seed: int
                   ) -> tuple[list[PairSpec], list[PairSpec]]:
    """(training, held-out) pairs: a seeded ``share`` of the pairs kept for evaluation."""
    if share <= 0 or len(pairs) < 2:
        return list(pairs), []
    order = np.random.default_rng([seed, 2]).permutation(len(pairs))
    n_held = min(len(pairs) - 1, max(1, int(round(share * len(pairs)))))
    held = set(order[:n_held].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])
