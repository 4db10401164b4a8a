"""The manifest of an ONNX export directory (``manifest.json``), read without torch.

An export directory holds, per static image size, an encoder graph and a decoder + heads graph::

    manifest.json
    encoder_384x512.onnx   decoder_384x512.onnx
    encoder_288x512.onnx   decoder_288x512.onnx
    encoder_384x512_int8.onnx  decoder_384x512_int8.onnx   (with sab3r-export --int8)
    geometry_384x512.onnx  features1_384x512.onnx  features2_384x512.onnx   (format 2, fp32)

The split graphs serve heads on demand (:class:`~ros2_sab3r.types.DecodeRequest`): the geometry
graph runs both decoders and the geometry heads and also returns the token layers the feature
heads read; each view's feature graph turns those layers into its CLIP/DINO features.

The manifest says what they are (architecture, image size, opset, input and output names, hash of
the weights they were exported from, hash of each file) and how close they came to torch at export
time (parity figures per output), so the ONNX Runtime and TensorRT backends know what they load
and refuse a mismatch with a clear message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = 'manifest.json'
FORMAT_NAME = 'ros2_sab3r-onnx'
# 2: per size, optional split graphs (geometry decoder; feature heads per view) for heads on
# demand. Format 1 directories still load: every decode then runs the full decoder graph.
FORMAT_VERSION = 2


class ExportError(ValueError):
    """An export directory is missing, incomplete, modified or does not fit the request."""


def graph_files(path: Path) -> tuple[Path, Path]:
    """An ONNX file and its external-data companion '<name>.data' (which may not exist)."""
    return path, path.with_name(path.name + '.data')


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file and, for ONNX with external data, of its '<name>.data' companion."""
    digest = hashlib.sha256()
    for p in graph_files(path):
        if p.is_file():
            with open(p, 'rb') as fh:
                while block := fh.read(chunk):
                    digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SplitGraphs:
    """The split decoder of one fp32 graph pair (format 2): geometry graph + feature graphs."""

    geometry: str  # file: (tokens1, tokens2) -> geometry outputs + feature_inputs of both views
    geometry_sha256: str
    features: dict[str, str]  # view ('1', '2') -> file: that view's feature_inputs -> features
    features_sha256: dict[str, str]
    geometry_outputs: tuple[str, ...]  # official names, in graph order (then the layers)
    layers: tuple[int, ...]  # token layers the feature heads read (model.network.feature_layers)
    parity: dict[str, dict[str, float | str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitGraphs:
        return cls(geometry=d['geometry'], geometry_sha256=d['geometry_sha256'],
                   features={str(k): v for k, v in d['features'].items()},
                   features_sha256={str(k): v for k, v in d['features_sha256'].items()},
                   geometry_outputs=tuple(d['geometry_outputs']),
                   layers=tuple(int(i) for i in d['layers']), parity=dict(d.get('parity', {})))

    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of every split graph."""
        return [(self.geometry, self.geometry_sha256),
                *((self.features[v], self.features_sha256[v]) for v in sorted(self.features))]


@dataclass(frozen=True)
class GraphPair:
    """The two graphs exported for one static image size."""

    image_size: tuple[int, int]  # (H, W) network input
    encoder: str  # file name in the export directory
    decoder: str
    encoder_sha256: str
    decoder_sha256: str
    token_shape: tuple[int, int, int]  # (1, N, enc_dim) encoder output = decoder inputs
    output_names: tuple[str, ...]  # decoder outputs, official names, in graph order
    # output -> {'max_abs', 'rel', 'tol', 'measure' ('max' for fp32, 'rms' for int8)}
    parity: dict[str, dict[str, float | str]] = field(default_factory=dict)
    precision: str = 'fp32'  # 'fp32', or 'int8' (dynamically quantised, see sab3r-export --int8)
    quantization: str = ''  # how an int8 pair was made, in words
    split: SplitGraphs | None = None  # heads on demand (format 2, fp32); None: full graph only

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphPair:
        return cls(image_size=tuple(d['image_size']), encoder=d['encoder'], decoder=d['decoder'],
                   encoder_sha256=d['encoder_sha256'], decoder_sha256=d['decoder_sha256'],
                   token_shape=tuple(d['token_shape']), output_names=tuple(d['output_names']),
                   parity=dict(d.get('parity', {})), precision=d.get('precision', 'fp32'),
                   quantization=d.get('quantization', ''),
                   split=SplitGraphs.from_dict(d['split']) if d.get('split') else None)


@dataclass(frozen=True)
class ExportManifest:
    config_name: str
    network_config: dict[str, Any]  # NetworkConfig.to_dict() of the exported network
    opset: int
    weights_sha256: str  # of the state dict the graphs were exported from
    source: str  # checkpoint path / repo id, or 'random weights (seed N)'
    graphs: tuple[GraphPair, ...]
    versions: dict[str, str] = field(default_factory=dict)  # torch, onnx, onnxruntime
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Sizes with fp32 graphs (every exported size has them)."""
        return [g.image_size for g in self.graphs if g.precision == 'fp32']

    def precisions(self, image_size: tuple[int, int]) -> list[str]:
        return [g.precision for g in self.graphs if g.image_size == tuple(image_size)]

    @property
    def clip_dim(self) -> int:
        """Output width of the CLIP feature head, 0 without one."""
        for head in self.network_config.get('feature_heads', []):
            if head.get('name') == 'clip':
                return int(head['out_dim'])
        return 0

    def graph_for(self, image_size: tuple[int, int], precision: str = 'fp32') -> GraphPair:
        for g in self.graphs:
            if g.image_size == tuple(image_size) and g.precision == precision:
                return g
        h, w = image_size
        if tuple(image_size) in self.image_sizes:
            raise ExportError(
                f'the export has no {precision} graphs for image size {h}x{w} (HxW); it has '
                f'{", ".join(self.precisions(image_size))}. Re-export with sab3r-export '
                f'--size {h}x{w}' + (' --int8' if precision == 'int8' else '')
                + ', or set model.dtype to one of those')
        have = ', '.join(f'{hh}x{ww}' for hh, ww in self.image_sizes) or 'none'
        raise ExportError(
            f'the export has no graphs for image size {h}x{w} (HxW); it has {have}. Set '
            'model.image_height/model.image_width to one of them or export this size with '
            f'sab3r-export --size {h}x{w}')

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + '\n'

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportManifest:
        if d.get('format') != FORMAT_NAME:
            raise ExportError(f'not an sab3r-export manifest (format {d.get("format")!r})')
        if int(d.get('format_version', -1)) > FORMAT_VERSION:
            raise ExportError(
                f'manifest format version {d["format_version"]} is newer than this build reads '
                f'({FORMAT_VERSION}); update ros2_sab3r or re-export')
        return cls(config_name=d['config_name'], network_config=d['network_config'],
                   opset=int(d['opset']), weights_sha256=d['weights_sha256'], source=d['source'],
                   graphs=tuple(GraphPair.from_dict(g) for g in d['graphs']),
                   versions=dict(d.get('versions', {})), format=d['format'],
                   format_version=int(d['format_version']))


def read_manifest(directory: str | Path) -> ExportManifest:
    directory = Path(directory).expanduser()
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f'{directory} is not an sab3r-export directory (no {MANIFEST_NAME}); create one with '
            'sab3r-export --checkpoint CKPT --out DIR')
    try:
        return ExportManifest.from_dict(json.loads(path.read_text(encoding='utf-8')))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f'{path} is malformed ({type(exc).__name__}: {exc}); re-export'
                          ) from None


def verify_files(directory: str | Path, graph: GraphPair) -> tuple[Path, Path]:
    """Paths of the graph pair after checking that both exist and are the exported bytes
    (the split graphs too, when the pair has them)."""
    directory = Path(directory).expanduser()
    out = []
    split = graph.split.files() if graph.split is not None else []
    for name, digest in ((graph.encoder, graph.encoder_sha256),
                         (graph.decoder, graph.decoder_sha256), *split):
        path = directory / name
        if not path.is_file():
            raise ExportError(f'{path} is missing; the export directory is incomplete, re-export')
        if file_sha256(path) != digest:
            raise ExportError(
                f'{path} differs from the file sab3r-export wrote (sha256 mismatch); it was '
                'modified or belongs to another export: re-export the directory')
        out.append(path)
    return out[0], out[1]
