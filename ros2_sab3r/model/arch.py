"""Architecture configurations of the SAB3R network, stored as data (``configs/*.json``).

An architecture is a frozen :class:`NetworkConfig`; the JSON files beside this module are its
serialised form, so adding an architecture means adding a file, not code. Infinite bounds of the
output modes are written as the strings ``'inf'`` / ``'-inf'`` because JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
import json
import math
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / 'configs'

DEPTH_MODES = ('exp', 'linear', 'square')
CONF_MODES = ('exp', 'sigmoid')
FEATURE_HEAD_NAMES = ('clip', 'dino')
FEATURE_HEAD_TYPES = ('dpt', 'linear')
# 'exp': the released norm-exp mapping f / |f| * (e^|f| - 1); 'linear': the raw regression.
FEATURE_MODES = ('exp', 'linear')


class ConfigError(ValueError):
    """An architecture configuration is malformed or inconsistent."""


@dataclass(frozen=True)
class OutputMode:
    """How a raw head channel becomes a value: ``kind`` plus bounds ``[vmin, vmax]``."""

    kind: str
    vmin: float = -math.inf
    vmax: float = math.inf

    def to_json(self) -> list:
        return [self.kind, _float_to_json(self.vmin), _float_to_json(self.vmax)]

    @classmethod
    def from_json(cls, value: Any) -> OutputMode:
        if isinstance(value, OutputMode):
            return value
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ConfigError(f'an output mode is [kind, vmin, vmax], got {value!r}')
        return cls(str(value[0]), _float_from_json(value[1]), _float_from_json(value[2]))


@dataclass(frozen=True)
class FeatureHeadConfig:
    """One SAB3R 2D-feature head, present in both views' downstream heads.

    Its weights live at ``downstream_head{1,2}.{name}_head.*``; it reads the view's hooked tokens
    ([encoder, decoder] as the point DPT) and writes ``out_dim`` features per input pixel.
    """

    name: str  # 'clip' or 'dino'
    out_dim: int  # 512 for the CLIP ViT-B/16 space, 384 for DINOv2 ViT-S/14
    head_type: str = 'dpt'  # 'dpt' (the release) or 'linear' (MLP, hidden 1 x (enc + dec))
    feature_dim: int = 256  # DPT fusion width
    last_dim: int = 128  # DPT width before the final 1x1 conv
    layer_dims: tuple[int, ...] = (96, 192, 384, 768)  # DPT reassemble widths
    mode: OutputMode = OutputMode('exp')  # the release: ('exp', -inf, inf)

    def __post_init__(self) -> None:
        object.__setattr__(self, 'layer_dims', tuple(int(v) for v in self.layer_dims))
        object.__setattr__(self, 'mode', OutputMode.from_json(self.mode))

    def validate(self) -> None:
        if self.name not in FEATURE_HEAD_NAMES:
            raise ConfigError(
                f'feature head name {self.name!r} is not one of {FEATURE_HEAD_NAMES}')
        if self.head_type not in FEATURE_HEAD_TYPES:
            raise ConfigError(
                f'feature head {self.name!r}: head_type {self.head_type!r} is not one of '
                f'{FEATURE_HEAD_TYPES}')
        if self.out_dim < 1:
            raise ConfigError(f'feature head {self.name!r}: out_dim must be >= 1')
        if len(self.layer_dims) != 4:
            raise ConfigError(f'feature head {self.name!r}: layer_dims needs 4 values')
        if self.mode.kind not in FEATURE_MODES:
            raise ConfigError(
                f'feature head {self.name!r}: mode {self.mode.kind!r} is not one of '
                f'{FEATURE_MODES}')
        if (self.mode.vmin, self.mode.vmax) != (-math.inf, math.inf):
            raise ConfigError(f'feature head {self.name!r}: mode bounds must be (-inf, inf)')

    def to_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'out_dim': self.out_dim, 'head_type': self.head_type,
                'feature_dim': self.feature_dim, 'last_dim': self.last_dim,
                'layer_dims': list(self.layer_dims), 'mode': self.mode.to_json()}


@dataclass(frozen=True)
class NetworkConfig:
    """The AsymmetricMASt3R network plus optional SAB3R feature heads.

    Defaults are the official constructor defaults; the ViT-L/ViT-B values live in
    ``configs/mast3r_vitl_512.json``.
    """

    name: str = 'custom'
    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    rope_base: float = 100.0  # pos_embed 'RoPE100'
    norm_eps: float = 1e-6
    norm_im2_in_dec: bool = True
    head_type: str = 'catmlp+dpt'
    desc_dim: int = 24  # output_mode 'pts3d+desc24'
    two_confs: bool = True
    depth_mode: OutputMode = OutputMode('exp')
    conf_mode: OutputMode = OutputMode('exp', 1.0)
    desc_conf_mode: OutputMode = OutputMode('exp', 0.0)
    desc_mode: str = 'norm'
    dpt_feature_dim: int = 256
    dpt_last_dim: int = 128
    dpt_layer_dims: tuple[int, ...] = (96, 192, 384, 768)
    local_mlp_ratio: float = 4.0  # local-feature MLP hidden = ratio * (enc_dim + dec_dim)
    feature_heads: tuple[FeatureHeadConfig, ...] = ()  # in official order: clip, then dino

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise JSON lists into tuples/OutputModes once, here.
        object.__setattr__(self, 'dpt_layer_dims', tuple(int(v) for v in self.dpt_layer_dims))
        for name in ('depth_mode', 'conf_mode', 'desc_conf_mode'):
            object.__setattr__(self, name, OutputMode.from_json(getattr(self, name)))
        heads = tuple(
            h if isinstance(h, FeatureHeadConfig) else _feature_head_from_dict(h)
            for h in self.feature_heads)
        object.__setattr__(self, 'feature_heads', heads)
        self.validate()

    @property
    def enc_head_dim(self) -> int:
        return self.enc_embed_dim // self.enc_num_heads

    @property
    def dec_head_dim(self) -> int:
        return self.dec_embed_dim // self.dec_num_heads

    @property
    def dpt_hooks(self) -> tuple[int, int, int, int]:
        """Indices into the (dec_depth + 1) token list consumed by the DPT heads."""
        d = self.dec_depth
        return (0, d * 2 // 4, d * 3 // 4, d)

    def feature_head(self, name: str) -> FeatureHeadConfig | None:
        return next((h for h in self.feature_heads if h.name == name), None)

    def validate(self) -> None:
        for dim, heads, what in ((self.enc_embed_dim, self.enc_num_heads, 'encoder'),
                                 (self.dec_embed_dim, self.dec_num_heads, 'decoder')):
            if heads < 1 or dim % heads:
                raise ConfigError(
                    f'{self.name}: {what} width {dim} is not divisible by {heads} heads')
            if (dim // heads) % 4:
                # RoPE2D splits a head in an x and a y half, each rotated in pairs.
                raise ConfigError(
                    f'{self.name}: {what} head dim {dim // heads} must be a multiple of 4 '
                    f'(RoPE2D)')
        if self.head_type != 'catmlp+dpt':
            raise ConfigError(
                f"{self.name}: head_type {self.head_type!r} is not supported; only 'catmlp+dpt'")
        if self.dec_depth < 10:
            # The DPT hooks (0, d/2, 3d/4, d) must be distinct layers (the official factory
            # asserts it).
            raise ConfigError(
                f'{self.name}: the DPT head needs dec_depth >= 10, got {self.dec_depth}')
        if self.depth_mode.kind not in DEPTH_MODES:
            raise ConfigError(
                f'{self.name}: depth_mode {self.depth_mode.kind!r} not in {DEPTH_MODES}')
        if (self.depth_mode.vmin, self.depth_mode.vmax) != (-math.inf, math.inf):
            raise ConfigError(f'{self.name}: depth_mode bounds must be (-inf, inf)')
        for mode in (self.conf_mode, self.desc_conf_mode):
            if mode.kind not in CONF_MODES:
                raise ConfigError(
                    f'{self.name}: confidence mode {mode.kind!r} not in {CONF_MODES}')
        if self.desc_mode != 'norm':
            raise ConfigError(
                f"{self.name}: desc_mode {self.desc_mode!r} is not supported; only 'norm'")
        if len(self.dpt_layer_dims) != 4:
            raise ConfigError(f'{self.name}: dpt_layer_dims needs 4 values')
        names = [h.name for h in self.feature_heads]
        if len(set(names)) != len(names):
            raise ConfigError(f'{self.name}: duplicate feature head names {names}')
        for head in self.feature_heads:
            head.validate()
        if names != [n for n in FEATURE_HEAD_NAMES if n in names]:
            # Registration (state-dict) order and the official channel layout put CLIP first.
            raise ConfigError(f'{self.name}: feature heads must be listed clip before dino, '
                              f'got {names}')

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, OutputMode):
                value = value.to_json()
            elif f.name == 'feature_heads':
                value = [h.to_dict() for h in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f'unknown architecture fields {unknown}; known: {sorted(known)}')
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _feature_head_from_dict(data: Any) -> FeatureHeadConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f'a feature head is a mapping, got {data!r}')
    known = {f.name for f in fields(FeatureHeadConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f'unknown feature head fields {unknown}; known: {sorted(known)}')
    return FeatureHeadConfig(**dict(data))


def _float_to_json(value: float) -> float | str:
    if math.isinf(value):
        return 'inf' if value > 0 else '-inf'
    return value


def _float_from_json(value: Any) -> float:
    if isinstance(value, str):
        if value.strip() not in ('inf', '+inf', '-inf'):
            raise ConfigError(f"a bound is a number, 'inf' or '-inf', got {value!r}")
    return float(value)


def available_configs() -> list[str]:
    """Names of the architecture files shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob('*.json'))


def load_config(name_or_path: str | Path) -> NetworkConfig:
    """Load an architecture by shipped name (``'sab3r_cd'``) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f'{name_or_path}.json'
    if not path.is_file():
        raise ConfigError(
            f'architecture {name_or_path!r} not found; shipped: {", ".join(available_configs())}')
    with open(path, encoding='utf-8') as fh:
        data = json.load(fh)
    return NetworkConfig.from_dict(data)
