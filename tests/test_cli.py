"""The command line, run as a user runs it (a subprocess of `python -m qcompile.cli`).

Contract (ARCHITECTURE 6): exit 0 ok, 1 error with a one-line reason on stderr (no traceback unless
-v), 2 usage, 3 validation below tolerance; stdout carries only the result (the output path or the
--json report); the input file is never modified and nothing is written on failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import tiny_models

REPORT_KEYS = {"schema", "input", "output", "target", "sizes", "compile_seconds", "peak_rss_bytes", "passes", "outputs",
               "layers", "verdict"}


def _start(args, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.Popen([sys.executable, "-m", "qcompile.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def qcompile(*args, cwd: Path) -> subprocess.CompletedProcess:
    return _finish(_start(args, cwd))


def qcompile_many(*calls, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Independent invocations run concurrently (each one pays ~1 s of imports)."""
    return [_finish(p) for p in [_start(args, cwd) for args in calls]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("assets")
    proto = tiny_models.mlp()
    onnx.save(proto, d / "mlp.onnx")
    np.savez(d / "calib.npz", **tiny_models.inputs_for(proto, 96, seed=1))
    np.savez(d / "eval.npz", **tiny_models.inputs_for(proto, 32, seed=2))
    blob = (d / "mlp.onnx").read_bytes()
    (d / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    (d / "text.onnx").write_text("this is not an ONNX model\n")
    g = h.make_graph([h.make_node("Relu", ["x"], ["r"]), h.make_node("Add", ["r", "c"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 64])],
                     [nh.from_array(np.ones(64, np.float32), "c")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), d / "relu_add.onnx")
    newer = tiny_models.mlp()
    newer.opset_import[0].version = 27
    onnx.save(newer, d / "opset27.onnx")
    return d


@pytest.fixture
def work(assets, tmp_path) -> Path:
    for f in assets.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _error_line(stderr: str) -> str:
    """The single error line of stderr (warnings aside); fails unless there is exactly one."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    return lines[0]


# --- bad input (issue point 5) -------------------------------------------------------------------
BAD_INPUTS = {
    # case: (args, exit code, the error line must contain)
    "missing file": (["missing.onnx", "-t", "int8"], 1, "missing.onnx: no such file"),
    "not onnx (text)": (["text.onnx", "-t", "int8"], 1, "text.onnx: not a readable ONNX model"),
    "truncated onnx": (["truncated.onnx", "-t", "int8"], 1, "truncated.onnx: not a readable ONNX model"),
    "unknown target": (["mlp.onnx", "-t", "int9"], 2, "unknown target 'int9'"),
    "nothing to quantize": (["relu_add.onnx", "-t", "int8", "--calib", "calib.npz"], 1, "nothing to quantize for target int8"),
    "output is the input": (["mlp.onnx", "-t", "w8", "--calib", "calib.npz", "-o", "mlp.onnx"], 1, "output path is the input model"),
    "bad calibration data": (["mlp.onnx", "-t", "w8", "--calib", "text.onnx"], 1, "not a readable .npz"),
    "bad composed target": (["mlp.onnx", "-t", "w:e9m30"], 2, "format 'e9m30'"),
    "composed target without w:": (["mlp.onnx", "-t", "w:int4,b:int8"], 2, "expected w:FORMAT[/BLOCK][,a:FORMAT]"),
    # float8 weights with int8 activations failed to load in onnxruntime (its integer fusions take them for int8)
    "float weights, integer activations": (["mlp.onnx", "-t", "w:e4m3fn,a:int8"], 2, "integer activations need integer weights"),
    "bad lowering": (["mlp.onnx", "-t", "mxfp4", "--lowering", "fast"], 2, "'fast' is not one of"),
}


@pytest.fixture(scope="module")
def bad_input_runs(assets, tmp_path_factory):
    """case -> (work dir, listing and digests before, result); all cases run concurrently."""
    prepared = {}
    for case in BAD_INPUTS:
        d = tmp_path_factory.mktemp("bad")
        for f in assets.iterdir():
            shutil.copy(f, d / f.name)
        prepared[case] = (d, _listing(d), {f.name: helpers.sha256(f) for f in d.iterdir()})
    procs = {case: _start(BAD_INPUTS[case][0], prepared[case][0]) for case in BAD_INPUTS}
    return {case: (*prepared[case], _finish(p)) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(bad_input_runs, case):
    _, code, message = BAD_INPUTS[case]
    work, before, digests, r = bad_input_runs[case]
    assert r.returncode == code, r.stderr
    line = _error_line(r.stderr)
    assert message in line, line
    if code == 1:
        assert line.startswith("qcompile: error: ")
    assert r.stdout == "", "nothing on stdout when there is no result"
    assert _listing(work) == before, "no output (or temporary) file is left behind"
    assert {f: helpers.sha256(work / f) for f in before} == digests, "inputs are byte-identical afterwards"


def test_traceback_only_with_verbose(work):
    r = qcompile("text.onnx", "-t", "int8", "-v", cwd=work)
    assert r.returncode == 1 and "Traceback" in r.stderr and "qcompile: error: text.onnx" in r.stderr


def test_opset_too_new_names_the_reason(work):
    r = qcompile("opset27.onnx", "-t", "int8", "--calib", "calib.npz", cwd=work)
    assert r.returncode == 1
    assert "opset 27 is newer than onnxruntime supports" in _error_line(r.stderr)


# --- results ---------------------------------------------------------------------------------------
def test_validation_failure_exits_3_without_output(work):
    before = _listing(work)
    digest = helpers.sha256(work / "mlp.onnx")
    r = qcompile("mlp.onnx", "-t", "w8", "--calib", "calib.npz", "--eval", "eval.npz", "--min-sqnr", "200", cwd=work)
    assert r.returncode == 3, r.stderr
    line = _error_line(r.stderr)
    assert "below 200" in line and "output not written" in line
    assert r.stdout == ""
    assert _listing(work) == before and helpers.sha256(work / "mlp.onnx") == digest


def test_validation_failure_with_json_still_reports(work):
    r = qcompile("mlp.onnx", "-t", "w8", "--calib", "calib.npz", "--eval", "eval.npz", "--min-sqnr", "200", "--json", cwd=work)
    assert r.returncode == 3
    report = json.loads(r.stdout)
    assert report["output"] is None and report["verdict"]["passed"] is False
    assert not (work / "mlp.w8.onnx").exists()


def test_stdout_is_only_the_output_path(work):
    digest = helpers.sha256(work / "mlp.onnx")
    r = qcompile("mlp.onnx", "-t", "int8", "--calib", "calib.npz", "--eval", "eval.npz", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mlp.int8.onnx\n"
    assert "SQNR" in r.stderr, "the summary goes to stderr"
    out = work / "mlp.int8.onnx"
    onnx.checker.check_model(onnx.load(out), full_check=True)
    feeds = tiny_models.inputs_for(tiny_models.mlp(), 16, seed=3)
    assert helpers.sqnr_db(helpers.run(work / "mlp.onnx", feeds)[0], helpers.run(out, feeds)[0]) > 25
    assert helpers.sha256(work / "mlp.onnx") == digest
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_json_report(work):
    r = qcompile("mlp.onnx", "-t", "fp8", "--calib", "calib.npz", "--eval", "eval.npz", "-o", "out.onnx", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout holds nothing but the JSON
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert report["target"] == "fp8" and report["output"] == "out.onnx" and report["input"] == "mlp.onnx"
    assert report["outputs"]["logits"]["sqnr_db"] > 20 and report["outputs"]["logits"]["samples"] == 32
    assert report["verdict"]["passed"] is True
    assert report["sizes"]["output_bytes"] == (work / "out.onnx").stat().st_size
    assert {row["node"] for row in report["layers"]} == {"fc1", "fc2"}
    assert report["compile_seconds"] > 0 and report["peak_rss_bytes"] > 0
    assert any(p["name"] == "LowerForOnnxruntimePass" and p["modified"] for p in report["passes"])


@pytest.mark.parametrize("target, edit", [("w8", "weight int4 block"), ("a16w8", "activation int8")])
def test_save_plan_edit_and_replay(work, target, edit):
    r = qcompile("mlp.onnx", "-t", target, "--calib", "calib.npz", "--eval", "eval.npz", "-o", "a.onnx", "--save-plan", "plan.json", cwd=work)
    assert r.returncode == 0, r.stderr
    plan = json.loads((work / "plan.json").read_text())
    fc1 = plan["nodes"]["fc1"]["inputs"]
    if edit == "weight int4 block":
        assert fc1["1"]["format"] == "int8"
        fc1["1"]["format"] = "int4"
        fc1["1"]["granularity"] = {"kind": "block", "axis": 0, "size": 32}
    else:
        assert fc1["0"]["format"] == "int16" and fc1["0"]["clip"]
        fc1["0"]["format"] = "int8"
    (work / "edited.json").write_text(json.dumps(plan))
    r = qcompile("mlp.onnx", "-t", target, "--calib", "calib.npz", "--eval", "eval.npz", "-o", "b.onnx", "--plan", "edited.json",
                 "--save-plan", "replayed.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "replayed.json").read_text())["nodes"]["fc1"] == plan["nodes"]["fc1"], "the edit is honoured"
    a, b = onnx.load(work / "a.onnx"), onnx.load(work / "b.onnx")

    def reader_types(m):
        """fc1's input index -> the element type feeding its DequantizeLinear (and the DQ attributes)."""
        prod = {o: n for n in m.graph.node for o in n.output}
        types = {i.name: i.data_type for i in m.graph.initializer}
        fc1_node = next(n for n in m.graph.node if n.name == "fc1")
        out = {}
        for idx, name in enumerate(fc1_node.input):
            if name not in prod or prod[name].op_type != "DequantizeLinear":
                out[idx] = (None, name)  # float input
                continue
            dq = prod[name]
            src = dq.input[0]
            src_type = types.get(src) or types[prod[src].input[2]]  # activation: Q's zero point type
            out[idx] = (src_type, {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute})
        return out

    if edit == "weight int4 block":
        # weight-only: fc1 runs as exact MatMulNBits digit planes on the float activation x:
        # int8 per channel needs two 4-bit planes, int4 in blocks of 32 one
        def planes(m):
            return [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("fc1")]

        assert len(planes(a)) == 2 and len(planes(b)) == 1
        attrs = {x.name: onnx.helper.get_attribute_value(x) for x in planes(b)[0].attribute}
        assert attrs["block_size"] == 32 and attrs["bits"] == 4 and planes(b)[0].input[0] == "x"
    else:
        ta, tb = reader_types(a), reader_types(b)
        assert ta[0][0] == T.INT16 and tb[0][0] == T.INT8
        assert ta[1] == tb[1], "the weight is unchanged"
    feeds = tiny_models.inputs_for(tiny_models.mlp(), 16, seed=3)
    assert np.isfinite(helpers.run(work / "b.onnx", feeds)[0]).all()


def test_composed_target_and_lowering(work):
    """`w:FORMAT,a:FORMAT` picks any two formats; --lowering chooses how weights onnxruntime lacks run."""
    r, rf, ri = qcompile_many(
        ["mlp.onnx", "-t", "w:e3m4,a:e4m3", "--calib", "calib.npz", "--eval", "eval.npz", "--json", "-o", "c.onnx"],
        ["mlp.onnx", "-t", "mxfp4", "--calib", "calib.npz", "--lowering", "function", "-o", "f.onnx"],
        ["mlp.onnx", "-t", "mxfp4", "--calib", "calib.npz", "--lowering", "integer", "--accuracy-level", "4", "-o", "i.onnx"],
        cwd=work)
    for x in (r, rf, ri):
        assert x.returncode == 0, x.stderr
    report = json.loads(r.stdout)
    assert report["target"] == "w:e3m4,a:e4m3" and {row["weight_format"] for row in report["layers"]} == {"e3m4"}
    assert {row["activation_format"] for row in report["layers"]} == {"e4m3"}
    ops = helpers.op_counts(onnx.load(work / "c.onnx"))
    assert ops["DequantizeMinifloat"] == 2, "E3M4 (max 30) has no onnxruntime type: decoded by a qcompile op"
    assert ops["Cast"] >= 4, "E4M3FN activations: the Div/Cast/Cast/Mul lowering"
    f, i = onnx.load(work / "f.onnx"), onnx.load(work / "i.onnx")
    assert helpers.op_counts(f)["DequantizeMX"] == 2 and helpers.op_counts(f)["MatMulNBits"] == 0
    levels = [a.i for n in i.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * 4, "two layers x two digit planes, at the requested accuracy level"


# --- other subcommands -----------------------------------------------------------------------------
def test_inspect(work):
    r, rj, rbad = qcompile_many(["inspect", "mlp.onnx"], ["inspect", "mlp.onnx", "--json"], ["inspect", "text.onnx"], cwd=work)
    assert r.returncode == 0, r.stderr
    assert "opset 17" in r.stdout and "quantizable nodes (2)" in r.stdout
    assert "  fc1\n" in r.stdout and "  fc2\n" in r.stdout and "MatMul x1" in r.stdout
    j = json.loads(rj.stdout)
    assert j["quantizable"] == ["fc1", "fc2"] and j["ops"] == {"MatMul": 1, "Add": 1, "Relu": 1, "Gemm": 1}
    assert j["params"] == 64 * 128 + 128 + 10 * 128 + 10
    assert rbad.returncode == 1 and "not a readable ONNX model" in _error_line(rbad.stderr)


def test_formats(work):
    r, rj = qcompile_many(["formats"], ["formats", "--json"], cwd=work)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    cols = header.split()
    assert cols[:6] == ["name", "kind", "bits", "max", "min", "normal"] and "ORT" in cols
    ort_col = cols.index("ORT") - 1  # "min normal" is one column in the rows
    native = {row.split()[0]: row.split()[ort_col] for row in rows}
    assert native["e4m3fn"] == "yes" and native["e5m2"] == "yes" and native["int8"] == "yes" and native["int4"] == "yes"
    assert native["e2m1"] == "no" and native["mxfp4"] == "no" and native["nvfp4"] == "no"
    j = {f["name"]: f for f in json.loads(rj.stdout)["formats"]}
    assert j["e4m3fn"]["max"] == 448 and j["e4m3fn"]["native"] is True
    assert j["nvfp4"]["bits"] == 4.5 and j["mxfp4"]["bits"] == 4.25 and j["e2m1"]["native"] is False


def test_without_calibration_data_then_validate(work):
    # no --calib: inputs are synthesized from the model's input types, with a warning on stderr
    r = qcompile("mlp.onnx", "-t", "w8", "-o", "w8.onnx", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "w8.onnx\n" and "synthesizing" in r.stderr and "Traceback" not in r.stderr
    r, low = qcompile_many(["validate", "mlp.onnx", "w8.onnx", "--eval", "eval.npz", "--json"],
                           ["validate", "mlp.onnx", "w8.onnx", "--eval", "eval.npz", "--min-sqnr", "200"], cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["logits"]["sqnr_db"] > 30
    assert low.returncode == 3 and "below 200" in _error_line(low.stderr)


def test_zoo_commands(tmp_path):
    """`qcompile zoo build` rejects unknown names (usage, exit 2); `qcompile zoo data` writes real samples."""
    bad, data = qcompile_many(("zoo", "build", "no-such-model"),
                              ("zoo", "data", "minilm", "--split", "eval", "-n", "4", "--cache", tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "known: minilm" in bad.stderr and bad.stdout == ""
    assert data.returncode == 0, data.stderr
    path = Path(data.stdout.strip())
    with np.load(path) as z:
        assert set(z.files) == {"input_ids", "attention_mask"} and z["input_ids"].shape[0] == 4


# --- foreign models (issue 9, "What was seen" 3) -----------------------------------------------------
def test_third_party_warning_prints_no_traceback(tmp_path):
    """A model whose declared value_info contradicts shape inference: onnx_ir logs the failure with
    its traceback (logger.warning(..., exc_info=e)); without -v that is one line. On e10cd69 the
    full traceback reached stderr."""
    rng = np.random.default_rng(0)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y0"], name="mm"), h.make_node("Relu", ["y0"], ["y"], name="r")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
                     [nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")],
                     value_info=[h.make_tensor_value_info("y0", T.FLOAT, ["N", 5])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    r = qcompile("m.onnx", "-t", "int8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "File \"" not in r.stderr
    warning = [line for line in r.stderr.splitlines() if "Shape inference failed" in line]
    assert len(warning) == 1 and "InferenceError" in warning[0]
    v = qcompile("m.onnx", "-t", "int8", "-o", "v.onnx", "-v", cwd=tmp_path)
    assert "Traceback" in v.stderr  # -v keeps everything


def _cnn_of_convs(path: Path, n: int = 6) -> None:
    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits.append(nh.from_array((rng.standard_normal((8, 8 if i else 3, 3, 3)) / 6).astype(np.float32), f"k{i}"))
        nodes += [h.make_node("Conv", [x, f"k{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info(x, T.FLOAT, ["N", 8, 8, 8])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)


def test_refusals_name_their_reason(tmp_path):
    """w4 on an all-Conv CNN says it quantizes MatMul/Gemm only and which targets take the Convs
    (e10cd69: 'no quantizable op (Conv, ConvTranspose, MatMul, Gemm ...)' about a model full of Convs)."""
    _cnn_of_convs(tmp_path / "cnn.onnx")
    r, excluded = qcompile_many(["cnn.onnx", "-t", "w4"], ["cnn.onnx", "-t", "int8", "--exclude-op", "Conv"], cwd=tmp_path)
    assert r.returncode == 1
    line = _error_line(r.stderr)
    assert line == ("qcompile: error: nothing to quantize for target w4: 6 Conv: the target quantizes MatMul/Gemm only "
                    "(int8, a16w8, w8, fp8 quantize Conv)"), line
    assert excluded.returncode == 1
    assert "6 Conv: excluded (--exclude-op / --exclude-node)" in _error_line(excluded.stderr)


def test_input_shape_option(tmp_path):
    """--input-shape fixes a free dim for synthesized data; malformed values are usage errors."""
    rng = np.random.default_rng(2)
    g = h.make_graph([h.make_node("Conv", ["x", "k"], ["y"], strides=[16], name="stft")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["batch", 1, "samples"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8, None])],
                     [nh.from_array(rng.standard_normal((8, 1, 32)).astype(np.float32), "k")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    ok, bad, unknown = qcompile_many(["m.onnx", "-t", "int8", "--input-shape", "x:1,1,512", "--json"],
                                     ["m.onnx", "-t", "int8", "--input-shape", "x=1,512"],
                                     ["m.onnx", "-t", "int8", "--input-shape", "y:1,8,3"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 2 and "expected NAME:DIMS" in bad.stderr
    assert unknown.returncode == 1 and "--input-shape names ['y'], not inputs of the model" in _error_line(unknown.stderr)
