"""The ORACLE backend on a recorded bag: ground truth in place of the network.

``sab3r-eval BAG --oracle [--oracle-noise regime=cliplike,clip_noise=0.5]`` evaluates the
pipeline alone on any bag with depth, a pose topic and label images; the node and the demo use
it as ``model.backend: ros2_sab3r.eval.oracle:BagOracleBackend`` with ``model.oracle``
('BAG' or 'BAG;regime=cliplike,...'). Figures made with it say nothing about SAB3R.
"""

from __future__ import annotations

from ros2_sab3r.config import ModelConfig
from ros2_sab3r.eval.bag import BagData, BagError, read_bag
from ros2_sab3r.sim.oracle import OracleBackend, OracleFrame, OracleNoise
from ros2_sab3r.sim.standin import ClipLikeTextEncoderStandIn, HashTextEncoderStandIn
from ros2_sab3r.types import TextEncoder


def oracle_frames(bag: BagData) -> list[OracleFrame]:
    """Frames of `bag` with depth, pose, intrinsics and labels; BagError when there are none."""
    frames = []
    for f in bag.frames:
        t = f.truth
        if t.depth is None or t.T_WC is None or f.camera.K is None or t.semantic is None:
            continue
        instance = t.instance if t.instance is not None else t.semantic
        frames.append(OracleFrame(stamp_ns=f.camera.stamp_ns, depth=t.depth, K=f.camera.K,
                                  T_WC=t.T_WC, semantic=t.semantic, instance=instance))
    if not frames:
        have = ', '.join(p for p in ('depth', 'T_WC', 'semantic') if bag.has(p)) or 'none'
        raise BagError(f'{bag.path}: the oracle needs frames with depth, a pose (/gt/pose), '
                       f'CameraInfo and label images (/camera/semantic); this bag has: {have}')
    return frames


def oracle_text_encoder(noise: OracleNoise, dim: int = 512) -> TextEncoder:
    """The stand-in text encoder of the oracle's regime ('text' brings its own: not here)."""
    if noise.regime == 'cliplike':
        return ClipLikeTextEncoderStandIn(dim=dim)
    return HashTextEncoderStandIn(dim=dim)


def build_oracle(bag: BagData, noise: OracleNoise | None = None,
                 text_encoder: TextEncoder | None = None, cls: type = OracleBackend
                 ) -> OracleBackend:
    """An OracleBackend answering for `bag`'s frames (text encoder: the regime's stand-in)."""
    noise = OracleNoise() if noise is None else noise
    names = dict(bag.label_map)
    if not names:
        raise BagError(f'{bag.path}: the oracle needs the label map (/gt/label_map) to name '
                       'the classes of the label images')
    if text_encoder is None:
        if noise.regime == 'text':
            raise ValueError("oracle regime 'text' needs a text encoder (model.text_encoder)")
        text_encoder = oracle_text_encoder(noise)
    return cls(oracle_frames(bag), names, text_encoder, noise)


def parse_oracle_param(text: str) -> tuple[str, OracleNoise]:
    """``model.oracle`` 'BAG' or 'BAG;name=value,...' -> (bag path, noise)."""
    path, _, options = text.partition(';')
    if not path.strip():
        raise ValueError("model.oracle is empty; give the bag the oracle answers from, e.g. "
                         "'/data/scene.bag' or '/data/scene.bag;regime=cliplike'")
    return path.strip(), OracleNoise.parse(options)


class BagOracleBackend(OracleBackend):
    """OracleBackend built from ``model.oracle`` (node, demo): the bag read at configure."""

    @classmethod
    def from_config(cls, model: ModelConfig) -> BagOracleBackend:
        if model.checkpoint:
            raise ValueError(f'model.checkpoint={model.checkpoint!r}: the oracle loads no '
                             'weights; its bag is model.oracle (clear model.checkpoint)')
        path, noise = parse_oracle_param(model.oracle)
        return build_oracle(read_bag(path, progress=False), noise, cls=cls)
