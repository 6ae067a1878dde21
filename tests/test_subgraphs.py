"""Compute inside If / Loop / Scan bodies and model-local functions is quantized (or kept float with
its reason in the layer table), on foreign-shaped models (tests/foreign_models.py).

Issue 9, "What was seen" 3: "compute inside If branches -> nothing to quantize". On e10cd69 every
compile below is refused with that message (or, for the function model, leaves the function's
MatMuls in float).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import foreign_models as fm
import helpers
import qcompile
from qcompile.analyze import PlanOptions
from qcompile.statistics import stream_values
from qcompile.errors import UnsupportedModelError
from qcompile.subgraphs import expose

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    return {"vad": fm.vad(d / "vad.onnx"), "loop": fm.loop_rnn(d / "loop.onnx"), "scan": fm.scan_rnn(d / "scan.onnx"),
            "func": fm.local_function_mlp(d / "func.onnx"), "dir": d}


def _body_ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for node in proto.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in a.g.node]


def _rows(result) -> dict[str, dict]:
    return {r["node"]: r for r in result.report["layers"]}


def _vad_feeds(data: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Sample k of `vad_data` as the model's feeds (batch 1)."""
    return {"input": data["input"][k : k + 1], "state": data["state"][k][:, :, None, :], "sr": np.asarray(data["sr"][k])}


@pytest.mark.parametrize("target,floor", [("int8", 30.0), ("fp8", 25.0)])
def test_vad_if_branches_are_quantized(models, target, floor, tmp_path):
    """Both branches of the If are quantized when the calibration data takes both (sr 8000 and
    16000); the LSTMs stay float with their reason; the compiled model runs at ENABLE_ALL and keeps
    `floor` dB on held-out samples of both branches (int8: 8-bit Q/DQ per layer ~40 dB here; fp8 E4M3 ~31 dB per layer)."""
    r = qcompile.compile(models["vad"], target, calib=fm.vad_data(96, seed=1), eval=fm.vad_data(32, seed=2))
    rows = _rows(r)
    quantized = {n for n, row in rows.items() if "weight_format" in row}
    assert quantized == {f"/{b}/{layer}" for b in ("b16", "b8") for layer in ("stft/Conv", "enc1/Conv", "enc2/Conv", "out/MatMul")}
    assert rows["/b16/LSTM"]["kept_float"].startswith("no quantized LSTM")
    path = tmp_path / "vad.onnx"
    qcompile.save_model(r.model, path)
    helpers.check_model(ir.load(path), full=False)
    data = fm.vad_data(16, seed=3)
    for k in range(16):
        feeds = _vad_feeds(data, k)
        ref = helpers.run(models["vad"], feeds)
        got = helpers.run(path, feeds)
        for a, b in zip(ref, got):
            assert helpers.sqnr_db(a, b) >= floor, (k, int(feeds["sr"]))


def test_vad_int8_body_fuses_into_integer_kernels(models, tmp_path):
    """The Q/DQ constants of a body are the body's own initializers, so onnxruntime fuses them
    there (with outer-scope constants the branch stays DQ -> MatMul, 10-100x slower)."""
    r = qcompile.compile(models["vad"], "int8", calib=fm.vad_data(64, seed=1), eval=fm.vad_data(16, seed=2))
    opt = helpers.optimized(r.model, tmp_path / "opt.onnx")
    ops = _body_ops(opt)
    assert ops.count("QLinearConv") == 6 and ops.count("MatMulIntegerToFloat") == 2, ops


def test_vad_branch_never_taken_stays_float(models, tmp_path):
    """Calibration data that never takes the 8 kHz branch: its nodes stay float with the reason
    (never a guessed range), and that branch still computes exactly what the float model does."""
    r = qcompile.compile(models["vad"], "int8", calib=fm.vad_data(64, seed=1, srs=(16000,)),
                         eval=fm.vad_data(16, seed=2, srs=(16000,)))
    rows = _rows(r)
    for layer in ("stft/Conv", "enc1/Conv", "enc2/Conv", "out/MatMul"):
        assert "weight_format" in rows[f"/b16/{layer}"]
        assert rows[f"/b8/{layer}"]["kept_float"] == "not computed on the calibration data (in If '/If' else_branch)"
    data = fm.vad_data(4, seed=4, srs=(8000,))
    for k in range(4):
        feeds = _vad_feeds(data, k)
        for a, b in zip(helpers.run(models["vad"], feeds), helpers.run(r.model, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)  # exact: the branch is the float one


@pytest.mark.parametrize("target", ["w4", "mxfp4"])
def test_vad_other_targets(models, target):
    """w4 quantizes the branches' MatMuls (its Convs stay float, with the reason); mxfp4's dynamic
    activations need no calibrated range, so both branches are quantized even without data."""
    r = qcompile.compile(models["vad"], target, calib=fm.vad_data(32, seed=1), eval=fm.vad_data(16, seed=2))
    rows = _rows(r)
    assert rows["/b8/out/MatMul"].get("weight_format") and rows["/b16/out/MatMul"].get("weight_format")
    if target == "w4":
        assert rows["/b8/enc1/Conv"]["kept_float"] == "the target quantizes MatMul/Gemm only"
    assert r.passed


def test_loop_body_matmuls(models, tmp_path):
    """A TorchScript `for` loop (ONNX Loop): the input Gemm and recurrent MatMul inside the body are
    quantized, fused by onnxruntime in the body, and the output keeps 30 dB (int8 Q/DQ per layer ~40 dB)."""
    rng = np.random.default_rng(5)
    r = qcompile.compile(models["loop"], "int8", calib={"x": rng.standard_normal((64, 6, 16)).astype(np.float32)},
                         eval={"x": rng.standard_normal((32, 6, 16)).astype(np.float32)})
    assert {n for n, row in _rows(r).items() if "weight_format" in row} == {"/inp/Gemm", "/rec/MatMul", "/out/Gemm"}
    assert r.report["outputs"]["y"]["sqnr_db"] >= 30.0
    ops = _body_ops(helpers.optimized(r.model, tmp_path / "opt.onnx"))
    assert "QGemm" in ops and "MatMulIntegerToFloat" in ops, ops


@pytest.mark.parametrize("target,floor", [("int8", 30.0), ("fp8", 22.0)])
def test_scan_body_matmuls(models, target, floor):
    """A Scan RNN: both body MatMuls quantized with ranges from the values inside the body (its
    state input included); int8 ~35 dB, fp8 ~26 dB over 8 recurrent steps."""
    rng = np.random.default_rng(6)
    r = qcompile.compile(models["scan"], target, calib={"x": rng.standard_normal((64, 16)).astype(np.float32)},
                         eval={"x": rng.standard_normal((32, 16)).astype(np.float32)}, batch_size=8)
    assert {n for n, row in _rows(r).items() if "weight_format" in row} == {"body_mm_x", "body_mm_h", "head"}
    assert r.report["outputs"]["y"]["sqnr_db"] >= floor


def test_local_function_matmuls(models):
    """Calls of a model-local function are inlined, so their MatMuls are quantized like any other."""
    rng = np.random.default_rng(7)
    r = qcompile.compile(models["func"], "int8", calib={"x": rng.standard_normal((96, 32)).astype(np.float32)})
    assert sum("weight_format" in row for row in r.report["layers"]) == 3
    assert not r.model.functions or all(k[0] == "qcompile" for k in r.model.functions)
    assert r.report["outputs"]["logits"]["sqnr_db"] >= 25.0  # int8, 3 layers (~30 dB measured)


def test_nothing_left_after_calibration_is_refused(models):
    """All quantizable nodes in branches no sample takes: refused with the reason (never written
    with guessed ranges)."""
    src = onnx.load(str(models["vad"]))
    with pytest.raises(UnsupportedModelError, match="not computed on the calibration data"):
        qcompile.compile(src, "int8", calib=fm.vad_data(32, seed=1, srs=(16000,)), eval=fm.vad_data(16, seed=2),
                         options=PlanOptions(exclude_nodes=("/b16/*",)))


def test_expose_reads_body_values_and_restores_the_model(models):
    """Values inside a Scan body (a body input, a state output, intermediates) read through
    `expose` match a numpy reimplementation of the body; the model is byte-identical afterwards."""
    m = ir.load(models["scan"])
    before = helpers.snapshot(m)
    x = np.random.default_rng(8).standard_normal((5, 16)).astype(np.float32)
    names = ["x_t", "h_in", "h_out", "s", "y"]
    (_, vals), = list(stream_values(m, names, [{"x": x}]))
    assert helpers.snapshot(m) == before
    init = {k: v.const_value.numpy() for k, v in m.graph.node(0).attributes["body"].as_graph().initializers.items()}
    h = np.zeros((1, 32), np.float32)
    hs_in, hs_out = [], []
    for t in range(5):
        hs_in.append(h)
        h = np.tanh(x[t : t + 1] @ init["Wx"] + h @ init["Wh"] + init["b"])
        hs_out.append(h)
    np.testing.assert_array_equal(vals["x_t"], x)
    np.testing.assert_allclose(vals["h_in"], np.stack(hs_in), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vals["h_out"], np.stack(hs_out), rtol=1e-5, atol=1e-6)
    with expose(m, ["s"]) as outs:
        assert outs["s"] in {v.name for v in m.graph.outputs}
    assert helpers.snapshot(m) == before


def test_deterministic_and_input_untouched(models, tmp_path):
    """Same model, data and seed -> identical output bytes; the input file is never modified
    (the calibration instrumentation of bodies is undone)."""
    digest = helpers.sha256(models["vad"])
    outs = []
    for k in range(2):
        r = qcompile.compile(models["vad"], "int8", calib=fm.vad_data(48, seed=1), eval=fm.vad_data(16, seed=2))
        qcompile.save_model(r.model, tmp_path / f"q{k}.onnx")
        outs.append((tmp_path / f"q{k}.onnx").read_bytes())
    assert outs[0] == outs[1]
    assert helpers.sha256(models["vad"]) == digest
