"""Online rotation (qcompile.rotation, passes/rotate.py, the `rotation` stages, `--target none`)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import helpers
import qcompile
import tiny_models
from qcompile.analyze import make_plan, plan_on
from qcompile.errors import InputError
from qcompile.passes.normalize import NormalizePass
from qcompile.passes.rotate import (
    ROTATED_KEY,
    ROTATION_IN_VALUES_KEY,
    ROTATION_KEY,
    OnlineRotationPass,
    emitted_rotation,
    order_free,
    rotatable,
    rotated_name,
)
from qcompile.rotation import Rotation, block_for, fast_factor, hadamard, orthogonal_block
from qcompile.targets import get_target


# --- the math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_is_orthogonal_and_folds_exactly(kind):
    r = Rotation(96, 32, kind, seed=4)
    m = r.matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(96), atol=1e-12)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 96)), rng.standard_normal((96, 7))
    np.testing.assert_allclose(r.apply(x), x @ m, atol=1e-12)
    np.testing.assert_allclose(r.fold_rows(w), m.T @ w, atol=1e-12)
    np.testing.assert_allclose(r.apply(x) @ r.fold_rows(w), x @ w, atol=1e-10)
    assert (r.signs() is None) == (kind == "hadamard")
    if kind == "random":  # the seed decides the signs, so a saved plan replays them
        np.testing.assert_array_equal(r.signs(), Rotation(96, 32, kind, seed=4).signs())
        assert not np.array_equal(r.signs(), Rotation(96, 32, kind, seed=5).signs())
    assert Rotation.from_json(json.loads(json.dumps(r.to_json()))) == r


@pytest.mark.parametrize("n", [8, 12, 20, 24, 28, 36, 44, 60, 96, 384, 768, 1536])
def test_hadamard_orders(n):
    """Sylvester for powers of two, Paley I (12 = 11 + 1, 20, 24, 44, 60) and Paley II (28 = 2 x 14,
    36 = 2 x 18) times Sylvester: entries +-1 and H H^T = n I."""
    h = hadamard(n)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    assert set(np.unique(h)) == {-1.0, 1.0}


def test_blocks():
    # the largest Hadamard order dividing the width, up to the request: 384 = 3 x 128, 96 = 12 x 8,
    # 100 = 5 x 20, 300 = 5 x 60; 150 = 2 x 75 has only 2: the Hadamard x DCT block 75; 7 is left
    assert [block_for(k, 128) for k in (384, 1536, 96, 7, 64, 100, 300, 150)] == [128, 128, 96, 1, 64, 20, 60, 75]
    assert block_for(384, 16) == 16 and block_for(384, 384) == 384 and block_for(384, 32) == 32
    with pytest.raises(ValueError):
        Rotation(96, 64)  # 64 does not divide 96
    with pytest.raises(ValueError):
        hadamard(172)  # a Hadamard order, but not one constructed here
    with pytest.raises(ValueError):
        Rotation(128, 128, factor=3)
    b = orthogonal_block(150)  # C_75 (x) H_2 / sqrt 2
    np.testing.assert_allclose(b @ b.T, np.eye(150), atol=1e-12)
    assert [fast_factor(b) for b in (32, 64, 128, 384, 512)] == [0, 0, 16, 24, 32]


@pytest.mark.parametrize("width,block,factor", [(256, 128, 16), (384, 384, 24), (768, 384, 12), (150, 150, 15)])
def test_fast_form_is_the_permuted_kronecker_product(width, block, factor):
    """B = (B_a (x) B_c) P: orthogonal, its columns those of B_a (x) B_c (the same spread), and in
    onnxruntime the emitted Reshape/MatMul/Transpose/MatMul/Reshape computes x R."""
    r = Rotation(width, block, "random", 5, factor)
    m = r.matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(width), atol=1e-12)
    kron = np.kron(orthogonal_block(factor), orthogonal_block(block // factor))
    assert sorted(map(tuple, r.block_matrix().T.round(12))) == sorted(map(tuple, kron.T.round(12)))
    x = np.random.default_rng(1).standard_normal((2, 3, width)).astype(np.float32)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21})
    xv = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, width]))
    graph.inputs.append(xv)
    from qcompile.passes.rotate import _emit

    out = _emit(graph, xv, r)
    graph.outputs.append(out)
    assert [n.op_type for n in graph][:5] == ["Mul", "Reshape", "MatMul", "Transpose", "MatMul"]
    got = helpers.run(ir.to_proto(ir.Model(graph, ir_version=10)), {"x": x})[0]
    np.testing.assert_allclose(got, r.apply(x), rtol=1e-5, atol=1e-5)


# --- the pass --------------------------------------------------------------------------------------
def _attention():
    proto = tiny_models.attention()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    return proto, model, make_plan(model, get_target("int8"))


@pytest.mark.parametrize("attention_quantized", [True, False], ids=["qk-pv-quantized", "qk-pv-float"])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_online_rotation_pass_contract_and_exactness(kind, attention_quantized):
    """Every activation whose consumers all fold R^T is rotated once (a second run rotates nothing
    twice); the graph computes the float function to float32 rounding. The attention output's
    rotation goes into W_v only where no quantizer sees V on the way (qk, pv left float)."""
    import dataclasses

    proto, model, plan = _attention()
    if not attention_quantized:
        plan = dataclasses.replace(plan, nodes={k: v for k, v in plan.nodes.items() if k not in ("qk", "pv")})
    found = rotatable(model.graph, plan)
    assert set(found) == {"xn", "o2"}, "the LN output (read by Q, K, V) and the attention output (read by o_proj)"
    assert found["xn"] == (32, ["q_proj", "k_proj", "v_proj"])
    rotations = {v: Rotation(k, 16, kind, seed=3) for v, (k, _) in found.items()}
    feeds = tiny_models.inputs_for(proto, 4, seed=2)
    ref = helpers.session(proto, "disable").run(None, feeds)[0]
    helpers.assert_pass_contract(OnlineRotationPass(plan, rotations), model, expect_modified=True)
    after = plan_on(model.graph, plan)  # renamed to the rotated graph: also a no-op
    assert helpers.assert_pass_contract(OnlineRotationPass(after, rotations), model).modified is False
    nodes = {n.name: n for n in model.graph}
    for c in ("q_proj", "k_proj", "v_proj"):
        assert nodes[c].inputs[0].name == rotated_name("xn") and nodes[c].metadata_props[ROTATED_KEY] == "xn"
    emitted = [n.op_type for n in model.graph if n.metadata_props.get(ROTATION_KEY) == "xn"]
    assert emitted == (["Mul"] if kind == "random" else []) + ["Reshape", "MatMul", "Reshape"], "grouped emission"
    # the attention output o2 (2 heads of 16): a signless block within a head goes into W_v, b_v
    o_emitted = [n.op_type for n in model.graph if n.metadata_props.get(ROTATION_KEY) == "o2"]
    if kind == "hadamard" and not attention_quantized:
        assert o_emitted == [] and nodes["v_proj"].metadata_props[ROTATION_IN_VALUES_KEY] == "o2"
        assert nodes["o_proj"].inputs[0].name == rotated_name("o2") and nodes["o_proj"].inputs[0].producer().name == "merge"
        assert nodes["v_bias"].inputs[1].name != "bv", "b_v R"
    else:  # random signs differ per head, or pv would quantize V R: online
        assert o_emitted == (["Mul"] if kind == "random" else []) + ["Reshape", "MatMul", "Reshape"]
        assert ROTATION_IN_VALUES_KEY not in nodes["v_proj"].metadata_props
    got = helpers.session(ir.to_proto(model), "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("target,free", [("int8", True), ("fp8", True), ("w4a8", False), ("mxfp4", False), ("none", True)])
def test_order_free_quantizers(target, free):
    """The fast form's permutation is used only where no quantizer of x or W groups x's channels
    (int8: per-tensor x, per-channel W; w4a8: W in blocks of K; mxfp4: both in blocks)."""
    proto = tiny_models.attention()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    plan = make_plan(model, get_target(target))
    nodes = {n.name: n for n in model.graph}
    assert order_free(plan, nodes, ["q_proj", "k_proj", "v_proj"]) is free
    r = emitted_rotation(256, 128, order_free=free)
    assert bool(r.factor) is free and emitted_rotation(256, 128, native=True).factor == 0


def test_rotation_of_a_value_of_unknown_rank_and_a_gemm_with_trans_b():
    """The MLP's Relu output feeds a Gemm with transB (W stored [N, K]: it takes W^T R); with the
    value's shape unknown the rotation is one dense MatMul by the block-diagonal R."""
    proto = tiny_models.mlp()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    plan = make_plan(model, get_target("int8"))
    found = rotatable(model.graph, plan)
    assert found["h2"] == (128, ["fc2"])
    values = {o.name: o for n in model.graph for o in n.outputs}
    values["h2"].shape = None
    feeds = tiny_models.inputs_for(proto, 8, seed=2)
    ref = helpers.session(proto, "disable").run(None, feeds)[0]
    OnlineRotationPass(plan, {"h2": Rotation(128, 32)})(model)
    assert [n.op_type for n in model.graph if n.metadata_props.get(ROTATION_KEY) == "h2"] == ["MatMul"]
    got = helpers.session(ir.to_proto(model), "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rotation_width_mismatch_is_an_error():
    _, model, plan = _attention()
    with pytest.raises(ValueError, match="width"):
        OnlineRotationPass(plan, {"xn": Rotation(64, 16)})(model)


# --- the compile -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attention_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rot")
    proto = tiny_models.attention()
    for init in proto.graph.initializer:  # an outlier channel after LayerNorm, as real transformers have
        if init.name == "ln_g":
            g = onnx.numpy_helper.to_array(init).copy()
            g[5] *= 30
            init.CopyFrom(onnx.numpy_helper.from_array(g, "ln_g"))
    x = np.random.default_rng(0).standard_normal((96, 16, 32)).astype(np.float32)
    proto_path = d / "attn.onnx"
    onnx.save(proto, str(proto_path))
    np.savez(d / "calib.npz", x=x[:64])
    np.savez(d / "eval.npz", x=x[64:])
    return proto_path, d / "calib.npz", d / "eval.npz"


def test_target_none_writes_the_rotated_float_model(attention_data, tmp_path):
    model, calib, eval_ = attention_data
    r = qcompile.compile(str(model), "none", calib=str(calib), eval=str(eval_), rotate="hadamard")
    names = [p["name"] for p in r.report["passes"]]
    assert "OnlineRotationPass" in names and "calibrate" not in names and "InsertQDQPass" not in names
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in r.model.graph)
    feeds = {"x": np.load(eval_)["x"]}
    ref = helpers.session(onnx.load(str(model)), "disable").run(None, feeds)[0]
    got = helpers.session(ir.to_proto(r.model), "disable").run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert r.report["outputs"]["y"]["sqnr_db"] > 100
    touched = {e["value"]: e["nodes"] for e in r.report["transforms"]}
    assert touched == {"xn": ["k_proj", "q_proj", "v_proj"], "o2": ["o_proj"]}
    assert r.plan.rotations["xn"] == {"width": 32, "block": 32, "kind": "hadamard", "seed": 0}


def test_rotated_int8_plan_replays_exactly_and_rotation_helps(attention_data, tmp_path):
    """The plan records every rotation: replaying it gives the same model. On a value with an
    outlier channel, rotating before per-tensor int8 (without SmoothQuant, which int8 adds) raises
    the output SQNR (17.4 -> 24.2 dB when written)."""
    model, calib, eval_ = attention_data
    kw = dict(calib=str(calib), eval=str(eval_), min_sqnr=-100)
    plain = qcompile.compile(str(model), "w:int8,a:int8", **kw)
    rot = qcompile.compile(str(model), "w:int8,a:int8", rotate="random", rotate_block=16, **kw)
    assert set(rot.plan.rotations) == {"xn", "o2"} and rot.plan.rotations["xn"]["block"] == 16
    gain = rot.report["verdict"]["worst_output_sqnr_db"] - plain.report["verdict"]["worst_output_sqnr_db"]
    assert gain > 3, f"rotation gained {gain:.2f} dB on a 30x outlier channel"
    path = tmp_path / "plan.json"
    rot.plan.save(path)
    replay = qcompile.compile(str(model), "w:int8,a:int8", plan=str(path), **kw)
    assert (ir.to_proto(replay.model).SerializeToString(deterministic=True)
            == ir.to_proto(rot.model).SerializeToString(deterministic=True))


def test_rotate_options_are_checked():
    from qcompile.pipeline import settings_for

    with pytest.raises(InputError, match="rotate must be"):
        settings_for("int8", rotate="spin")
    with pytest.raises(InputError, match="integer >= 2"):
        settings_for("int8", rotate="hadamard", rotate_block=1)


def test_rotate_cli(attention_data, tmp_path):
    model, calib, eval_ = attention_data
    out = tmp_path / "rot.onnx"
    cmd = [sys.executable, "-m", "qcompile.cli", str(model), "--target", "int8", "--calib", str(calib),
           "--eval", str(eval_), "--rotate", "hadamard", "--rotate-block", "16", "-o", str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    # int8 smooths first: o2's producer does not fold its scales, so a Mul makes o2_smooth, which is rotated
    assert {e["value"] for e in report["transforms"] if e["transform"] == "rotate"} == {"xn", "o2_smooth"}
    smoothed = {e["value"]: e for e in report["transforms"] if e["transform"] == "smooth"}
    assert smoothed["o2"]["emitted"] == ["o2_SmoothQuant"] and smoothed["o2"]["nodes"] == ["o_proj"]
    assert smoothed["xn"]["emitted"] == ["ln"], "xn's 1/s folds into the LayerNorm's gain and bias"
    assert any(n.op_type == "MatMul" and n.name.startswith("xn_Rotate_") for n in onnx.load(str(out)).graph.node)
    bad = subprocess.run(cmd[:-4] + ["--rotate-block", "24", "-o", str(tmp_path / "b.onnx")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and not (tmp_path / "b.onnx").exists()


# --- rotation choice by measurement, SmoothQuant as a user transform -------------------------------
def test_rotate_auto_keeps_a_rotation_only_where_it_measures_better(attention_data):
    """`--rotate auto`: per value, the candidate of largest measured gain, or none when no candidate
    gains; the report gives each candidate's gain. The LN output with a 30x outlier channel gains
    from a rotation before per-tensor int8; the whole model is then not worse than unrotated."""
    model, calib, eval_ = attention_data
    kw = dict(calib=str(calib), eval=str(eval_), min_sqnr=-100)
    plain = qcompile.compile(str(model), "w:int8,a:int8", **kw)
    auto = qcompile.compile(str(model), "w:int8,a:int8", rotate="auto", **kw)
    choices = {e["value"]: e for e in auto.report["transforms"] if e["transform"] == "rotate-choice"}
    assert set(choices) == {"xn", "o2"}
    for value, e in choices.items():
        best = max(e["gain_db"], key=e["gain_db"].get)
        assert set(e["gain_db"]) >= {"hadamard@16", "hadamard@32"}, "every block up to 128 dividing 32"
        if e["gain_db"][best] > 0:
            assert e["chosen"] == best and auto.plan.rotations[value]["block"] == int(best.split("@")[1])
        else:
            assert e["chosen"] == "none" and value not in auto.plan.rotations
    assert choices["xn"]["chosen"] != "none" and choices["xn"]["gain_db"][choices["xn"]["chosen"]] > 3
    worst = {r.report["verdict"]["worst_output_sqnr_db"] for r in (plain, auto)}
    assert auto.report["verdict"]["worst_output_sqnr_db"] > plain.report["verdict"]["worst_output_sqnr_db"] + 3, worst


def test_smooth_off_alpha_and_auto(attention_data):
    """`--smooth off` drops int8's search; `--smooth ALPHA` applies the paper's rule to every
    smoothable value, largest on the outlier channel; `--smooth auto` searches on a target that
    does not smooth by default (w4a8)."""
    model, calib, eval_ = attention_data
    kw = dict(calib=str(calib), eval=str(eval_), min_sqnr=-100)
    stages = lambda r: [p["name"] for p in r.report["passes"]]  # noqa: E731
    off = qcompile.compile(str(model), "int8", smooth="off", **kw)
    assert off.plan.smoothing == {} and "smoothing-search" not in stages(off)
    fixed = qcompile.compile(str(model), "int8", smooth=0.5, **kw)
    assert set(fixed.plan.smoothing) == {"xn", "o2"}
    entries = {e["value"]: e for e in fixed.report["transforms"]}
    assert entries["xn"]["rule"] == "alpha 0.5" and entries["xn"]["nodes"] == ["k_proj", "q_proj", "v_proj"]
    s = np.asarray(fixed.plan.smoothing["xn"])
    assert s.argmax() == 5 and s[5] > 3 * np.median(s), "alpha 0.5 moves the outlier channel into the weights"
    assert qcompile.compile(str(model), "w4a8", **kw).plan.smoothing == {}
    searched = qcompile.compile(str(model), "w4a8", smooth="auto", **kw)
    assert "smoothing-search" in stages(searched) and searched.plan.smoothing


@pytest.mark.parametrize("smooth,rotate", [(0.5, "none"), ("auto", "none"), (0.5, "hadamard"), ("auto", "random")])
def test_smoothing_then_rotation_is_exact_under_target_none(attention_data, smooth, rotate):
    """x W = ((x / s) R)(R^T diag(s) W): SmoothQuant first, then the rotation of the smoothed value."""
    model, calib, eval_ = attention_data
    r = qcompile.compile(str(model), "none", calib=str(calib), eval=str(eval_), smooth=smooth, rotate=rotate)
    assert r.plan.smoothing and bool(r.plan.rotations) == (rotate != "none")
    feeds = {"x": np.load(eval_)["x"]}
    ref = helpers.session(onnx.load(str(model)), "disable").run(None, feeds)[0]
    got = helpers.session(ir.to_proto(r.model), "disable").run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_smooth_option_errors(attention_data, tmp_path):
    from qcompile.pipeline import settings_for

    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(InputError, match="smooth"):
            settings_for("int8", smooth=bad)
    assert settings_for("int8", smooth="0.25").transforms.smooth == 0.25
    model, calib, eval_ = attention_data
    out = tmp_path / "s.onnx"
    r = subprocess.run([sys.executable, "-m", "qcompile.cli", str(model), "--target", "int8", "--calib", str(calib),
                        "--smooth", "2", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "smooth" in r.stderr and "Traceback" not in r.stderr and not out.exists()
