"""End to end through the library: qcompile.compile on the seeded in-code models.

Acceptance (issue point 2): for every target on the MLP, the CNN (Conv+BatchNorm+Relu) and the
attention block, the compiled model passes onnx.checker, runs in onnxruntime at ENABLE_ALL and keeps
an output SQNR floor against the float model on held-out inputs; int8 MatMul/Conv/Gemm really run
as integer kernels in the graph onnxruntime optimizes.

Output SQNR floors (dB) in FLOORS: held-out inputs (64 samples, seed 2), calibration on 128 others
(seed 1); the values measured when the floors were set are in brackets, MLP / CNN / attention.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import qcompile
import tiny_models
from qcompile import CompileResult, InputError, QCompileError, QuantPlan, UnsupportedModelError, ValidationFailed

MODELS = ["mlp", "cnn", "attention"]
FLOORS = {
    "int8": 35.0,      # the int8 floor: 8-bit activations and per-channel weights [34.2 (38.4 without
                       # SmoothQuant) / 41.7 / 40.6]
    "a16w8": 40.0,     # int16 activations add ~no noise; int8 per-channel weights alone ~42+ dB [42.2 / 43.7 / 48.4]
    "w8": 36.0,        # weight-only int8 per channel, run exactly (MatMulNBits planes at accuracy level 0;
                       # Conv decoded to float) [43.1 / 54.9 / 49.1]
    "w4": 15.0,        # 4-bit weights (blocks of 32; MatMul/Gemm only): ~6 dB per bit under w8 [19.5 / 40.2 / 24.8]
    "fp8": 25.0,       # the fp8 floor: E4M3 has 3 mantissa bits (~31 dB per tensor) [25.8 / 25.7 / 31.0]
    "fp8-e5m2": 18.0,  # E5M2: one mantissa bit fewer than E4M3, ~6 dB less [20.6 / 19.4 / 24.9]
    # formats onnxruntime lacks (issue 4); MatMul/Gemm weights run as exact MatMulNBits planes
    "w4a8": 14.0,      # w4's weights plus E4M3 activations (~-1..-2 dB) [18.4 / 16.7 / 24.2]
    "int3": 10.0,      # one bit under w4: ~-6 dB [12.9 / 19.9 / 19.1]
    "int2": 3.0,       # four levels per block of 16: barely above noise without fine-tuning [5.5 / 5.5 / 13.2]
    "fp4": 15.0,       # E2M1 blocks of 32 with float32 MSE scales: about w4 [18.8 / 20.9 / 24.3]
    "fp6": 26.0,       # E2M3 weight-only: ~3 bits of mantissa relative to the block max [29.7 / 29.7 / 36.4]
    "fp6-e3m2": 19.0,  # one mantissa bit fewer than E2M3 [25.7 / 21.8 / 30.3]
    "mxfp8": 19.0,     # weights and activations E4M3 with power-of-two block scales [24.6 / 22.1 / 29.2]
    "mxfp6": 20.0,     # E2M3 elements, weights and activations [25.1 / 23.2 / 30.0]
    "mxfp4": 10.0,     # 4-bit weights and activations: the noise of both adds up [12.4 / 12.5 / 18.0]
    "mxint8": 30.0,    # int8 elements with per-32 power-of-two scales, weights and activations [36.7 / 33.8 / 41.2]
    "nvfp4": 13.0,     # E2M1 with E4M3 scales per 16: finer scales than mxfp4, ~+3 dB [15.5 / 16.7 / 19.6]
    "none": 100.0,     # no quantization, no transform asked for: the float model itself [inf / inf / inf]
    "auto": 15.0,      # mixed precision at AUTO_BITS per weight, which w4 (5.0) fits: never under w4's floor [22.1 / 37.1 / 28.7]
}
AUTO_BITS = 6.0  # the budget "auto" compiles at here
TARGETS = list(FLOORS)


def test_every_target_has_a_floor():
    assert set(qcompile.TARGETS) <= set(FLOORS), f"add a floor (and its reason) for {set(qcompile.TARGETS) - set(FLOORS)}"


def _data(proto):
    return tiny_models.inputs_for(proto, 128, seed=1), tiny_models.inputs_for(proto, 64, seed=2)


@pytest.fixture(scope="module")
def compiled():
    cache: dict = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            proto = getattr(tiny_models, name)()
            calib, ev = _data(proto)
            kw = {"budget_bits": AUTO_BITS} if target == "auto" else {}
            cache[name, target] = (proto, qcompile.compile(proto, target, calib=calib, eval=ev, **kw), ev)
        return cache[name, target]

    return get


# --- acceptance ---------------------------------------------------------------------------------
_KNOWN_BELOW_FLOOR: dict = {}


def _floor_cases():
    for name in MODELS:
        for target in TARGETS:
            reason = _KNOWN_BELOW_FLOOR.get((name, target))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, target, marks=marks, id=f"{name}-{target}")


@pytest.mark.parametrize("name, target", list(_floor_cases()))
def test_sqnr_floor_on_held_out_inputs(compiled, name, target):
    proto, r, ev = compiled(name, target)
    # measured here, independently of the report: float vs compiled, both at ENABLE_ALL
    out = proto.graph.output[0].name
    ref = helpers.run(proto, ev, "all")[0]
    got = helpers.run(r.model, ev, "all")[0]
    s = helpers.sqnr_db(ref, got)
    assert s >= FLOORS[target], f"{name}/{target}: {s:.2f} dB < {FLOORS[target]} dB"
    # at ~130 dB ("none": float rounding only) the figure is the rounding of two sessions' summation
    # orders (the report's uses every core), so it is only checked to be of that order
    tol = 0.01 if target != "none" else 5.0
    assert r.report["outputs"][out]["sqnr_db"] == pytest.approx(s, abs=tol), "the report tells the truth"
    assert r.report["outputs"][out]["samples"] == 64
    assert r.passed and r.report["verdict"]["passed"]


# --- every CPU (issue 9: the int8 floors failed on an AVX2-only CPU: mlp 28.5, cnn 34.6, attention 28.2 dB) -----
INTEGER_TARGETS = ["int8", "w:int8,a:int8", "w:int8,a:uint8"]  # the targets onnxruntime runs on u8 x s8 kernels


@pytest.fixture(scope="module")
def avx2_outputs(compiled, tmp_path_factory):
    """Outputs of the integer targets' compiled models computed by onnxruntime's AVX2 kernels (no
    AVX-512, no VNNI: natively on such a CPU, else under qemu-x86_64 -cpu Haswell), one child process."""
    cases = [(name, t) for name in MODELS for t in INTEGER_TARGETS]
    models = [compiled(name, t)[1].model for name, t in cases]
    feeds = [compiled(name, t)[2] for name, t in cases]
    outs = helpers.run_avx2(models, feeds, tmp_path_factory.mktemp("avx2"))
    return {case: o[0] for case, o in zip(cases, outs)}


@pytest.mark.parametrize("target", INTEGER_TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_int8_floor_holds_on_avx2_kernels(compiled, avx2_outputs, name, target):
    """The default (--cpu portable) integer emission keeps the int8 floor on the AVX2 kernels, and
    gives what this CPU's kernels give: no int16 pair saturates (the integer sums are exact on every
    CPU), so the outputs differ only by float rounding in the float ops around them."""
    proto, r, ev = compiled(name, target)
    ref = helpers.run(proto, ev, "all")[0]
    here = helpers.run(r.model, ev, "all")[0]
    avx2 = avx2_outputs[name, target]
    s_avx2, s_here = helpers.sqnr_db(ref, avx2), helpers.sqnr_db(ref, here)
    assert s_avx2 >= FLOORS["int8"], f"{name}/{target} on AVX2: {s_avx2:.2f} dB < {FLOORS['int8']} dB"
    assert abs(s_avx2 - s_here) <= 0.05, f"{name}/{target}: {s_avx2:.3f} dB on AVX2, {s_here:.3f} dB here"
    assert helpers.sqnr_db(here, avx2) > 60, "same integer sums on both CPUs: only float rounding differs"


def test_vnni_emission_saturates_on_avx2(tmp_path):
    """Why portable is the default: the unconstrained emission (--cpu vnni) loses >10 dB on the MLP
    when the AVX2 kernels run it (int16 pair saturation), though it validates on a VNNI CPU."""
    proto = tiny_models.mlp()
    calib, ev = _data(proto)
    r = qcompile.compile(proto, "int8", calib=calib, eval=ev, cpu="vnni")
    assert r.report["cpu"] == "vnni"
    assert all("int16_pairs" not in row for row in r.report["layers"])
    ref = helpers.run(proto, ev, "disable")[0]
    unfused = helpers.sqnr_db(ref, helpers.run(r.model, ev, "disable")[0])  # float reference arithmetic
    avx2 = helpers.sqnr_db(ref, helpers.run_avx2([r.model], ev, tmp_path)[0][0])
    assert avx2 < unfused - 10, f"AVX2 {avx2:.2f} dB vs {unfused:.2f} dB unfused: the saturation fact changed?"


def test_report_names_the_cpus(compiled):
    _, r, _ = compiled("mlp", "int8")
    assert r.report["cpu"] == "portable"
    host = r.report["validation"]["host_cpu"]
    assert host["class"] in ("avx2", "avx512", "vnni", "arm64") and isinstance(host["flags"], list)
    pairs = [row["int16_pairs"] for row in r.report["layers"]]
    assert len(pairs) == 2 and all(pairs), "every int8 layer says how it meets the pair bound"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_is_valid_onnx_for_onnxruntime(compiled, name, target):
    _, r, ev = compiled(name, target)
    proto = ir.to_proto(r.model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 13 and max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 26
    out = helpers.run(proto, ev, "all")[0]
    assert np.isfinite(out).all()
    # the weights really are stored quantized: no float copy of any planned weight survives
    planned = {q.value for n in r.plan.nodes.values() for q in n.inputs.values() if q.role == "weight"}
    assert planned and planned.isdisjoint(r.model.graph.initializers) != (target == "none")  # "none" keeps them float


def test_format_ordering(compiled):
    # One more mantissa bit is worth ~6 dB, four more integer bits ~24 dB per tensor (bias
    # correction closes part of the w4 gap on the CNN: measured w8 40.4, w4 32.5): catches a
    # format mix-up that a loose floor would let through.
    for name in MODELS:
        s = {t: compiled(name, t)[1].report["outputs"] for t in ("fp8", "fp8-e5m2", "w8", "w4")}
        s = {t: next(iter(v.values()))["sqnr_db"] for t, v in s.items()}
        assert s["fp8"] > s["fp8-e5m2"] + 3, (name, s)
        if name != "cnn":  # w4 leaves the CNN's convolutions in float
            assert s["w8"] > s["w4"] + 6, (name, s)


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_int8_fuses_into_integer_kernels(compiled, tmp_path, name):
    _, r, _ = compiled(name, "int8")
    opt = helpers.optimized(r.model, tmp_path / "optimized.onnx", "all")
    ops = helpers.op_counts(opt)
    kernels = {k: v for k, v in ops.items() if k in helpers.INTEGER_KERNELS}
    # one integer kernel per quantized node (QLinearConv / MatMulIntegerToFloat / QLinearMatMul / QGemm)
    assert sum(kernels.values()) == len(r.plan.nodes), f"integer kernels {kernels} for {len(r.plan.nodes)} planned nodes; ops {dict(ops)}"
    assert helpers.unfused_quantized_compute(opt) == [], f"float compute on quantized inputs; ops {dict(ops)}"


def test_int8_cnn_runs_as_qlinearconv(compiled, tmp_path):
    _, r, _ = compiled("cnn", "int8")
    ops = helpers.op_counts(helpers.optimized(r.model, tmp_path / "optimized.onnx", "all"))
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops["Relu"] == 0, "Relu folds into the quantized output"


# --- library API --------------------------------------------------------------------------------
def test_compile_result(compiled):
    _, r, _ = compiled("cnn", "int8")
    assert isinstance(r, CompileResult)
    assert isinstance(r.model, ir.Model) and isinstance(r.plan, QuantPlan)
    assert set(r.plan.nodes) == {"conv1", "conv2", "fc"}
    rep = r.report
    for key in ("schema", "input", "target", "sizes", "compile_seconds", "peak_rss_bytes", "passes", "outputs", "layers", "verdict"):
        assert key in rep, key
    assert rep["target"] == "int8" and rep["schema"].startswith("qcompile.report/")
    names = [p["name"] for p in rep["passes"]]
    for stage in ("NormalizePass", "FoldBatchNormPass", "calibrate", "LowerForOnnxruntimePass", "validate"):
        assert stage in names, names
    assert any(n.startswith("InsertQDQPass") for n in names)
    assert rep["sizes"]["quantized_weight_bytes"] < rep["sizes"]["float_weight_bytes"] / 2
    assert {row["node"] for row in rep["layers"]} == set(r.plan.nodes)
    json.dumps(rep, default=float)  # serializable


def test_validation_failed_carries_the_report(tmp_path):
    proto = tiny_models.mlp()
    calib, ev = _data(proto)
    with pytest.raises(ValidationFailed) as info:
        qcompile.compile(proto, "w8", calib=calib, eval=ev, min_sqnr=200.0)
    e = info.value
    assert e.exit_code == 3 and "below 200" in str(e)
    assert e.report["verdict"]["passed"] is False and e.report["verdict"]["min_sqnr_db"] == 200.0
    assert e.report["outputs"]["logits"]["sqnr_db"] > 30
    assert isinstance(e.result, CompileResult) and e.result.model is not None


def test_input_is_never_modified(tmp_path):
    proto = tiny_models.cnn()
    path = tmp_path / "cnn.onnx"
    onnx.save(proto, path)
    digest = helpers.sha256(path)
    calib, ev = _data(proto)
    np.savez(tmp_path / "calib.npz", **calib)
    (tmp_path / "eval").mkdir()
    np.savez(tmp_path / "eval" / "a.npz", x=ev["x"][:32])
    np.savez(tmp_path / "eval" / "b.npz", x=ev["x"][32:])
    files = sorted(p.name for p in tmp_path.iterdir())
    r = qcompile.compile(path, "int8", calib=tmp_path / "calib.npz", eval=tmp_path / "eval")
    assert r.report["input"] == str(path) and r.report["outputs"]["logits"]["samples"] == 64
    assert helpers.sha256(path) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == files, "compile() writes nothing"
    # in-memory inputs are not mutated either
    blob = proto.SerializeToString(deterministic=True)
    qcompile.compile(proto, "fp8", calib=calib, eval=ev)
    assert proto.SerializeToString(deterministic=True) == blob
    model = ir.from_proto(proto)
    before = helpers.snapshot(model)
    qcompile.compile(model, "int8", calib=calib, eval=ev)
    assert helpers.snapshot(model) == before


def test_api_validate(compiled):
    proto, r, ev = compiled("mlp", "fp8")
    res = qcompile.validate(proto, r.model, ev, min_sqnr=20.0)
    assert res["outputs"]["logits"]["sqnr_db"] == pytest.approx(r.report["outputs"]["logits"]["sqnr_db"], abs=1e-3)
    assert res["verdict"]["passed"]
    assert not qcompile.validate(proto, r.model, ev, min_sqnr=60.0)["verdict"]["passed"]


def test_model_with_nothing_to_quantize():
    g = h.make_graph([h.make_node("Relu", ["x"], ["r"]), h.make_node("Add", ["r", "c"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
                     [nh.from_array(np.ones(8, np.float32), "c")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    x = {"x": np.ones((8, 8), np.float32)}
    with pytest.raises(UnsupportedModelError, match="nothing to quantize for target int8"):
        qcompile.compile(proto, "int8", calib=x, eval=x)


def test_old_opset_model_is_upgraded():
    proto = tiny_models.cnn()
    proto.opset_import[0].version = 11
    calib, ev = _data(tiny_models.cnn())
    r = qcompile.compile(proto, "fp8", calib=calib, eval=ev)
    assert r.model.opset_imports[""] == 19, "float8 Q/DQ needs opset 19"
    assert r.report["outputs"]["logits"]["sqnr_db"] >= FLOORS["fp8"]


def test_opset_too_new_is_a_readable_error():
    proto = tiny_models.mlp()
    proto.opset_import[0].version = 27
    x = tiny_models.inputs_for(proto, 8)
    with pytest.raises(QCompileError, match="opset 27 is newer than onnxruntime supports"):
        qcompile.compile(proto, "int8", calib=x, eval=x)


@pytest.mark.parametrize("calib", ["none", "dict"])
def test_held_out_split_of_in_memory_calibration(calib):
    # Without eval, a quarter of the calibration samples (at most 64) is held out for validation and
    # never calibrated on; without calib, `samples` calibration inputs and a separate set of 64
    # held-out inputs are synthesized from the input types.
    proto = tiny_models.mlp()
    data = None if calib == "none" else {"x": tiny_models.inputs_for(proto, 128, seed=1)["x"]}
    r = qcompile.compile(proto, "int8", calib=data, samples=32 if calib == "none" else None)
    held, used = r.report["validation"]["samples"], r.report["calibration"]["samples"]
    assert (held, used) == ((64, 32) if calib == "none" else (32, 96))
    assert r.report["calibration"]["synthesized"] is (calib == "none")
    assert r.report["outputs"]["logits"]["samples"] == held


@pytest.mark.parametrize("target", ["int8", "a16w8", "w8", "w4", "fp8", "fp8-e5m2"])
def test_saved_plan_replays_to_the_same_model(tmp_path, target):
    proto = tiny_models.mlp()
    calib, ev = _data(proto)
    first = qcompile.compile(proto, target, calib=calib, eval=ev)
    first.plan.save(tmp_path / "plan.json")
    again = qcompile.compile(proto, target, calib=calib, eval=ev, plan=tmp_path / "plan.json")
    assert again.plan.to_json() == first.plan.to_json()
    np.testing.assert_array_equal(helpers.run(again.model, ev)[0], helpers.run(first.model, ev)[0])


def test_plan_naming_unknown_nodes_is_an_input_error(tmp_path):
    proto = tiny_models.mlp()
    calib, ev = _data(proto)
    plan = qcompile.compile(proto, "w8", calib=calib, eval=ev).plan.to_json()
    plan["nodes"]["ghost"] = plan["nodes"].pop("fc1")
    with pytest.raises(InputError, match=r"plan names nodes not in the model: \['ghost'\]"):
        qcompile.compile(proto, "w8", calib=calib, eval=ev, plan=QuantPlan.from_json(plan))


def test_model_with_external_data_compiles(tmp_path):
    """Weights in an external data file stay on disk (memory-mapped) and still calibrate and validate."""
    proto = tiny_models.mlp()
    path = tmp_path / "ext.onnx"
    ir.save(ir.from_proto(proto), path, external_data="ext.onnx.data")
    assert (tmp_path / "ext.onnx.data").stat().st_size > 64 * 128 * 4
    calib, ev = _data(proto)
    r = qcompile.compile(path, "w4a8", calib=calib, eval=ev)
    assert r.passed and r.report["outputs"]["logits"]["sqnr_db"] > 14
    out = tmp_path / "elsewhere" / "q.onnx"
    out.parent.mkdir()
    # auto: an input with external data gives an output with its own data file; the float biases are
    # copied into it, never referred to in ext.onnx.data (which the output's directory lacks)
    qcompile.save_model(r.model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    y = helpers.run(out, ev)[0]
    assert helpers.sqnr_db(helpers.run(path, ev)[0], y) > 14
    one = tmp_path / "one" / "q.onnx"
    one.parent.mkdir()
    qcompile.save_model(r.model, one, external_data="never")
    assert sorted(p.name for p in one.parent.iterdir()) == ["q.onnx"]
    np.testing.assert_array_equal(helpers.run(one, ev)[0], y)
