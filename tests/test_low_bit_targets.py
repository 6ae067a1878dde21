"""Formats onnxruntime lacks, end to end (issue 4, acceptance 1 and 3).

Every low-bit target compiles the in-code MLP and a CNN (tiny_models.mlp / convnet); the compiled
model passes onnx.checker (full), runs in stock onnxruntime at DISABLE_ALL and ENABLE_ALL, and equals
a numpy simulation within 1e-5 relative (max |y - sim| / max |sim|), for each weight lowering.

The simulation is independent of the emitted graph: the tiny models' forward pass written in numpy
(float32), each weight replaced by its codec-dequantized value (`weights.quantize(W, spec)`, the
spec taken from the compile's plan) and each quantized activation by `calibrate.simulate(x, spec)`
(the plan's calibrated range; MX / NVFP4 block scales from the data at run time).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper as nh

import helpers
import qcompile
import tiny_models
from qcompile.calibrate import simulate
from qcompile.targets import get_target
from qcompile.weights import quantize

LOW_BIT = ["fp6", "fp6-e3m2", "fp4", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4", "w4a8", "int3", "int2",
           "w:e3m4,a:e4m3", "w:e2m1/16,a:e2m3", "w:int5,a:int6"]  # fmt: skip
LOWERINGS = ["auto", "function", "integer"]


def _sim(plan, name, x, w):
    """x and w as the compiled node `name` sees them."""
    node = plan.nodes.get(name)
    if node is None:
        return x, w
    if 0 in node.inputs:
        x = simulate(x, node.inputs[0].spec)
    if 1 in node.inputs:
        w = quantize(w, node.inputs[1].spec).dequantize()
    return x.astype(np.float32), w.astype(np.float32)


def _conv(x, k, b):
    """3x3 convolution, stride 1, padding 1, NCHW, float32."""
    cols = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", cols, k, dtype=np.float32) + b[None, :, None, None]


def _mlp(plan, p, x):
    a, w1 = _sim(plan, "fc1", x, p["w1"])
    h = np.maximum(a @ w1 + p["b1"], 0)
    a, w2 = _sim(plan, "fc2", h, p["w2"])
    return a @ w2.T + p["b2"]


def _convnet(plan, p, x):
    a, k1 = _sim(plan, "conv1", x, p["k1"])
    y = np.maximum(_conv(a, k1, p["kb1"]), 0)
    n, c, hh, ww = y.shape
    y = y.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
    a, k2 = _sim(plan, "conv2", y, p["k2"])
    y = np.maximum(_conv(a, k2, p["kb2"]), 0).mean(axis=(2, 3), dtype=np.float32)
    a, fw = _sim(plan, "fc", y, p["fc_w"])
    return a @ fw + p["fc_b"]


FORWARD = {"mlp": _mlp, "convnet": _convnet}


@pytest.fixture(scope="module")
def compiled():
    cache: dict = {}

    def get(model: str, target: str, lowering: str):
        key = (model, target, lowering)
        if key not in cache:
            proto = getattr(tiny_models, model)()
            calib, ev = tiny_models.inputs_for(proto, 64, seed=1), tiny_models.inputs_for(proto, 32, seed=2)
            # accuracy level 0: MatMulNBits in float, so the output equals the simulation (the default
            # "auto" may pick int8 activations: tests/test_accuracy_level.py); no bias correction, since the
            # simulation adds the float biases (the correction: tests/passes/test_bias_correction.py)
            tgt = dataclasses.replace(get_target(target), bias_correction=False)
            cache[key] = (proto, qcompile.compile(proto, tgt, calib=calib, eval=ev, lowering=lowering,
                                                  accuracy_level=0), ev)
        return cache[key]

    return get


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("model", list(FORWARD))
@pytest.mark.parametrize("target", LOW_BIT)
def test_runs_and_equals_numpy_simulation(compiled, target, model, lowering):
    proto, result, ev = compiled(model, target, lowering)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    params = {i.name: nh.to_array(i).astype(np.float32) for i in proto.graph.initializer}
    x = next(iter(ev.values()))
    ref = FORWARD[model](result.plan, params, x)
    for level in ("disable", "all"):
        y = helpers.run(out, {"x": x}, level)[0]
        rel = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
        assert rel <= 1e-5, f"{target}/{lowering} at {level}: max relative difference {rel:.2e}"


@pytest.mark.parametrize("target", ["fp4", "mxfp4", "nvfp4", "int3", "w4a8", "mxint8"])
def test_lowering_choice(compiled, target):
    """integer: every MatMul/Gemm weight runs in MatMulNBits; function: none does, the weights stay
    packed behind qcompile ops; auto: integer for these (all are <= 2 digit planes)."""
    ops = {}
    for lowering in LOWERINGS:
        _, result, _ = compiled("mlp", target, lowering)
        ops[lowering] = helpers.op_counts(ir.to_proto(result.model))
    assert ops["function"].get("MatMulNBits", 0) == 0
    assert any(k.startswith("Dequantize") for k in ops["function"]), ops["function"]
    assert ops["integer"].get("MatMulNBits", 0) >= 2
    assert ops["integer"].get("MatMul", 0) == ops["integer"].get("Gemm", 0) == 0, "fc1 (MatMul) and fc2 (Gemm, transB)"
    assert ops["auto"] == ops["integer"]


def test_auto_keeps_three_plane_formats_in_functions(compiled):
    """E3M2 elements x16 reach 448: three 4-bit planes, slower than the float GEMV at accuracy level 0."""
    _, result, _ = compiled("mlp", "fp6-e3m2", "auto")
    assert helpers.op_counts(ir.to_proto(result.model)).get("MatMulNBits", 0) == 0
    _, result, _ = compiled("mlp", "fp6-e3m2", "integer")
    assert helpers.op_counts(ir.to_proto(result.model)).get("MatMulNBits", 0) == 6  # 2 layers x 3 planes


def test_report_lists_bytes_and_emission_per_layer(compiled):
    _, result, _ = compiled("mlp", "mxfp4", "auto")
    rows = {r["node"]: r for r in result.report["layers"]}
    fc1 = rows["fc1"]
    assert fc1["weight_format"] == "mxfp4" and fc1["emission"] == "com.microsoft.MatMulNBits"
    # the kernel's layout, as stored: two digit planes of 4-bit B + a float32 scale per 32, and the
    # low plane's zero-point nibble per block (10.125 bits per element; packed codes would be 4.25)
    assert fc1["quant_bytes"] == 64 * 128 * 10.125 / 8 and fc1["float_bytes"] == 64 * 128 * 4
    _, result, _ = compiled("mlp", "mxfp4", "function")
    assert {r["emission"] for r in result.report["layers"]} == {"qcompile.DequantizeMX"}


@pytest.mark.parametrize("model", list(FORWARD))
@pytest.mark.parametrize("target", ["mxfp4", "nvfp4", "mxfp6", "mxint8", "w4a8"])
def test_native_lowering_equals_simulation(compiled, target, model):
    """--lowering native: MXFP4/NVFP4 MatMul/Gemm weights run in the optional fused C++ kernel
    (qcompile.native, built on demand) and every block activation quantizer in its native op, still
    equal to the simulation; a stock session refuses the model."""
    import onnxruntime as ort

    from qcompile import native

    proto, result, ev = compiled(model, target, "native")
    out = ir.to_proto(result.model)
    ops = helpers.op_counts(out)
    fp4 = target in ("mxfp4", "nvfp4")
    assert (ops["MatMulFp4"] >= 1) == fp4
    if model == "mlp" and fp4:  # the activation fake-quant along K is fused into the kernel (attribute act)
        assert not any(k.startswith("FakeQuant") for k in ops), ops
    # the other activation quantizers run natively too (NativeFakeQuantPass); Conv weights keep
    # their qcompile dequantizer function
    fake_quant = [n for n in out.graph.node if n.op_type.startswith("FakeQuant")]
    assert (fake_quant or (model == "mlp" and fp4)) and {n.domain for n in fake_quant} <= {native.DOMAIN}, ops
    float8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ}
    casts = [n for n in out.graph.node if n.op_type == "Cast" and n.attribute[0].i in float8]
    assert not casts, ops  # float8 activation quantizers too
    assert not any(op.startswith("FakeQuant") for _, op, _ in result.model.functions), result.model.functions
    params = {i.name: nh.to_array(i).astype(np.float32) for i in proto.graph.initializer}
    x = next(iter(ev.values()))
    ref = FORWARD[model](result.plan, params, x)
    for level in ("disable", "all"):
        so = native.session_options(helpers.session_options(level))
        y = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))) <= 1e-5
    with pytest.raises(Exception, match="qcompile.native"):
        helpers.session(out)


@pytest.mark.parametrize("model", list(FORWARD))
def test_native_fp8_activations_equal_the_stock_emission(compiled, model):
    """`fp8` (E4M3 weights and activations, SmoothQuant): under --lowering native the float8
    activation casts become native FakeQuantMinifloat ops (same bits) and the weights run in
    MatMulF8 (same values, another float32 summation order: rtol 1e-5), so the output stays that
    of the stock emission."""
    import onnxruntime as ort

    from qcompile import native

    _, stock, ev = compiled(model, "fp8", "auto")
    _, nat, _ = compiled(model, "fp8", "native")
    out = ir.to_proto(nat.model)
    assert helpers.op_counts(out)["FakeQuantMinifloat"] >= 1
    x = next(iter(ev.values()))
    want = helpers.run(ir.to_proto(stock.model), {"x": x}, "all")[0]
    so = native.session_options(helpers.session_options("all"))
    got = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-5


def test_auto_lowers_two_planes_only_for_one_row_per_sample():
    """On [batch, seq, K] activations (a transformer's tokens) two 4-bit planes cost more than the
    float MatMul (MiniLM: 1.8x), so auto keeps E2M1 behind qcompile ops there; one plane (int4) and
    the explicit integer lowering still go to MatMulNBits. "native" follows auto for the weights its
    FP4 kernel does not take (MXFP6: two planes)."""
    proto = tiny_models.attention()
    calib, ev = tiny_models.inputs_for(proto, 32, seed=1), tiny_models.inputs_for(proto, 16, seed=2)
    counts = {}
    for target, lowering in (("fp4", "auto"), ("fp4", "integer"), ("w4", "auto"), ("mxfp6", "native"),
                             ("w4", "native")):
        r = qcompile.compile(proto, target, calib=calib, eval=ev, lowering=lowering)
        counts[target, lowering] = helpers.op_counts(ir.to_proto(r.model)).get("MatMulNBits", 0)
    assert counts == {("fp4", "auto"): 0, ("fp4", "integer"): 8, ("w4", "auto"): 4, ("mxfp6", "native"): 0,
                      ("w4", "native"): 4}
