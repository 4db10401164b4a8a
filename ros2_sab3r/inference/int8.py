"""``sab3r-export --int8``: dynamically quantised graphs for ONNX Runtime on the CPU.

Made from the checked fp32 graphs with onnxruntime's own quantiser (:data:`INT8_RECIPE`) and
checked against torch like them (:func:`ros2_sab3r.inference.parity.parity_check`, relative RMS
error) within :data:`INT8_PARITY_TOLERANCES`; loaded by the ONNX Runtime backend with
``model.dtype: int8``.
"""

from __future__ import annotations

import logging
from pathlib import Path
import shutil

from ros2_sab3r.inference.manifest import ExportError, ExportManifest, graph_files
from ros2_sab3r.model.outputs import ENCODER_OUTPUT, FEATURE_FIELDS, GEOMETRY_FIELDS

# The int8 graphs: relative RMS error per output (see parity.compare()).
# Measured on random-weight networks, worst output: tiny/tiny_cd at 32x48..48x64 3.1% (dino),
# tokens 2.0%, desc 2.6%, pts3d 0.6%; sab3r_cd at 384x512 2.5% (desc), tokens 2.0%, pts3d 1.0%,
# clip/dino 1.2%. Random weights say how much the quantiser perturbs the network, not what that
# does to a trained model's accuracy: evaluate int8 with sab3r-eval on real weights first.
INT8_PARITY_TOLERANCES: dict[str, float] = dict.fromkeys(
    (ENCODER_OUTPUT, *GEOMETRY_FIELDS, *FEATURE_FIELDS), 5e-2)
INT8_RECIPE = ('dynamic int8 (onnxruntime.quantization.quantize_dynamic): matmuls with constant '
               'weights use int8 weights per output channel and uint8 activations quantised per '
               'run; attention (activation x activation) and all convolutions stay fp32')


class Int8ParityError(ExportError):
    """The fp32 export is complete (``manifest``), but an int8 pair failed its parity check."""

    def __init__(self, message: str, manifest: ExportManifest) -> None:
        super().__init__(message)
        self.manifest = manifest


class _QuietRoot(logging.Filter):
    """onnxruntime's quantiser logs advice on the root logger ('consider pre-processing');
    the export runs its own checks, so those lines are dropped while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


INT8_WEIGHT_TYPES = ('s8', 'u8')


def quantize_int8(src: Path, dst: Path, reduce_range: bool = False, weights: str = 's8') -> None:
    """Write the dynamically quantised copy of graph ``src`` to ``dst`` (:data:`INT8_RECIPE`).

    Convolutions are left in fp32 on purpose: ONNX Runtime runs dynamically quantised
    convolutions (ConvInteger) about 4x slower than its fp32 ones (measured on the sab3r_cd
    heads), while its integer matmuls are about 3x faster than fp32 ones. ``reduce_range``
    quantises weights to 7 bits, for x86 CPUs without VNNI where 8-bit products can saturate.
    ``weights='u8'`` stores unsigned weights instead (onnxruntime's U8U8 kernels, which do not
    saturate on any CPU): on an AVX2-only CPU it kept the tiny test map closer to fp32 than 7-bit
    weights (median voxel shift 0.9 mm against 1.5 mm), at full 8-bit precision.
    """
    if weights not in INT8_WEIGHT_TYPES:
        raise ExportError(f'int8 weights {weights!r}: expected one of {INT8_WEIGHT_TYPES}')
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for stale in graph_files(dst):
        stale.unlink(missing_ok=True)
    quiet = _QuietRoot()
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=['MatMul'], per_channel=True,
                         reduce_range=reduce_range,
                         weight_type=QuantType.QInt8 if weights == 's8' else QuantType.QUInt8,
                         use_external_data_format=True,
                         extra_options={'MatMulConstBOnly': True})
    except Exception as exc:  # noqa: BLE001 - the quantiser raises many types
        raise ExportError(f'quantising {src.name} to int8 failed ({type(exc).__name__}: {exc})'
                          ) from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    # The quantiser writes its external data through a private temporary file (mode 0600):
    # give both files the fp32 graph's mode, so a node running as another user can read them.
    for path in graph_files(dst):
        if path.exists():
            shutil.copymode(src, path)
