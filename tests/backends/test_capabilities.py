"""Every fact in the onnxruntime capability table, checked against the installed onnxruntime.

When onnxruntime changes (gains a FLOAT4E2M1 DequantizeLinear, fixes the FP8 QDQ MatMul fusion),
the matching test turns red and the table (and the lowering that relies on it) must follow.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
from qcompile import codec
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.formats import FORMATS, BlockFormat

D_TO_FORMAT = {f.onnx_dtype: f for f in FORMATS.values() if not isinstance(f, BlockFormat) and f.onnx_dtype is not None}


def _model(nodes, inputs, outputs, inits=(), opset=21, ir_version=10):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=ir_version)


def _qdq_model(tp: int, opset: int, per_axis: bool = False):
    shape = [4, 8]
    scale = np.full(4, 0.25, np.float32) if per_axis else np.array(0.25, np.float32)
    zp = h.make_tensor("zp", tp, [4] if per_axis else [], [0] * (4 if per_axis else 1))
    attrs = {"axis": 0} if per_axis else {}
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, shape)], [h.make_tensor_value_info("y", T.FLOAT, shape)],
                  [nh.from_array(scale, "s"), zp], opset=opset, ir_version=10 if opset >= 21 else 9)


X = np.linspace(-3.0, 3.0, 32, dtype=np.float32).reshape(4, 8)


@pytest.mark.parametrize("dtype", list(CAPABILITIES.qdq_min_opset), ids=lambda d: d.name)
def test_qdq_runs_at_its_min_opset(dtype):
    opset = CAPABILITIES.min_opset(dtype)
    fmt = D_TO_FORMAT[dtype]
    for per_axis in (False, True):
        y = helpers.run(_qdq_model(int(dtype), opset, per_axis), {"x": X}, "all")[0]
        # the values are the format's grid: Q/DQ really ran (saturating, round-half-even)
        expected = codec.round_to_grid(X / np.float32(0.25), fmt) * np.float32(0.25)
        np.testing.assert_array_equal(y, expected, err_msg=f"{dtype.name} at opset {opset}")
    assert CAPABILITIES.qdq_native(dtype) and CAPABILITIES.qdq_native(dtype, opset)
    assert not CAPABILITIES.qdq_native(dtype, opset - 1)


@pytest.mark.parametrize("dtype", [d for d, o in CAPABILITIES.qdq_min_opset.items() if o > 13], ids=lambda d: d.name)
def test_qdq_min_opset_is_tight(dtype):
    # one opset earlier the type is not allowed: the table is not merely conservative
    with pytest.raises(Exception, match="Type Error|type"):
        helpers.session(_qdq_model(int(dtype), CAPABILITIES.min_opset(dtype) - 1), "disable")


@pytest.mark.xfail(strict=True, raises=ort.capi.onnxruntime_pybind11_state.NotImplemented,
                   reason="onnxruntime has no FLOAT4E2M1 DequantizeLinear kernel (fact: e2m1 is not in qdq_min_opset)")
def test_float4e2m1_dequantize_linear():
    assert onnx.TensorProto.FLOAT4E2M1 not in [int(d) for d in CAPABILITIES.qdq_min_opset]
    codes = h.make_tensor("c", T.FLOAT4E2M1, [4], [0.5, 1.0, -2.0, 6.0])
    m = _model([h.make_node("DequantizeLinear", ["c", "s"], ["y"])], [], [h.make_tensor_value_info("y", T.FLOAT, [4])],
               [codes, nh.from_array(np.array(2.0, np.float32), "s")], opset=23, ir_version=11)
    onnx.checker.check_model(m)
    np.testing.assert_array_equal(helpers.run(m, {}, "disable")[0], [1.0, 2.0, -4.0, 12.0])


def _qdq_matmul(tp: int):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    if tp in (T.INT8, T.UINT8):
        np_t = np.int8 if tp == T.INT8 else np.uint8
        off = 0 if tp == T.INT8 else 128
        wq = nh.from_array(np.clip(np.rint(w / 0.03), -127, 127).astype(np.int8), "wq")
        zp = nh.from_array(np.array(off, np_t), "xzp")
        wzp = [nh.from_array(np.zeros(16, np.int8), "wzp")]
    else:
        wq = h.make_tensor("wq", tp, [32, 16], (w / 0.03).ravel().tolist())
        zp = h.make_tensor("xzp", tp, [], [0.0])
        wzp = []
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws"] + (["wzp"] if wzp else []), ["wd"], axis=1),
             h.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [wq, nh.from_array(np.full(16, 0.03, np.float32), "ws"), nh.from_array(np.array(0.05, np.float32), "xs"), zp, *wzp]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])], inits)


@pytest.mark.parametrize("dtype", sorted(CAPABILITIES.activation_qdq_unsafe), ids=lambda d: d.name)
def test_fp8_qdq_matmul_fails_to_load_at_enable_all(dtype):
    # The fact behind `activation_qdq_unsafe` (and LowerForOnnxruntimePass): onnxruntime fuses the
    # float8 Q/DQ MatMul into MatMulIntegerToFloat, which has no float8 kernel. Red the day it loads.
    m = _qdq_matmul(int(dtype))
    helpers.session(m, "basic")  # fine without the QDQ fusions
    for level in ("extended", "all"):
        with pytest.raises(Exception, match="MatMulIntegerToFloat"):
            helpers.session(m, level)


@pytest.mark.parametrize("dtype", [T.FLOAT8E4M3FN, T.FLOAT8E5M2])
def test_relu_quant_fusion_drops_relu_before_fp8_quantizer(dtype):
    # The second fact behind `activation_qdq_unsafe`: ReluQuantFusion treats a float8 zero point 0
    # like int8's qmin and removes the Relu, so negative values survive at ENABLE_ALL.
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [4, 8])], [h.make_tensor_value_info("y", T.FLOAT, [4, 8])],
               [nh.from_array(np.array(0.05, np.float32), "s"), h.make_tensor("zp", dtype, [], [0.0])])
    assert helpers.run(m, {"x": X}, "disable")[0].min() == 0.0
    assert helpers.run(m, {"x": X}, "all")[0].min() < 0.0


@pytest.mark.parametrize("dtype", sorted(CAPABILITIES.integer_fusion), ids=lambda d: d.name)
def test_integer_qdq_matmul_fuses(tmp_path, dtype):
    opt = helpers.optimized(_qdq_matmul(int(dtype)), tmp_path / "opt.onnx")
    ops = helpers.op_counts(opt)
    assert ops["MatMul"] == 0 and ops["DequantizeLinear"] == 0, ops
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 1, ops


def test_integer_qdq_conv_fuses(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0), h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]),
             h.make_node("QuantizeLinear", ["r", "ys", "yzp"], ["yq"]), h.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"])]
    inits = [nh.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "wq"), nh.from_array(np.full(4, 0.01, np.float32), "ws"),
             nh.from_array(np.zeros(4, np.int8), "wzp"), nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(0, np.int8), "xzp"),
             nh.from_array(np.array(0.05, np.float32), "ys"), nh.from_array(np.array(-128, np.int8), "yzp")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])], inits)
    ops = helpers.op_counts(helpers.optimized(m, tmp_path / "opt.onnx"))
    # Relu folds because the output zero point is qmin (-128)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 0 and ops["Relu"] == 0, ops


@pytest.mark.parametrize("dtype", sorted(CAPABILITIES.matmulnbits_types), ids=lambda d: d.name)
def test_blocked_weight_only_matmul_becomes_matmulnbits(tmp_path, dtype):
    rng = np.random.default_rng(0)
    lo, hi = (-8, 8) if dtype.name == "INT4" else (0, 16)
    wq = h.make_tensor("wq", int(dtype), [64, 16], rng.integers(lo, hi, 64 * 16).tolist())
    nodes = [h.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0, block_size=32), h.make_node("MatMul", ["x", "wd"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
               [wq, nh.from_array(np.full((2, 16), 0.01, np.float32), "ws")])
    assert helpers.op_counts(helpers.optimized(m, tmp_path / "opt.onnx")) == {"MatMulNBits": 1}


@pytest.mark.parametrize("dtype", sorted(CAPABILITIES.shape_op_qdq_drop), ids=lambda d: d.name)
def test_same_scale_qdq_around_transpose_is_dropped(tmp_path, dtype):
    np_t = np.int8 if dtype.name == "INT8" else np.uint8
    zp = nh.from_array(np.array(0 if np_t is np.int8 else 128, np_t), "zp")
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q1"]), h.make_node("DequantizeLinear", ["q1", "s", "zp"], ["d1"]),
             h.make_node("Transpose", ["d1"], ["t"], perm=[1, 0]),
             h.make_node("QuantizeLinear", ["t", "s", "zp"], ["q2"]), h.make_node("DequantizeLinear", ["q2", "s", "zp"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [4, 8])], [h.make_tensor_value_info("y", T.FLOAT, [8, 4])],
               [nh.from_array(np.array(0.05, np.float32), "s"), zp])
    ops = helpers.op_counts(helpers.optimized(m, tmp_path / "opt.onnx"))
    assert ops == {"QuantizeLinear": 1, "Transpose": 1, "DequantizeLinear": 1}, "the Transpose runs on integers"


def test_ir_version_and_opset_limits():
    relu = [h.make_node("Relu", ["x"], ["y"])]
    io = ([h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    helpers.session(_model(relu, *io, opset=CAPABILITIES.max_opset, ir_version=CAPABILITIES.max_ir_version))
    with pytest.raises(Exception, match="IR version|ir_version|Unsupported model IR version"):
        helpers.session(_model(relu, *io, opset=CAPABILITIES.max_opset, ir_version=CAPABILITIES.max_ir_version + 1))
    with pytest.raises(Exception, match="opset|Opset"):
        helpers.session(_model(relu, *io, opset=CAPABILITIES.max_opset + 1, ir_version=CAPABILITIES.max_ir_version))
