"""InsertQDQPass: Q/DQ pairs for every value a (calibrated) plan quantizes.

Numerics are checked in onnxruntime at DISABLE_ALL, i.e. the ONNX Q/DQ semantics: the pass output
for float8 is not yet lowered (tests/backends/test_lowering.py covers ENABLE_ALL). Floors are
per-format output SQNR against the float graph on these seeded models, a few dB under the values
measured when the test was written (in brackets in FLOORS), so a wrong scale, axis or zero point
(which costs 10+ dB) fails while a new seed does not.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import tiny_models
from qcompile import codec
from qcompile.analyze import make_plan
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.data import ArrayDataset, InputInfo
from qcompile.errors import QCompileError
from qcompile.formats import parse_format
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.insert_qdq import InsertQDQPass, layer_records
from qcompile.passes.normalize import NormalizePass
from qcompile.pipeline import calibrate_plan
from qcompile.plan import InputQuant, NodePlan, PerBlock, PerChannel, PerTensor, QuantPlan, QuantSpec
from qcompile.targets import get_target

D = ir.DataType

# target -> SQNR floor (dB) of the Q/DQ model against float, MLP / CNN / attention
FLOORS = {
    "int8": 35.0,      # 8-bit activations + per-channel weights, no SmoothQuant at this level [39.3 / 41.4 / 41.2]
    "a16w8": 38.0,     # int16 activations add ~nothing: per-channel int8 weights alone [42.5 / 43.7 / 48.7]
    "w8": 38.0,        # weight-only int8, float activations [42.5 / 43.7 / 49.1]
    "w4": 15.0,        # 4-bit weights: ~24 dB less than int8 [18.9 / 16.4 / 24.8]
    "fp8": 24.0,       # E4M3: 3 mantissa bits, ~31 dB per tensor, compounded over 2-6 layers [25.4 / 26.2 / 31.1]
    "fp8-e5m2": 18.0,  # E5M2: one mantissa bit fewer, ~6 dB under E4M3 [20.8 / 19.6 / 25.0]
}
MODELS = ["mlp", "cnn", "attention"]


def _prepared(name: str, opset: int = 21) -> tuple[ir.Model, dict]:
    proto = getattr(tiny_models, name)()
    m = ir.from_proto(proto)
    NormalizePass(opset, 26)(m)
    FoldBatchNormPass()(m)
    return m, proto


def _calibrated_plan(model: ir.Model, proto, target: str) -> QuantPlan:
    plan = make_plan(model, get_target(target))
    data = ArrayDataset(tiny_models.inputs_for(proto, 64, seed=1), InputInfo.of_model(model))
    return calibrate_plan(model, plan, data)


def _eval(proto):
    return tiny_models.inputs_for(proto, 32, seed=2)


def _producer(v: ir.Value) -> ir.Node | None:
    return v.producer() if v is not None else None


# --- structure ---------------------------------------------------------------------------------
def test_structure_int8_mlp():
    model, proto = _prepared("mlp")
    plan = _calibrated_plan(model, proto, "int8")
    before = {n.name: [i.name for i in n.inputs] for n in model.graph}
    p = InsertQDQPass(plan, CAPABILITIES)
    helpers.assert_pass_contract(p, model, expect_modified=True)

    fc1, fc2 = helpers.node_by_name(model, "fc1"), helpers.node_by_name(model, "fc2")
    # activation: x -> Q -> DQ -> fc1, 8-bit affine (stored as uint8) with the plan's clip
    dq = _producer(fc1.inputs[0])
    q = _producer(dq.inputs[0])
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
    assert q.inputs[0].name == "x" and q.outputs[0].dtype == D.UINT8
    lo, hi = plan.nodes["fc1"].inputs[0].spec.clip
    sx = float(q.inputs[1].const_value.numpy())
    assert sx == pytest.approx((hi - min(lo, 0.0)) / 255, rel=1e-6)
    # weight: int8 codes stored as an initializer, per output column (axis 1), no float copy left
    wdq = _producer(fc1.inputs[1])
    assert wdq.op_type == "DequantizeLinear" and wdq.attributes["axis"].as_int() == 1
    codes = wdq.inputs[0]
    assert codes.const_value.dtype == D.INT8 and codes.name in model.graph.initializers
    assert tuple(codes.shape) == (64, 128) and wdq.inputs[1].const_value.numpy().shape == (128,)
    # Gemm bias: int32 codes with scale s_x * s_w (what QGemm expects)
    bdq = _producer(fc2.inputs[2])
    assert bdq.inputs[0].const_value.dtype == D.INT32
    sx2 = float(_producer(_producer(fc2.inputs[0]).inputs[0]).inputs[1].const_value.numpy())
    sw2 = _producer(fc2.inputs[1]).inputs[1].const_value.numpy()
    np.testing.assert_allclose(bdq.inputs[1].const_value.numpy(), np.float32(sx2) * sw2, rtol=1e-6)
    # only that: the Add and Relu read what they read before, float weights are gone
    for name in ("fc1_bias", "relu1"):
        assert [i.name for i in helpers.node_by_name(model, name).inputs] == before[name]
    assert {"w1", "w2", "b2"}.isdisjoint(model.graph.initializers) and "b1" in model.graph.initializers
    ops = helpers.op_counts(model)
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (2, 5)
    records = layer_records(model.graph)  # written on the quantized nodes, not kept by the pass
    assert [(r.node, r.value, r.format) for r in records] == [("fc1", "w1", "int8"), ("fc2", "w2", "int8")]


def test_structure_int8_mlp_matches_numpy_simulation():
    # The ONNX Q/DQ semantics, rebuilt from the plan with qcompile.codec: same output within 1e-5.
    model, proto = _prepared("mlp")
    plan = _calibrated_plan(model, proto, "int8")
    InsertQDQPass(plan, CAPABILITIES)(model)
    W = {i.name: nh.to_array(i) for i in proto.graph.initializer}
    i8 = parse_format("int8")

    def act(x, value_plan):
        lo, hi = value_plan.spec.clip
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = np.float32((hi - lo) / 255)
        zp = np.clip(np.round(-128 - lo / s), -128, 127)
        return codec.dequantize_int(codec.quantize_int(x, s, zp, i8), s, zp), s

    def weight(w, axis):
        other = tuple(i for i in range(w.ndim) if i != axis)
        s = (np.abs(w).max(axis=other) / 127).astype(np.float32)
        return codec.dequantize_int(codec.quantize_int(w, s, 0, i8, axis=axis), s, 0, axis=axis), s

    x = _eval(proto)["x"]
    xq, _ = act(x, plan.nodes["fc1"].inputs[0])
    h2 = np.maximum(xq @ weight(W["w1"], 1)[0] + W["b1"], 0)
    hq, sh = act(h2, plan.nodes["fc2"].inputs[0])
    w2, sw2 = weight(W["w2"], 0)
    bscale = (sh * sw2).astype(np.float32)
    b2 = np.rint(W["b2"] / bscale) * bscale
    ref = hq @ w2.T + b2
    got = helpers.run(model, {"x": x}, "disable")[0]
    # 1e-5 per sample, up to one sample with an int8 rounding flip (an h2 value within float32
    # noise of a rounding midpoint moves one code by one step: ~1e-3 of that sample)
    helpers.assert_close_up_to_flips(got, ref, rtol=1e-5, max_flipped=1, flip_bound=1e-2, what="int8 mlp vs numpy")


def test_other_consumers_keep_the_float_value():
    # y = MatMul(x, W) + x: the residual Add must read float x, only the MatMul reads DQ(Q(x))
    rng = np.random.default_rng(0)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y0"], name="mm"), h.make_node("Add", ["y0", "x"], ["y"], name="residual")], "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [nh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")],
    )
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    model = ir.from_proto(proto)
    plan = _calibrated_plan(model, proto, "int8")
    helpers.assert_pass_contract(InsertQDQPass(plan, CAPABILITIES), model, expect_modified=True)
    add = helpers.node_by_name(model, "residual")
    assert add.inputs[1].name == "x" and add.inputs[1] in model.graph.inputs
    assert helpers.producer_op(helpers.node_by_name(model, "mm").inputs[0]) == "DequantizeLinear"


def test_conv_output_is_quantized_after_relu_for_every_consumer():
    model, proto = _prepared("cnn")
    plan = _calibrated_plan(model, proto, "int8")
    InsertQDQPass(plan, CAPABILITIES)(model)
    relu1 = helpers.node_by_name(model, "relu1")
    (q,) = [u.node for u in relu1.outputs[0].uses()]
    assert q.op_type == "QuantizeLinear", "the Relu output's only reader is its QuantizeLinear"
    pool = helpers.node_by_name(model, "pool1")
    assert _producer(pool.inputs[0]).inputs[0] is q.outputs[0], "MaxPool reads DQ(Q(relu))"
    # the same scale on both sides of the MaxPool, so onnxruntime can run it on int8
    after = _producer(_producer(helpers.node_by_name(model, "conv2").inputs[0]).inputs[0])
    assert after.inputs[0] is pool.outputs[0]
    np.testing.assert_array_equal(after.inputs[1].const_value.numpy(), q.inputs[1].const_value.numpy())
    np.testing.assert_array_equal(after.inputs[2].const_value.numpy(), q.inputs[2].const_value.numpy())
    assert int(q.inputs[2].const_value.numpy()) == 0, "post-Relu range: zero point at qmin (Relu folds)"


# --- numerics against the float graph ----------------------------------------------------------
@pytest.mark.parametrize("target", list(FLOORS))
@pytest.mark.parametrize("name", MODELS)
def test_sqnr_against_float(name, target):
    model, proto = _prepared(name)
    plan = _calibrated_plan(model, proto, target)
    InsertQDQPass(plan, CAPABILITIES)(model)
    helpers.check_model(model)
    feeds = _eval(proto)
    ref = helpers.run(proto, feeds, "disable")[0]
    got = helpers.run(model, feeds, "disable")[0]
    s = helpers.sqnr_db(ref, got)
    assert s >= FLOORS[target], f"{name}/{target}: {s:.2f} dB < {FLOORS[target]} dB"


# --- negative cases ----------------------------------------------------------------------------
def _shared_weight_model(third_consumer: bool):
    rng = np.random.default_rng(1)
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="mm1"), h.make_node("MatMul", ["x2", "w"], ["b"], name="mm2")]
    outs = ["a", "b"]
    if third_consumer:
        nodes.append(h.make_node("MatMul", ["x", "w"], ["c"], name="mm3"))
        outs.append("c")
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, ["N", 16]) for n in ("x", "x2")],
                     [h.make_tensor_value_info(o, T.FLOAT, ["N", 8]) for o in outs],
                     [nh.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _weight_plan(nodes, fmt="int8"):
    return QuantPlan("w8", {n: NodePlan("MatMul", {1: InputQuant("w", "weight", QuantSpec(fmt, PerChannel(1)))}) for n in nodes})


def test_shared_weight_is_quantized_once():
    model = ir.from_proto(_shared_weight_model(third_consumer=False))
    helpers.assert_pass_contract(InsertQDQPass(_weight_plan(["mm1", "mm2"]), CAPABILITIES), model, expect_modified=True)
    dq1 = _producer(helpers.node_by_name(model, "mm1").inputs[1])
    assert dq1 is _producer(helpers.node_by_name(model, "mm2").inputs[1]), "one DQ, one set of codes"
    assert "w" not in model.graph.initializers
    # weight-only int8: packed codes behind qcompile.DequantizeMinifloat (for the MatMulNBits lowering)
    codes = [v for v in model.graph.initializers.values() if v.const_value.dtype == D.UINT8 and tuple(v.shape) == (16 * 8,)]
    assert codes == [dq1.inputs[0]]


def test_shared_weight_keeps_float_copy_for_unplanned_consumer():
    proto = _shared_weight_model(third_consumer=True)
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(InsertQDQPass(_weight_plan(["mm1", "mm2"]), CAPABILITIES), model, expect_modified=True)
    mm3 = helpers.node_by_name(model, "mm3")
    assert mm3.inputs[1].name == "w" and mm3.inputs[1].const_value is not None
    np.testing.assert_array_equal(mm3.inputs[1].const_value.numpy(), nh.to_array(proto.graph.initializer[0]))
    feeds = {"x": np.ones((2, 16), np.float32), "x2": np.ones((2, 16), np.float32)}
    np.testing.assert_array_equal(helpers.run(model, feeds)[2], helpers.run(proto, feeds)[2])  # mm3 stays float


def test_non_constant_inputs_are_activations():
    g = h.make_graph([h.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("a", T.FLOAT, ["N", 8, 16]), h.make_tensor_value_info("b", T.FLOAT, ["N", 16, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 4])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    model = ir.from_proto(proto)
    plan = _calibrated_plan(model, proto, "int8")
    assert {q.role for q in plan.nodes["mm"].inputs.values()} == {"activation"}
    p = InsertQDQPass(plan, CAPABILITIES)
    helpers.assert_pass_contract(p, model, expect_modified=True)
    mm = helpers.node_by_name(model, "mm")
    assert [helpers.producer_op(v) for v in mm.inputs] == ["DequantizeLinear", "DequantizeLinear"]
    assert layer_records(model.graph) == [] and helpers.op_counts(model)["QuantizeLinear"] == 2


def _refused(model, plan):
    before = helpers.snapshot(model)
    with pytest.raises((QCompileError, ir.passes.PreconditionError)) as info:
        InsertQDQPass(plan, CAPABILITIES)(model)
    assert helpers.snapshot(model) == before, "a refused model is not touched"
    e, msgs = info.value, []
    while e is not None:
        msgs.append(str(e))
        e = e.__cause__
    return " | ".join(msgs)


def test_opset_too_old_is_refused():
    model = ir.from_proto(_shared_weight_model(False))
    model.opset_imports[""] = 13
    plan = QuantPlan("w4", {"mm1": NodePlan("MatMul", {1: InputQuant("w", "weight", QuantSpec("int4", PerBlock(0, 8)))})})
    assert "int4 Q/DQ needs opset >= 21, model has 13" in _refused(model, plan)


def test_format_without_native_qdq_becomes_a_function_op():
    """E2M1 has no onnxruntime Q/DQ: the weight is stored packed behind qcompile.DequantizeFP4."""
    model = ir.from_proto(_shared_weight_model(False))
    p = InsertQDQPass(_weight_plan(["mm1"], "e2m1"), CAPABILITIES)
    helpers.assert_pass_contract(p, model, expect_modified=True)
    dq = helpers.node_by_name(model, "mm1").inputs[1].producer()
    assert (dq.domain, dq.op_type) == ("qcompile", "DequantizeFP4")
    assert dq.inputs[0].const_value.dtype == ir.DataType.UINT8 and dq.inputs[0].const_value.size == 16 * 8 // 2
    assert layer_records(model.graph)[0].emission == "qcompile.DequantizeFP4"


def test_shared_weight_native_and_packed_get_distinct_names():
    """One weight, two emissions: mm1 (int8 activations, for onnxruntime's integer fusions) reads a
    native int8 DequantizeLinear, mm2 (weight-only, for the MatMulNBits lowering) a packed qcompile
    op; every value name stays unique (the pass and the qcompile ops name through one Emitter)."""
    model = ir.from_proto(_shared_weight_model(False))
    wspec = QuantSpec("int8", PerChannel(1))
    plan = QuantPlan("x", {
        "mm1": NodePlan("MatMul", {0: InputQuant("x", "activation", QuantSpec("int8", PerTensor(), True, clip=(-3.0, 3.0))),
                                   1: InputQuant("w", "weight", wspec)}),
        "mm2": NodePlan("MatMul", {1: InputQuant("w", "weight", wspec)}),
    })
    helpers.assert_pass_contract(InsertQDQPass(plan, CAPABILITIES), model, expect_modified=True)
    ops = [helpers.producer_op(helpers.node_by_name(model, n).inputs[1]) for n in ("mm1", "mm2")]
    assert ops == ["DequantizeLinear", "DequantizeMinifloat"]
    names = [o.name for n in model.graph for o in n.outputs] + list(model.graph.initializers)
    assert len(names) == len(set(names)), "every value name is unique"


def test_function_ops_need_their_opset():
    """FakeQuantMX reads ReduceMax's axes from an input (opset 18)."""
    model = ir.from_proto(_shared_weight_model(False))
    model.opset_imports[""] = 17
    plan = QuantPlan("x", {"mm1": NodePlan("MatMul", {0: InputQuant("x", "activation", QuantSpec("mxfp4", PerBlock(-1, 32)))})})
    assert "mxfp4 needs opset >= 18 (qcompile.FakeQuantMX), model has 17" in _refused(model, plan)


def test_asymmetric_activation_without_native_qdq_is_refused():
    model = ir.from_proto(_shared_weight_model(False))
    spec = QuantSpec("int5", PerTensor(), False, clip=(-1.0, 2.0))
    plan = QuantPlan("x", {"mm1": NodePlan("MatMul", {0: InputQuant("x", "activation", spec)})})
    assert "only symmetric (zero point 0)" in _refused(model, plan)


def test_uncalibrated_activation_is_refused():
    model = ir.from_proto(_shared_weight_model(False))
    plan = QuantPlan("int8", {"mm1": NodePlan("MatMul", {0: InputQuant("x", "activation", QuantSpec("int8", PerTensor(), False))})})
    assert "activation 'x' of mm1 has no calibrated range" in _refused(model, plan)


def test_plan_for_missing_node_changes_nothing():
    model = ir.from_proto(_shared_weight_model(False))
    helpers.assert_pass_contract(InsertQDQPass(_weight_plan(["not_there"]), CAPABILITIES), model, expect_modified=False)


# --- contract on the tiny models ----------------------------------------------------------------
@pytest.mark.parametrize("name, target", [
    ("mlp", "int8"), ("mlp", "fp8"), ("mlp", "w4"), ("attention", "int8"), ("attention", "a16w8"),
    ("cnn", "fp8"), ("cnn", "w8"),
    ("cnn", "int8"), ("cnn", "a16w8"),
])
def test_contract(name, target):
    model, proto = _prepared(name)
    plan = _calibrated_plan(model, proto, target)
    helpers.assert_pass_contract(InsertQDQPass(plan, CAPABILITIES), model, expect_modified=True)
