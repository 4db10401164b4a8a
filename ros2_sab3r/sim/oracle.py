"""OracleBackend: a backend that answers from recorded ground truth (depth, pose, labels).

An ORACLE, never a model: it separates the pipeline's errors (registration, fusion, instances,
boxes, the NOT_FOUND decision) from the network's, on any recording that carries per-pixel depth,
camera poses and label images (``sab3r-convert synthetic``, ``sab3r-convert scannet``, a robot's
own bags). It has the interface of a real backend and produces what SAB3R would for a pair:

- ``X``: pointmaps back-projected from the recorded depth with the recorded intrinsics, view 2 in
  view 1's frame through the recorded poses, a random scale per pair and multiplicative depth
  noise (``depth_noise``); pixels without a valid depth get confidence 0;
- ``D``: descriptors that are a fixed injective function of the pixel's world point, so
  reciprocal nearest neighbours are the true correspondences;
- ``S_clip``: the pixel feature of each pixel's class name (:class:`OracleNoise` ``regime``):
  ``'hash'`` the text embedding itself (clean, orthogonal classes), ``'cliplike'`` the CLIP-like
  stand-in's pixel feature (low absolute cosines, related classes close, background drawn
  towards generic words, see :class:`~ros2_sab3r.sim.standin.ClipLikeTextEncoderStandIn`),
  ``'text'`` the configured text encoder's embedding; plus noise (``clip_noise``);
- ``S_dino``: a fixed random vector per instance plus noise.

The frames come from :class:`OracleFrame` objects; :mod:`ros2_sab3r.eval.oracle` builds them
from a rosbag2 (``sab3r-eval BAG --oracle``; in the node ``model.backend:
ros2_sab3r.eval.oracle:BagOracleBackend``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.sim.synthetic import backproject
from ros2_sab3r.types import TextEncoder

ORACLE_REGIMES = ('hash', 'cliplike', 'text')


@dataclass(frozen=True)
class OracleFrame:
    """The recorded ground truth of one image (all arrays at the image's resolution)."""

    stamp_ns: int
    depth: np.ndarray  # (H, W) float32 camera z, metres; NaN or <= 0: no measurement
    K: np.ndarray  # (3, 3) intrinsics of the image
    T_WC: np.ndarray  # (4, 4) recorded pose, world from camera
    semantic: np.ndarray  # (H, W) int class id (0: void)
    instance: np.ndarray  # (H, W) int instance id (0: none)

    def points_world(self) -> np.ndarray:
        """(H, W, 3) float32 world points; NaN where the depth is not valid."""
        return backproject(self.valid_depth(), self.K, self.T_WC)

    def valid_depth(self) -> np.ndarray:
        """(H, W) float32 depth with NaN where there is no measurement."""
        d = np.asarray(self.depth, np.float32)
        return np.where(np.isfinite(d) & (d > 0), d, np.nan).astype(np.float32)


@dataclass(frozen=True)
class OracleNoise:
    """The oracle's deliberate imperfections: ``'regime=cliplike,clip_noise=0.5'``."""

    regime: str = 'hash'  # pixel features: one of ORACLE_REGIMES
    clip_noise: float = 0.5  # norm of the Gaussian noise added to each unit pixel feature
    depth_noise: float = 0.002  # relative depth noise (standard deviation)
    scale_jitter: float = 0.2  # log-normal sigma of the per-pair scale
    dino_dim: int = 32  # width of the DINO features (0: none)
    feature_stride: int = 8  # pixels between semantic feature cells
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> OracleNoise:
        """'name=value,...' (empty: defaults); ValueError naming the option and the fix."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for item in filter(None, (t.strip() for t in text.split(','))):
            key, sep, value = item.partition('=')
            key = key.strip()
            if not sep or key not in types:
                raise ValueError(f'oracle option {item!r}: expected NAME=VALUE with NAME one of '
                                 f'{", ".join(types)}')
            value = value.strip()
            try:
                values[key] = value if key == 'regime' else (
                    int(value) if types[key] == 'int' else float(value))
            except ValueError:
                raise ValueError(f'oracle option {key}={value!r} is not a number') from None
        return cls(**values).validate()

    def validate(self) -> OracleNoise:
        if self.regime not in ORACLE_REGIMES:
            raise ValueError(f'oracle regime={self.regime!r} is not one of {ORACLE_REGIMES}')
        for name in ('clip_noise', 'depth_noise', 'scale_jitter'):
            v = getattr(self, name)
            if not (np.isfinite(v) and 0 <= v <= 10):
                raise ValueError(f'oracle {name}={v} must be in [0, 10]')
        if self.dino_dim < 0 or self.feature_stride < 1:
            raise ValueError('oracle dino_dim must be >= 0 and feature_stride >= 1')
        return self

    def text(self) -> str:
        return ','.join(f'{f.name}={getattr(self, f.name)}' for f in fields(self))


class OracleBackend(GroundTruthBackend):
    """A backend answering from recorded ground truth (see the module docstring). AN ORACLE."""

    name = 'ORACLE (recorded ground truth, not a model)'

    def __init__(self, frames: Sequence[OracleFrame], class_names: Mapping[int, str],
                 text_encoder: TextEncoder, noise: OracleNoise = OracleNoise()) -> None:
        noise = noise.validate()
        self.noise = noise
        self.class_names = dict(class_names)
        super().__init__(frames, text_encoder, feature_stride=noise.feature_stride,
                         clip_noise=noise.clip_noise, dino_dim=noise.dino_dim,
                         scale_jitter=noise.scale_jitter, depth_noise=noise.depth_noise,
                         seed=noise.seed, scene_center=self._centre(frames))

    @staticmethod
    def _centre(frames: Sequence[OracleFrame]) -> np.ndarray:
        return np.mean([np.asarray(f.T_WC)[:3, 3] for f in frames], axis=0)

    def decode(self, a, b):
        pred = super().decode(a, b)
        # Pixels without a recorded depth carry no geometry: confidence 0 (the pipeline drops
        # them), points 0 instead of NaN.
        out = []
        for view, f in ((pred.view1, self._frames[a.stamp_ns]),
                        (pred.view2, self._frames[b.stamp_ns])):
            ok = np.isfinite(f.valid_depth()) & np.isfinite(view.X).all(-1)
            if ok.all():
                out.append(view)
                continue
            X = np.where(ok[..., None], view.X, 0.0).astype(np.float32)
            C = np.where(ok, view.C, 0.0).astype(np.float32)
            D = np.where(ok[..., None], np.nan_to_num(view.D), 0.0).astype(np.float32)
            out.append(type(view)(X=X, C=C, D=D, D_conf=C, S_clip=view.S_clip,
                                  S_dino=view.S_dino))
        return type(pred)(view1=out[0], view2=out[1], image_size=pred.image_size,
                          extras=pred.extras)

    def _class_embedding(self, class_id: int) -> np.ndarray:
        if class_id not in self._class_embeddings:
            name = self.class_names.get(class_id, 'unlabelled')
            pixel = getattr(self._text, 'pixel_feature', None)
            if self.noise.regime == 'cliplike' and pixel is None:
                raise ValueError('oracle regime=cliplike needs the CLIP-like stand-in text '
                                 'encoder (ros2_sab3r.sim.standin:ClipLikeTextEncoderStandIn)')
            e = pixel(name) if pixel is not None and self.noise.regime == 'cliplike' else \
                self._text.encode([name])[0]
            self._class_embeddings[class_id] = np.asarray(e, np.float32)
        return self._class_embeddings[class_id]
