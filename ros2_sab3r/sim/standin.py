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


def _unit_hash_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'little')
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


# Related classes of the CLIP-like stand-in: words in one group share a direction.
CLIPLIKE_GROUPS = {
    'seat': ('chair', 'sofa', 'couch', 'armchair', 'stool', 'bench', 'seat'),
    'storage': ('cabinet', 'dresser', 'bookshelf', 'shelves', 'shelf', 'night stand',
                'nightstand', 'drawer', 'wardrobe', 'cupboard', 'bookcase', 'counter'),
    'surface': ('table', 'desk', 'counter', 'nightstand', 'coffee table'),
    'bed': ('bed', 'pillow', 'blanket', 'mattress'),
    'screen': ('television', 'tv', 'monitor', 'computer', 'laptop', 'screen'),
    'light': ('lamp', 'light', 'chandelier'),
    'textile': ('curtain', 'blinds', 'towel', 'clothes', 'pillow', 'floor mat', 'rug',
                'shower curtain'),
    'opening': ('door', 'window', 'mirror', 'picture', 'whiteboard'),
    'structure': ('wall', 'floor', 'ceiling', 'otherstructure'),
    'bathroom': ('toilet', 'sink', 'bathtub', 'shower curtain'),
    'small': ('box', 'bag', 'books', 'paper', 'otherprop', 'bottle', 'cup'),
}
# Near-synonyms: the word shares its canonical word's own direction too.
CLIPLIKE_SYNONYMS = {'couch': 'sofa', 'tv': 'television', 'bookcase': 'bookshelf',
                     'nightstand': 'night stand', 'desk lamp': 'lamp', 'armchair': 'chair'}
# What background pixels look like to CLIP: generic words, not a class.
CLIPLIKE_GENERIC = ('object', 'things', 'stuff', 'texture', 'background', 'surface', 'thing',
                    'item')
CLIPLIKE_BACKGROUND = ('wall', 'floor', 'ceiling', 'unlabelled', 'otherstructure')


class ClipLikeTextEncoderStandIn:
    """A stand-in TextEncoder with the statistics of real CLIP (no CLIP weights, no language).

    Text embeddings are unit mixtures of a direction shared by all text (CLIP's text embeddings
    of object names are 0.5-0.8 apart), a direction per group of related classes
    (:data:`CLIPLIKE_GROUPS`: 'chair' is closer to 'sofa' than to 'lamp') and one per word
    (near-synonyms of :data:`CLIPLIKE_SYNONYMS` share their canonical word's). Generic words
    (:data:`CLIPLIKE_GENERIC`) are mostly the shared direction.

    :meth:`pixel_feature` is what a dense CLIP feature of a pixel of that class looks like: a
    unit vector mostly along an image-only direction (CLIP's modality gap), so its cosine with
    the right text is low (``pixel_text_cosine``, ~0.3 by default; ~0.2 with unrelated words,
    ~0.25 with related ones), and background classes (:data:`CLIPLIKE_BACKGROUND`) are drawn
    towards the generic words. The weights are constructor arguments, so tests and evaluations
    can make the regime harder or easier.
    """

    def __init__(self, dim: int = 512, shared: float = 0.75, group: float = 0.45,
                 word: float = 0.5, synonym: float = 0.9, pixel_text_cosine: float = 0.3,
                 background_generic: float = 0.6) -> None:
        if dim < 16:
            raise ValueError(f'ClipLikeTextEncoderStandIn dim={dim} must be at least 16')
        if not 0 < pixel_text_cosine < 1 or not 0 <= background_generic <= 1:
            raise ValueError('pixel_text_cosine must be in (0, 1), background_generic in [0, 1]')
        self._dim = dim
        self._w = (shared, group, word)
        self._synonym = synonym
        self._pixel_cos = pixel_text_cosine
        self._background = background_generic
        self._shared = _unit_hash_vector('cliplike shared text', dim)
        self._gap = _unit_hash_vector('cliplike image-only', dim)

    @property
    def dim(self) -> int:
        return self._dim

    def _text(self, text: str) -> np.ndarray:
        word = ' '.join(text.lower().split())
        shared, group, own = self._w
        if word in CLIPLIKE_GENERIC:
            v = shared * 1.6 * self._shared + own * _unit_hash_vector('word ' + word, self._dim)
            return v / np.linalg.norm(v)
        canonical = CLIPLIKE_SYNONYMS.get(word, word)
        groups = [g for g, words in CLIPLIKE_GROUPS.items() if word in words or
                  canonical in words]
        v = shared * self._shared
        for g in groups:
            v = v + group / np.sqrt(len(groups)) * _unit_hash_vector('group ' + g, self._dim)
        if canonical != word:
            v = v + own * (self._synonym * _unit_hash_vector('word ' + canonical, self._dim)
                           + (1 - self._synonym) * _unit_hash_vector('word ' + word, self._dim))
        else:
            v = v + own * _unit_hash_vector('word ' + word, self._dim)
        return v / np.linalg.norm(v)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._text(t) for t in texts]).astype(np.float32).reshape(
            len(texts), self._dim)

    def pixel_feature(self, class_name: str) -> np.ndarray:
        """(dim,) unit CLIP-like image feature of a pixel of `class_name` (see the class)."""
        t = self._text(class_name)
        if ' '.join(class_name.lower().split()) in CLIPLIKE_BACKGROUND:
            generic = self.encode(CLIPLIKE_GENERIC).mean(0)
            generic /= np.linalg.norm(generic)
            t = (1 - self._background) * t + self._background * generic
            t /= np.linalg.norm(t)
        c = self._pixel_cos
        v = c * t + np.sqrt(1 - c * c) * self._gap  # the gap direction is ~orthogonal to text
        return (v / np.linalg.norm(v)).astype(np.float32)
