"""Stand-ins that let the node and the demo run end to end without network weights.

Selected in the node with ``model.backend: ros2_sab3r.sim.standin:SyntheticSceneBackend``; the
scene is described in ``model.standin_scene`` as ``seed=0,frames=48,width=256,height=192``.
Both sides (the node's backend and whoever publishes the camera images, e.g. the demo) render the
same deterministic scene, and the backend answers each image from the ground truth of the frame
with the same stamp. Nothing produced this way says anything about SAB3R's quality.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
import hashlib

import numpy as np
from scipy.spatial.transform import Rotation

from ros2_sab3r.config import STANDIN_SCENE_EXAMPLE, ModelConfig, parse_standin_scene
from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.sim.synthetic import (
    NYU40,
    NYU40_ID,
    SyntheticFrame,
    SyntheticScene,
    make_scene,
)


class HashTextEncoderStandIn:
    """A stand-in TextEncoder: a fixed pseudo-random unit vector per string (no CLIP weights).

    Distinct strings get near-orthogonal embeddings, so the stand-in backend's class features can
    be told apart; it knows nothing of language ('sofa' is no closer to 'couch' than to 'lamp').
    """

    def __init__(self, dim: int = 512) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'little')
            v = np.random.default_rng(seed).standard_normal(self._dim)
            out[i] = v / np.linalg.norm(v)
        return out


@dataclass(frozen=True)
class SceneSpec:
    """Which synthetic sequence to render (``model.standin_scene``, see its description)."""

    seed: int = 0
    frames: int = 48
    width: int = 256
    height: int = 192
    fps: float = 5.0

    @classmethod
    def parse(cls, text: str) -> SceneSpec:
        """'seed=0,frames=48,...' (a leading 'synthetic:' is accepted); ValueError if bad."""
        scene, perturbation = parse_standin_scene(text)
        if perturbation:
            raise ValueError(f'synthetic scene {text!r} carries a perturbation; expected e.g. '
                             f'{STANDIN_SCENE_EXAMPLE!r}')
        return cls(**scene)

    def text(self) -> str:
        """The ``model.standin_scene`` value that names this scene."""
        return (f'seed={self.seed},frames={self.frames},width={self.width},'
                f'height={self.height},fps={self.fps:g}')

    def render(self) -> tuple[SyntheticScene, list[SyntheticFrame]]:
        scene = make_scene(seed=self.seed)
        frames = scene.sequence(self.frames, width=self.width, height=self.height, fps=self.fps)
        return scene, frames


class SyntheticSceneBackend(GroundTruthBackend):
    """GroundTruthBackend for a scene named by parameters (see the module docstring)."""

    perturbation: Perturbation | None = None  # deliberate errors: PerturbedSceneBackend only

    @classmethod
    def from_config(cls, model: ModelConfig) -> SyntheticSceneBackend:
        if model.checkpoint:
            raise ValueError(f'model.checkpoint={model.checkpoint!r}: the stand-in loads no '
                             'weights; its scene is model.standin_scene (clear model.checkpoint)')
        scene_options, perturbation = parse_standin_scene(model.standin_scene)
        if perturbation and cls.perturbation is None:
            raise ValueError(f'model.standin_scene={model.standin_scene!r} names a perturbation; '
                             'only ros2_sab3r.sim.standin:PerturbedSceneBackend applies one')
        spec = SceneSpec(**scene_options)
        scene, frames = spec.render()
        backend = cls(frames, HashTextEncoderStandIn())
        backend.scene, backend.spec = scene, spec
        backend.text_encoder = backend._text
        return backend


@dataclass(frozen=True)
class Perturbation:
    """Deliberate errors for the evaluation's own tests: 'pose_noise_deg=3,swap=a:b'.

    ``pose_noise_deg``: each pair's view-2 points are turned about view 1's camera by a random
    rotation of this many degrees (fixed per pair), so registration yields wrong relative poses;
    ``swap``: two class names whose semantic features are exchanged ('chair:sofa').
    """

    pose_noise_deg: float = 0.0
    swap: tuple[str, str] | None = None


class PerturbedSceneBackend(SyntheticSceneBackend):
    """The stand-in with deliberate errors (:class:`Perturbation`), to check that evaluation
    metrics fall when they should. ``model.standin_scene`` is the scene, ';', the perturbation:
    ``seed=0,frames=40;pose_noise_deg=3,swap=chair:sofa``.
    """

    name = 'groundtruth PERTURBED (stand-in, synthetic scenes only)'
    perturbation = Perturbation()

    @classmethod
    def from_config(cls, model: ModelConfig) -> PerturbedSceneBackend:
        backend = super().from_config(model)
        backend.perturbation = Perturbation(**parse_standin_scene(model.standin_scene)[1])
        return backend

    def decode(self, a, b):
        pred = super().decode(a, b)
        deg = self.perturbation.pose_noise_deg
        if deg <= 0 or a.stamp_ns == b.stamp_ns:
            return pred
        rng = np.random.default_rng([self._seed, 7, a.stamp_ns, b.stamp_ns])
        axis = rng.standard_normal(3)
        R = Rotation.from_rotvec(np.radians(deg) * axis / np.linalg.norm(axis)).as_matrix()
        X2 = (pred.view2.X @ R.T.astype(np.float32)).astype(np.float32)
        return replace(pred, view2=replace(pred.view2, X=X2))

    def _class_embedding(self, class_id: int) -> np.ndarray:
        swap = self.perturbation.swap
        name = NYU40[class_id - 1] if 1 <= class_id <= len(NYU40) else ''
        if swap and name in swap:
            class_id = NYU40_ID[swap[1] if name == swap[0] else swap[0]]
        return super()._class_embedding(class_id)
