"""GroundTruthBackend: a stand-in backend that answers from a synthetic scene's ground truth.

It exists to test the pipeline and to run the synthetic demo without a network; it says nothing
about model quality and must never be used to report it.

It has the interface of a real backend (:class:`ros2_sab3r.inference.base.Backend`: ``name``,
``device``, ``input_size``, ``clip_dim``, ``text_encoder``, ``encode(frame)``,
``decode(a, b) -> PairPrediction``, ``warm_up()``, ``close()``) and produces what SAB3R would
for a pair, from the rendered ground truth of the frame with the same stamp:

- ``X``: view 1's points in its own frame, view 2's points in view 1's frame, both multiplied by a
  random per-pair scale (pointmaps from a pair network have no metric scale), small depth noise;
- ``C``: high where the geometry is known from the pair, ~1 (below any threshold) for view-2 pixels
  that view 1 does not see, so a pair without overlap carries no confident points;
- ``D``: 24-d unit descriptors that are a fixed function of the pixel's world point, so reciprocal
  nearest neighbours are the true correspondences;
- ``S_clip``: at ``feature_stride``, the text encoder's embedding of each pixel's class name plus
  noise; ``S_dino``: a fixed random vector per instance plus noise (``dino_dim`` > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import hashlib

import numpy as np

from ros2_sab3r.sim.synthetic import NYU40, SyntheticFrame, backproject
from ros2_sab3r.types import CameraFrame, PairPrediction, TextEncoder, ViewPrediction

DESCRIPTOR_DIM = 24


@dataclass(frozen=True)
class GroundTruthTokens:
    """What ``encode`` returns: a reference to the rendered frame (a real backend: tokens)."""

    stamp_ns: int


def _seed(*values: int) -> int:
    h = hashlib.sha256(np.array(values, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(h[:8], 'little')


class GroundTruthBackend:
    """Stand-in for a SAB3R backend on synthetic scenes (see the module docstring)."""

    name = 'groundtruth (stand-in, synthetic scenes only)'
    device = 'cpu'

    def __init__(self, frames: Sequence[SyntheticFrame], text_encoder: TextEncoder,
                 feature_stride: int = 8, clip_noise: float = 0.5, dino_dim: int = 32,
                 scale_jitter: float = 0.2, depth_noise: float = 0.002, seed: int = 0,
                 scene_center: Sequence[float] = (3.0, 2.5, 1.3)) -> None:
        if not frames:
            raise ValueError('GroundTruthBackend needs the rendered frames it answers for')
        self._frames = {f.stamp_ns: f for f in frames}
        H, W = frames[0].depth.shape
        if any(f.depth.shape != (H, W) for f in frames):
            raise ValueError('GroundTruthBackend: all frames must have the same resolution')
        self.input_size = (H, W)
        self._text = text_encoder
        self.text_encoder = text_encoder  # brought along: load_model uses it (CLIP width checked)
        self._stride = feature_stride
        self._clip_noise = clip_noise
        self._dino_dim = dino_dim
        self._scale_jitter = scale_jitter
        self._depth_noise = depth_noise
        self._seed = seed
        self._center = np.asarray(scene_center, dtype=np.float64)
        rng = np.random.default_rng(seed)
        # A fixed isometric embedding of S^3 into R^24 (orthonormal columns).
        self._embed = np.linalg.qr(rng.standard_normal((DESCRIPTOR_DIM, 4)))[0].astype(np.float32)
        self._class_embeddings: dict[int, np.ndarray] = {}
        self.encode_calls = 0
        self.decode_calls = 0

    # ------------------------------------------------------------------------------ interface
    @property
    def clip_dim(self) -> int:
        """Width of the S_clip features: the text encoder's embeddings plus noise."""
        return self._text.dim

    def warm_up(self) -> float:
        """Nothing is initialised lazily: 0 ms."""
        return 0.0

    def close(self) -> None:
        """Nothing to free."""

    def encode(self, frame: CameraFrame) -> GroundTruthTokens:
        self.encode_calls += 1
        truth = self._frames.get(frame.stamp_ns)
        if truth is None:
            raise ValueError(
                f'GroundTruthBackend has no rendered frame with stamp {frame.stamp_ns}; feed it '
                'the frames of the sequence it was built from')
        if frame.image.shape[:2] != self.input_size:
            raise ValueError(
                f'GroundTruthBackend renders at {self.input_size}, got an image of '
                f'{frame.image.shape[:2]}; render the scene at the backend resolution')
        return GroundTruthTokens(frame.stamp_ns)

    def decode(self, a: GroundTruthTokens, b: GroundTruthTokens) -> PairPrediction:
        self.decode_calls += 1
        f1, f2 = self._frames[a.stamp_ns], self._frames[b.stamp_ns]
        rng = np.random.default_rng(_seed(self._seed, a.stamp_ns, b.stamp_ns))
        scale = float(np.exp(rng.normal(0.0, self._scale_jitter)))
        T_C1W = np.linalg.inv(f1.T_WC)
        X1 = backproject(f1.depth, f1.K)  # (H, W, 3) in camera 1
        X2_w = f2.points_world()  # (H, W, 3) world
        X2 = X2_w @ T_C1W[:3, :3].T.astype(np.float32) + T_C1W[:3, 3].astype(np.float32)
        visible = self._visible_from(f1, X2)  # (H, W) view-2 pixels that view 1 sees
        C1 = 2.0 + 8.0 * np.exp(-f1.depth / 5.0)
        C2 = np.where(visible, 2.0 + 8.0 * np.exp(-np.linalg.norm(X2, axis=-1) / 5.0), 1.05)
        noise1 = 1.0 + self._depth_noise * rng.standard_normal(f1.depth.shape)
        noise2 = 1.0 + self._depth_noise * rng.standard_normal(f2.depth.shape)
        view1 = ViewPrediction(
            X=(X1 * (scale * noise1)[..., None]).astype(np.float32), C=C1.astype(np.float32),
            D=self._descriptors(f1.points_world(), rng), D_conf=C1.astype(np.float32),
            S_clip=self._clip(f1, rng), S_dino=self._dino(f1, rng))
        view2 = ViewPrediction(
            X=(X2 * (scale * noise2)[..., None]).astype(np.float32), C=C2.astype(np.float32),
            D=self._descriptors(X2_w, rng), D_conf=C2.astype(np.float32),
            S_clip=self._clip(f2, rng), S_dino=self._dino(f2, rng))
        return PairPrediction(view1=view1, view2=view2, image_size=self.input_size,
                              extras={'backend': self.name, 'pair_scale': scale})

    # -------------------------------------------------------------------------------- helpers
    @staticmethod
    def _visible_from(f1: SyntheticFrame, X_c1: np.ndarray) -> np.ndarray:
        H, W = f1.depth.shape
        z = X_c1[..., 2]
        with np.errstate(divide='ignore', invalid='ignore'):
            u = np.round(f1.K[0, 0] * X_c1[..., 0] / z + f1.K[0, 2]).astype(np.int64)
            v = np.round(f1.K[1, 1] * X_c1[..., 1] / z + f1.K[1, 2]).astype(np.int64)
        inside = (z > 0.05) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        d = f1.depth[np.clip(v, 0, H - 1), np.clip(u, 0, W - 1)]
        return inside & (np.abs(d - z) < 0.03 * z + 0.02)

    def _descriptors(self, X_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Inverse stereographic projection onto S^3 (length scale 4 m) keeps nearby world points
        # nearby and is injective, so the dot-product nearest neighbour is the same world point.
        p = (X_w.astype(np.float64) - self._center) / 4.0
        n2 = (p * p).sum(-1, keepdims=True)
        s3 = np.concatenate([2 * p, 1 - n2], -1) / (1 + n2)  # (H, W, 4) unit vectors
        D = s3.astype(np.float32) @ self._embed.T
        D += 1e-4 * rng.standard_normal(D.shape).astype(np.float32)
        return D / np.linalg.norm(D, axis=-1, keepdims=True)

    def _class_embedding(self, class_id: int) -> np.ndarray:
        if class_id not in self._class_embeddings:
            name = NYU40[class_id - 1] if 1 <= class_id <= len(NYU40) else 'unlabelled'
            self._class_embeddings[class_id] = self._text.encode([name])[0]
        return self._class_embeddings[class_id]

    def _clip(self, f: SyntheticFrame, rng: np.random.Generator) -> np.ndarray:
        s = self._stride
        sem = f.semantic[s // 2::s, s // 2::s]  # (h, w) class at each feature cell centre
        ids = np.unique(sem)
        table = np.zeros((int(ids.max()) + 1, self._text.dim), dtype=np.float32)
        for i in ids:
            table[i] = self._class_embedding(int(i))
        S = table[sem]
        S += (self._clip_noise / np.sqrt(self._text.dim)) * rng.standard_normal(S.shape).astype(
            np.float32)
        return S

    def _dino(self, f: SyntheticFrame, rng: np.random.Generator) -> np.ndarray | None:
        if self._dino_dim <= 0:
            return None
        s = self._stride
        inst = f.instance[s // 2::s, s // 2::s]
        ids = np.unique(inst)
        table = np.zeros((int(ids.max()) + 1, self._dino_dim), dtype=np.float32)
        for i in ids:
            rng_i = np.random.default_rng(_seed(self._seed, 99, int(i)))
            v = rng_i.standard_normal(self._dino_dim)
            table[i] = v / np.linalg.norm(v)
        S = table[inst]
        S += (0.3 / np.sqrt(self._dino_dim)) * rng.standard_normal(S.shape).astype(np.float32)
        return S
