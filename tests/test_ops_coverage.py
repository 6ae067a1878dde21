"""Quantizable ops beyond the tiny models: ConvTranspose (weight channel axis 1) feeding a Conv."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qcompile
from qcompile.backends.onnxruntime.session import make_session


def _deconv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2]),
        h.make_node("Relu", ["y"], ["z"], name="relu"),
        h.make_node("Conv", ["z", "k"], ["o"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        nh.from_array((rng.standard_normal((4, 6, 3, 3)) / 6).astype(np.float32), "w"),
        nh.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "b"),
        nh.from_array((rng.standard_normal((3, 6, 3, 3)) / 7).astype(np.float32), "k"),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 8, 8])],
                     [h.make_tensor_value_info("o", T.FLOAT, ["N", 3, 17, 17])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


# Floors: measured 38.3 (int8), 26.4 (fp8) dB and w8 above them; 3 dB below for seed noise. FP8
# E4M3 is bounded by its 3 mantissa bits (~31 dB per tensor).
@pytest.mark.parametrize("target, floor", [("int8", 35.0), ("fp8", 23.0), ("w8", 35.0)])
def test_convtranspose_quantized_per_output_channel(target, floor):
    m = _deconv_model()
    rng = np.random.default_rng(1)
    r = qcompile.compile(m, target, calib={"x": rng.standard_normal((128, 4, 8, 8)).astype(np.float32)})
    rows = {row["node"]: row for row in r.report["layers"]}
    assert rows["deconv"]["weight_granularity"] == "channel(axis=1)", "ConvTranspose W is [Cin, Cout/g, k, k]"
    assert rows["conv"]["weight_granularity"] == "channel(axis=0)"
    assert r.report["outputs"]["o"]["sqnr_db"] >= floor
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert np.isfinite(make_session(r.model, level="all").run(None, {"x": x})[0]).all()


def test_w4_leaves_convolutions_in_float():
    """w4 quantizes MatMul/Gemm only (4-bit conv kernels break CNNs): a conv-only model has nothing to do."""
    rng = np.random.default_rng(1)
    with pytest.raises(qcompile.UnsupportedModelError, match="nothing to quantize for target w4"):
        qcompile.compile(_deconv_model(), "w4", calib={"x": rng.standard_normal((16, 4, 8, 8)).astype(np.float32)})
