"""Golden-output regression of the tiny network: torch and the ONNX Runtime export against the
values stored in data/golden_tiny.npz (see tests/model/golden.py for what is stored, the
tolerance and how to rewrite the file after an intended change)."""

from __future__ import annotations

import pytest

from ros2_sab3r.inference.export import export_network
from ros2_sab3r.inference.ort_backend import OnnxRuntimeBackend, OrtOptions
from ros2_sab3r.model.outputs import ENCODER_OUTPUT
from tests.model import golden

pytestmark = [pytest.mark.model, pytest.mark.export]


@pytest.fixture(scope='module')
def stored():
    return golden.read_golden()


@pytest.fixture(scope='module')
def net():
    return golden.golden_network()


def test_stored_file_is_small_and_float32(stored):
    assert golden.GOLDEN.stat().st_size < 16_000
    assert stored and all(v.dtype == 'float32' for v in stored.values())


def test_torch_forward_matches_the_stored_outputs(net, stored):
    got = golden.summarise(golden.torch_outputs(net))
    assert not golden.mismatches(got, stored)


def test_onnxruntime_export_matches_the_stored_outputs(net, stored, tmp_path):
    export_network(net, tmp_path, [golden.SIZE], check=False, progress=False)
    backend = OnnxRuntimeBackend(tmp_path, golden.SIZE, OrtOptions(threads=2))
    img1, img2 = (img.numpy() for img in golden.golden_images())
    t1, t2 = backend.encode_array(img1), backend.encode_array(img2)
    got = golden.summarise({ENCODER_OUTPUT: t1, **backend.decode_arrays(t1, t2)})
    assert not golden.mismatches(got, stored)


def test_a_changed_output_is_caught(net, stored):
    named = golden.torch_outputs(net)
    named['conf_2'] = named['conf_2'] * (1 + 2 * golden.TOLERANCE)
    problems = golden.mismatches(golden.summarise(named), stored)
    assert [p.split(': ')[0] for p in problems] == ['conf_2:mean', 'conf_2:sample'], problems
