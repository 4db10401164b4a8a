"""The two export graphs (encoder; decoder + heads) trace to ONNX opset 17 and match torch."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ros2_sab3r.model.network import DecoderGraph, EncoderGraph
from ros2_sab3r.model.outputs import DECODER_INPUTS, ENCODER_INPUT
from tests.model.helpers import random_images

pytestmark = [pytest.mark.model, pytest.mark.export]


def _export(module: torch.nn.Module, args: tuple) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, opset_version=17, input_names=list(module.input_names),
                      output_names=list(module.output_names), dynamo=False)
    return buf.getvalue()


def test_encoder_and_decoder_graphs_match_torch(tiny_cd_net):
    img1, img2 = random_images(1, 48, 80, 30), random_images(1, 48, 80, 31)  # 3x5 tokens
    enc = EncoderGraph(tiny_cd_net).eval()
    dec = DecoderGraph(tiny_cd_net, (48, 80)).eval()
    with torch.no_grad():
        tok1, tok2 = enc(img1), enc(img2)
        ref = dec(tok1, tok2)
        enc_onnx = _export(enc, (img1,))
        dec_onnx = _export(dec, (tok1, tok2))
    enc_sess = ort.InferenceSession(enc_onnx, providers=['CPUExecutionProvider'])
    dec_sess = ort.InferenceSession(dec_onnx, providers=['CPUExecutionProvider'])
    t1 = enc_sess.run(None, {ENCODER_INPUT: img1.numpy()})[0]
    t2 = enc_sess.run(None, {ENCODER_INPUT: img2.numpy()})[0]
    np.testing.assert_allclose(t1, tok1.numpy(), rtol=1e-4, atol=1e-5)
    outs = dec_sess.run(None, dict(zip(DECODER_INPUTS, (t1, t2))))
    assert len(outs) == len(dec.output_names)
    for name, got, want in zip(dec.output_names, outs, ref):
        scale = float(want.abs().max()) + 1e-6
        err = float(np.abs(got - want.numpy()).max()) / scale
        assert err < 1e-4, f'{name}: max error {err:.2e} of the output range'
