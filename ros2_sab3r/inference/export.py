"""``sab3r-export``: the network as two static-shape ONNX graphs per image size, checked.

The MASt3R-SLAM split: the encoder graph (image -> tokens) runs once per frame, the decoder +
heads graph (tokens1, tokens2 -> every per-view output) once per ordered pair. For heads on
demand the decoder is also exported split (manifest format 2, fp32): a geometry graph (both
decoders and geometry heads, plus the token layers the feature heads read) and one feature-head
graph per view, compared with torch output by output like the full graph. Each image size is
its own set of graphs with static shapes, because:

- RoPE tables are built from the patch grid as Python integers, so they are constants in the
  graph (no ``positions.max()``-sized tables, no data-dependent shapes TensorRT would reject);
- the official curope CUDA kernel is not used at all (it cannot be exported);
- no in-place operation is traced (the layers are written without them).

After export every graph is checked with ``onnx.checker`` and inspected for ops with
data-dependent shapes (:func:`check_graph`), then run in ONNX Runtime with the session options the
backend uses (rotary fusions disabled, see :mod:`ros2_sab3r.inference.ort_backend`); every output
is compared with torch against the written-down tolerances of :mod:`ros2_sab3r.inference.parity`
and the figures are printed and written to the manifest. An export that runs but differs fails.

``--int8`` adds a dynamically quantised pair per size for ONNX Runtime on the CPU
(``model.dtype: int8``), made from the checked fp32 graphs by :mod:`ros2_sab3r.inference.int8`
and checked the same way against its own tolerances; with a split decoder its three graphs are
quantised and checked too (heads on demand in int8).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import hashlib
import logging
from pathlib import Path
import sys
import warnings

import torch
from tqdm import tqdm

from ros2_sab3r.inference.common import parse_size
from ros2_sab3r.inference.int8 import (
    INT8_PARITY_TOLERANCES,
    INT8_RECIPE,
    INT8_WEIGHT_TYPES,
    Int8ParityError,
    quantize_int8,
)
from ros2_sab3r.inference.manifest import (
    MANIFEST_NAME,
    ExportError,
    ExportManifest,
    GraphPair,
    SplitGraphs,
    file_sha256,
    graph_files,
)
from ros2_sab3r.inference.parity import (
    PARITY_TOLERANCES,
    ParityFigure,
    example_image,
    parity_check,
    split_parity_check,
)
from ros2_sab3r.model.network import (
    DecoderGraph,
    EncoderGraph,
    FeatureGraph,
    GeometryGraph,
    Sab3rNet,
)
from ros2_sab3r.model.preprocess import check_patch_multiple

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_SIZES = ((384, 512), (288, 512))
# Ops whose output shape depends on data (or that hide control flow): none may appear.
DYNAMIC_OPS = frozenset({'NonZero', 'Unique', 'Loop', 'If', 'Scan', 'Compress', 'Range'})


def weights_sha256(net: Sab3rNet) -> str:
    """Hash of the weights (names, dtypes, shapes, bytes): identifies what was exported."""
    digest = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().to('cpu')
        digest.update(f'{name}|{t.dtype}|{tuple(t.shape)}'.encode())
        # flattened: bytes in logical order whatever the memory format (channels-last heads)
        flat = t.contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def model_code_sha256() -> str:
    """Hash of the network's source files: an export from other model code is another graph
    even with the same weights (recorded in the manifest's versions)."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / 'model').glob('*.py')):
        digest.update(path.name.encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()


def check_graph(path: Path) -> None:
    """onnx.checker, static input/output shapes, no data-dependent-shape ops."""
    import onnx

    onnx.checker.check_model(str(path))  # by path: works for > 2 GB models with external data
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or any(d.dim_value <= 0 for d in dims):
            raise ExportError(f'{path.name}: {value.name} has a non-static shape '
                              f'{[d.dim_param or d.dim_value for d in dims]}')
    ops = {node.op_type for node in model.graph.node}
    bad = sorted(ops & DYNAMIC_OPS)
    if bad:
        raise ExportError(f'{path.name}: ops with data-dependent shapes {bad}; TensorRT would '
                          'reject the graph (are RoPE tables built from tensor values?)')


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: Sequence[str],
            outputs: Sequence[str], opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter: static shapes from the example inputs, constant folding turns
    # the RoPE tables into initialisers, and models over 2 GB get external data automatically.
    # Its deprecation notices and the tracer's "shape read as a Python int" warnings are
    # expected: static shapes are the point of this export (the dynamo exporter needs onnxscript).
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs),
                          do_constant_folding=True, dynamo=False)


def _parity_report(figures, what: str) -> dict:
    """Per output parity figures for the manifest; ExportError naming every output out of
    tolerance when any is."""
    failed = [f for f in figures if not f.ok]
    if failed:
        raise ExportError(f'{what} differs from torch: '
                          + '; '.join(f.line() for f in failed))
    return {f.output: {'max_abs': f.max_abs, 'rel': f.rel, 'tol': f.tol, 'measure': f.measure}
            for f in figures}


def _checked_parity(enc_path: Path, dec_path: Path, net: Sab3rNet, size: tuple[int, int],
                    output_names: Sequence[str], threads: int, precision: str,
                    steps: tqdm) -> dict[str, dict[str, float | str]]:
    """onnx.checker + parity of one graph pair; ExportError when an output is off."""
    h, w = size
    steps.set_postfix_str(f'{h}x{w} {precision} onnx.checker')
    check_graph(enc_path)
    check_graph(dec_path)
    steps.update()
    steps.set_postfix_str(f'{h}x{w} {precision} parity')
    int8 = precision == 'int8'
    figures = parity_check(enc_path, dec_path, net, size, output_names, threads=threads,
                           tolerances=INT8_PARITY_TOLERANCES if int8 else PARITY_TOLERANCES,
                           measure='rms' if int8 else 'max')
    steps.update()
    log.debug('parity ONNX Runtime %s vs torch at %dx%d:\n  %s', precision, h, w,
             '\n  '.join(f.line() for f in figures))
    return _parity_report(figures, f'the {h}x{w} {precision} export runs but')


def _export_split(net: Sab3rNet, out_dir: Path, size: tuple[int, int], tokens: torch.Tensor,
                  enc_path: Path, opset: int, check: bool, threads: int) -> SplitGraphs:
    """The split decoder of one size (format 2): geometry graph + one feature graph per view,
    checked and compared with torch like the full pair."""
    h, w = size
    geo_graph = GeometryGraph(net, size).eval()
    geo_path = out_dir / f'geometry_{h}x{w}.onnx'
    with torch.no_grad():
        _export(geo_graph, (tokens.clone(), tokens.clone()), geo_path, geo_graph.input_names,
                geo_graph.output_names, opset)
        with torch.inference_mode():
            hooks = dict(zip(geo_graph.output_names, geo_graph(tokens, tokens)))
        paths = {}
        for view in (1, 2):
            graph = FeatureGraph(net, size, view).eval()
            paths[view] = out_dir / f'features{view}_{h}x{w}.onnx'
            _export(graph, tuple(hooks[n].clone() for n in graph.input_names), paths[view],
                    graph.input_names, graph.output_names, opset)
    parity = {}
    if check:
        for path in (geo_path, *paths.values()):
            check_graph(path)
        figures = split_parity_check(enc_path, geo_path, paths, net, size, threads=threads)
        parity = _parity_report(figures, f'the {h}x{w} split decoder runs but')
    return SplitGraphs(
        geometry=geo_path.name, geometry_sha256=file_sha256(geo_path),
        features={str(v): p.name for v, p in paths.items()},
        features_sha256={str(v): file_sha256(p) for v, p in paths.items()},
        geometry_outputs=tuple(geo_graph.geometry_names), layers=tuple(geo_graph.layers),
        parity=parity)


def _quantize_split(split: SplitGraphs, out_dir: Path, reduce_range: bool, weights: str
                    ) -> tuple[SplitGraphs, list[Path]]:
    """The int8 copies of a split decoder's graphs (:func:`quantize_int8`) and their files."""
    names = {split.geometry: None, **{f: None for f in split.features.values()}}
    for name in names:
        src = out_dir / name
        names[name] = src.with_name(f'{src.stem}_int8.onnx')
        quantize_int8(src, names[name], reduce_range, weights)
    geo = names[split.geometry]
    feats = {v: names[f] for v, f in split.features.items()}
    return SplitGraphs(
        geometry=geo.name, geometry_sha256=file_sha256(geo),
        features={v: p.name for v, p in feats.items()},
        features_sha256={v: file_sha256(p) for v, p in feats.items()},
        geometry_outputs=split.geometry_outputs, layers=split.layers), list(names.values())


def _check_int8_split(enc: Path, split: SplitGraphs, out_dir: Path, net: Sab3rNet,
                      size: tuple[int, int], threads: int) -> dict:
    """Parity figures of the int8 split decoder against torch (relative RMS, as the int8
    pair); raises ExportError when one is out of tolerance."""
    figures = split_parity_check(enc, out_dir / split.geometry,
                                 {int(v): out_dir / f for v, f in split.features.items()},
                                 net, size, threads=threads, tolerances=INT8_PARITY_TOLERANCES,
                                 measure='rms')
    return _parity_report(figures, f'the {size[0]}x{size[1]} int8 split decoder')


def export_network(net: Sab3rNet, out_dir: str | Path, sizes: Sequence[tuple[int, int]],
                   opset: int = DEFAULT_OPSET, source: str = '', check: bool = True,
                   threads: int = 0, progress: bool = True, int8: bool = False,
                   int8_reduce_range: bool = False, int8_weights: str = 's8'
                   ) -> ExportManifest:
    """Export ``net`` (fp32, CPU) for every size; check and compare; write the manifest.

    With ``int8`` every size also gets a dynamically quantised pair (:func:`quantize_int8`),
    checked against :data:`INT8_PARITY_TOLERANCES`. Raises ExportError when an fp32 graph
    fails a check or an output exceeds its tolerance; the manifest is only written when every
    fp32 graph passed, so a directory with a manifest is good. An int8 pair that fails its
    parity is deleted and left out of the manifest, and :class:`Int8ParityError` (carrying the
    written manifest) is raised at the end.
    """
    import onnx
    import onnxruntime

    if int8 and int8_weights not in INT8_WEIGHT_TYPES:
        raise ExportError(f'int8 weights {int8_weights!r}: expected one of {INT8_WEIGHT_TYPES}')
    if opset < 17:
        raise ExportError(f'opset {opset} < 17: LayerNormalization needs opset 17; use >= 17')
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a half-done export has no manifest
    net = net.float().to('cpu').eval()
    for size in sizes:
        try:
            check_patch_multiple(size, net.cfg.patch_size)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    graphs = []
    int8_failures: list[str] = []
    per_size = ((4 if check else 2) + int(bool(net.cfg.feature_heads))
                + ((3 if check else 1) if int8 else 0))
    steps = tqdm(total=len(sizes) * per_size, desc='sab3r-export', unit='step',
                 disable=not progress, file=sys.stderr)
    for size in sizes:
        h, w = size
        enc_path, dec_path = out_dir / f'encoder_{h}x{w}.onnx', out_dir / f'decoder_{h}x{w}.onnx'
        enc_graph, dec_graph = EncoderGraph(net).eval(), DecoderGraph(net, size).eval()
        img = example_image(size, 0)
        with torch.inference_mode():
            tokens = net.encode(img).tokens
        steps.set_postfix_str(f'{h}x{w} encoder')
        with torch.no_grad():
            _export(enc_graph, (img,), enc_path, enc_graph.input_names, enc_graph.output_names,
                    opset)
        steps.update()
        steps.set_postfix_str(f'{h}x{w} decoder + heads')
        with torch.no_grad():
            _export(dec_graph, (tokens.clone(), tokens.clone()), dec_path, dec_graph.input_names,
                    dec_graph.output_names, opset)
        steps.update()
        names = tuple(dec_graph.output_names)
        parity = (_checked_parity(enc_path, dec_path, net, size, names, threads, 'fp32', steps)
                  if check else {})
        token_shape = tuple(int(s) for s in tokens.shape)
        split = None
        if net.cfg.feature_heads:
            steps.set_postfix_str(f'{h}x{w} split decoder (heads on demand)')
            split = _export_split(net, out_dir, size, tokens, enc_path, opset, check, threads)
            steps.update()
        graphs.append(GraphPair(
            image_size=(h, w), encoder=enc_path.name, decoder=dec_path.name,
            encoder_sha256=file_sha256(enc_path), decoder_sha256=file_sha256(dec_path),
            token_shape=token_shape, output_names=names, parity=parity, split=split))
        if int8:
            steps.set_postfix_str(f'{h}x{w} int8 quantisation')
            q_enc, q_dec = (f.with_name(f'{f.stem}_int8.onnx') for f in (enc_path, dec_path))
            quantize_int8(enc_path, q_enc, int8_reduce_range, int8_weights)
            quantize_int8(dec_path, q_dec, int8_reduce_range, int8_weights)
            q_files = [q_enc, q_dec]
            steps.update()
            try:
                parity = (_checked_parity(q_enc, q_dec, net, size, names, threads, 'int8',
                                          steps) if check else {})
                q_split = None
                if split is not None:  # heads on demand for int8 too (the same quantiser)
                    q_split, q_paths = _quantize_split(split, out_dir, int8_reduce_range,
                                                       int8_weights)
                    q_files += q_paths
                    if check:
                        q_split = dataclasses.replace(q_split, parity=_check_int8_split(
                            q_enc, q_split, out_dir, net, size, threads))
            except ExportError as exc:
                # The fp32 pair is good: keep it (an export takes minutes) and drop only the
                # quantised files, then report after the manifest is written.
                for q in q_files:
                    for f in graph_files(q):
                        f.unlink(missing_ok=True)
                int8_failures.append(str(exc))
                continue
            graphs.append(GraphPair(
                image_size=(h, w), encoder=q_enc.name, decoder=q_dec.name,
                encoder_sha256=file_sha256(q_enc), decoder_sha256=file_sha256(q_dec),
                token_shape=token_shape, output_names=names, parity=parity, precision='int8',
                split=q_split,
                quantization=INT8_RECIPE + (' (7-bit weights)' if int8_reduce_range else '')
                + (' (uint8 weights)' if int8_weights == 'u8' else '')))
    steps.close()
    manifest = ExportManifest(
        config_name=net.cfg.name, network_config=net.cfg.to_dict(), opset=opset,
        weights_sha256=weights_sha256(net), source=source, graphs=tuple(graphs),
        versions={'torch': torch.__version__, 'onnx': onnx.__version__,
                  'onnxruntime': onnxruntime.__version__, 'model_code': model_code_sha256()})
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json(), encoding='utf-8')
    if int8_failures:
        raise Int8ParityError(
            'the fp32 graphs passed and were written, but int8 quantisation moved outputs too '
            'far from torch, so its graphs were not kept (use model.dtype fp32 with this '
            'export; on an x86 CPU without VNNI, 8-bit products saturate: export again with '
            '--int8-weights u8): ' + ' | '.join(int8_failures), manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='sab3r-export',
        description='Export the network as ONNX graphs (encoder; decoder + heads) per static '
                    'image size, check them and compare every output with torch.')
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', help='official .pth, ros2_sab3r .safetensors, a directory '
                                          'or a Hugging Face repo id')
    src.add_argument('--random-weights', metavar='CONFIG',
                     help='export a randomly initialised network of this architecture (tests, '
                          'benchmarks), e.g. tiny_cd or sab3r_cd')
    parser.add_argument('--config', default=None,
                        help='architecture name or JSON overriding the stored one')
    parser.add_argument('--out', required=True, help='export directory (manifest.json + .onnx)')
    parser.add_argument('--size', action='append', metavar='HxW',
                        help='static image size, repeatable (default: 384x512 and 288x512)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET)
    parser.add_argument('--seed', type=int, default=0, help='seed of --random-weights')
    parser.add_argument('--no-check', action='store_true',
                        help='skip onnx.checker and the parity check (not recommended)')
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0: default)')
    parser.add_argument('--trusted', action='store_true',
                        help='allow full unpickling of a .pth you trust (can run code)')
    parser.add_argument('--int8', action='store_true',
                        help='also write dynamically quantised graphs for ONNX Runtime on the CPU '
                             '(model.dtype int8; int8 matmul weights, convolutions fp32), '
                             'checked against looser tolerances')
    parser.add_argument('--int8-reduce-range', action='store_true',
                        help='with --int8: 7-bit weights, for x86 CPUs without VNNI '
                             '(avoids saturating 8-bit products there)')
    parser.add_argument('--int8-weights', choices=INT8_WEIGHT_TYPES, default='s8',
                        help='with --int8: signed weights (s8, fastest) or unsigned (u8: no '
                             'saturation on x86 CPUs without VNNI, at full 8-bit precision)')
    args = parser.parse_args(argv)
    if args.int8_reduce_range and not args.int8:
        parser.error('--int8-reduce-range needs --int8')
    if args.int8_weights != 's8' and not args.int8:
        parser.error('--int8-weights needs --int8')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        sizes = [parse_size(s) for s in (args.size or [])] or list(DEFAULT_SIZES)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    from ros2_sab3r.model.checkpoint import CheckpointError, load_network
    from ros2_sab3r.model.network import create_network

    try:
        if args.random_weights:
            torch.manual_seed(args.seed)
            net = create_network(args.random_weights)
            source = f'random weights {args.random_weights} (seed {args.seed})'
        else:
            net = load_network(args.checkpoint, config=args.config, trusted=args.trusted)
            source = args.checkpoint
        manifest = export_network(net, args.out, sizes, args.opset, source,
                                  check=not args.no_check, threads=args.threads,
                                  int8=args.int8, int8_reduce_range=args.int8_reduce_range,
                                  int8_weights=args.int8_weights)
        failure = None
    except Int8ParityError as exc:
        manifest, failure = exc.manifest, exc
    except (CheckpointError, ExportError) as exc:
        print(f'sab3r-export: {exc}', file=sys.stderr)
        return 2
    for g in manifest.graphs:
        print(f'{g.image_size[0]}x{g.image_size[1]} {g.precision}: {g.encoder}, {g.decoder}')
        for name, fig in g.parity.items():
            print('  ' + ParityFigure(name, fig['max_abs'], fig['rel'], fig['tol'],
                                      fig.get('measure', 'max')).line())
    print(f'wrote {Path(args.out) / MANIFEST_NAME} ({manifest.config_name}, opset '
          f'{manifest.opset})')
    if failure is not None:
        print(f'sab3r-export: {failure}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
