"""BiasCorrectionPass: the bias absorbs dW E[x], so the quantized layer's mean output matches float."""
import dataclasses

import numpy as np
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
from qcompile.analyze import make_plan
from qcompile.passes.bias_correction import BiasCorrectionPass, channel_means, correctable
from qcompile.statistics import stream_values
from qcompile.targets import get_target
from qcompile.weights import quantize_weight


def _depthwise(bias: bool):
    """Depthwise 3x3 Conv (few weights per channel: rounding does not average out) on inputs with a large mean."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32), "k")]
    ins = ["x", "k"]
    if bias:
        inits.append(nh.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b"))
        ins.append("b")
    g = h.make_graph([h.make_node("Conv", ins, ["y"], name="dw", group=8)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 8, 6, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 4, 4])], inits)
    return ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))


def _x(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return (3.0 + rng.standard_normal((n, 8, 6, 6))).astype(np.float32)


def _corrected(bias: bool):
    model = _depthwise(bias)
    # 4-bit per-channel conv weights (not a default target: w4 leaves Convs float): a visible bias
    plan = make_plan(model, dataclasses.replace(get_target("w4"), ops=("Conv",)))
    batches = [{"x": _x()}]
    means = channel_means(stream_values(model, ["x"], batches), ["x"], {"x": 1})
    return model, plan, means


def test_contract_and_mean_shift_cancelled():
    for bias in (True, False):
        model, plan, means = _corrected(bias)
        assert correctable(model.graph, plan) == {"dw": "x"}
        w = model.graph.initializers["k"].const_value.numpy()
        helpers.assert_pass_contract(BiasCorrectionPass(plan, means), model, expect_modified=True)
        # Simulate the quantized layer: quantized weights, corrected bias; compare mean outputs on
        # held-out inputs. Exact algebra: mean over all outputs of (W x + b) - (Q(W) x + b') is
        # dW (E_test[x] - E_calib[x]) per channel, i.e. ~0 up to the data's mean difference.
        qw = quantize_weight(w, plan.nodes["dw"].inputs[1].spec).dequantize()
        node = next(iter(model.graph))
        b_new = node.inputs[2].const_value.numpy()
        b_old = np.zeros(8, np.float32) if not bias else _depthwise(True).graph.initializers["b"].const_value.numpy()
        x = _x(64, seed=2)
        ref = helpers.run(ir.to_proto(_depthwise(bias)), {"x": x})[0]
        q_model = _depthwise(bias)
        q_model.graph.initializers["k"].const_value = ir.tensor(qw.astype(np.float32), name="k")
        uncorrected = helpers.run(ir.to_proto(q_model), {"x": x})[0]
        shift_before = np.abs((ref - uncorrected).mean(axis=(0, 2, 3))).max()
        corrected = uncorrected + (b_new - b_old).reshape(1, 8, 1, 1)
        shift_after = np.abs((ref - corrected).mean(axis=(0, 2, 3))).max()
        # the correction removes >= 90% of the per-channel mean error (measured ~99%; the rest is
        # the difference between calibration and test means, and border padding)
        assert shift_after < 0.1 * shift_before, (shift_before, shift_after)


def test_matmul_is_not_corrected():
    rng = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
                     [nh.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")])
    model = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    assert correctable(model.graph, make_plan(model, get_target("w4"))) == {}


def test_gemm_alpha_and_beta_scale_the_correction():
    """Y = alpha A B + beta C: the correction of C is alpha / beta times dW E[x] (it ignored both)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8)) * 0.2).astype(np.float32)
    c = (rng.standard_normal(8) * 0.1).astype(np.float32)
    g = h.make_graph([h.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=2.0, beta=0.5)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
                     [nh.from_array(w, "w"), nh.from_array(c, "c")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    model = ir.from_proto(proto)
    plan = make_plan(model, get_target("w4"))  # 4-bit blocks: a visible rounding shift
    x = (2.0 + rng.standard_normal((256, 16))).astype(np.float32)
    means = channel_means(stream_values(model, ["x"], [{"x": x}]), ["x"], {"x": -1})
    BiasCorrectionPass(plan, means)(model)
    node = next(iter(model.graph))
    qw = quantize_weight(w, plan.nodes["fc"].inputs[1].spec).dequantize()
    c_new = node.inputs[2].const_value.numpy()
    ref = 2.0 * x @ w + 0.5 * c
    got = 2.0 * x @ qw + 0.5 * c_new
    uncorrected = 2.0 * x @ qw + 0.5 * c
    # the mean output shift is cancelled (up to float noise), and it was not small before
    assert np.abs((got - ref).mean(axis=0)).max() < 1e-5
    assert np.abs((uncorrected - ref).mean(axis=0)).max() > 1e-3


def test_insert_qdq_reuses_the_weights_bias_correction_quantized():
    """A WeightCache shared by the two passes: InsertQDQPass takes what BiasCorrectionPass quantized
    (nothing is left cached: the codes live only in the graph), and the compiled graph is the one
    both passes give with separate quantizations (same bytes: the scale search is deterministic)."""
    from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
    from qcompile.passes.insert_qdq import InsertQDQPass
    from qcompile.weights import WeightCache

    graphs = []
    for shared in (True, False):
        model, plan, means = _corrected(bias=True)
        cache = WeightCache()
        BiasCorrectionPass(plan, means, cache)(model)
        assert len(cache._entries) == 1
        InsertQDQPass(plan, CAPABILITIES, cache if shared else None)(model)
        assert not cache._entries if shared else len(cache._entries) == 1
        graphs.append(helpers.snapshot(model))
    assert graphs[0] == graphs[1]
