"""The compile as data (issue 10): the declared stage list, the stateless passes, the backend stages
alone on a saved Q/DQ model, the stored forms read back from the graph, the one lowering policy,
`qcompile explain` and `--dump-after`."""
from __future__ import annotations

import inspect
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
from qcompile import pipeline, stages
from qcompile.analyze import make_plan, plan_on
from qcompile.backends.onnxruntime import kernels
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.data import ArrayDataset, InputInfo
from qcompile.errors import InputError
from qcompile.passes.insert_qdq import InsertQDQPass
from qcompile.passes.normalize import NormalizePass
from qcompile.passes.smooth_quant import SMOOTHED_KEY, SmoothQuantPass, smoothable
from qcompile.stored import stored_form
from qcompile.targets import get_target
from qcompile.weights import quantize


def _serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(tiny_models.mlp(), str(path))
    return path


CASES = [("w4", "auto"), ("w4", "function"), ("mxfp4", "native"), ("nvfp4", "integer"), ("int8", "auto"),
         ("fp8", "auto"), ("fp4", "integer"), ("mxfp6", "auto")]


@pytest.mark.parametrize("target, lowering", CASES)
def test_backend_stages_alone_give_the_full_compile(mlp_path, tmp_path, target, lowering):
    """`qcompile.lower` on the model written by --dump-after InsertQDQPass is byte-identical to
    what the full compile emits: the backend stages need nothing but the graph."""
    if lowering == "native":
        pytest.importorskip("qcompile.native").build()
    calib = tiny_models.inputs_for(tiny_models.mlp(), 48, seed=1)
    r = qcompile.compile(str(mlp_path), target, calib=calib, accuracy_level=0, lowering=lowering, min_sqnr=-100.0,
                         dump_after=("InsertQDQPass",), dump_dir=tmp_path)
    dumped = r.report["dumps"]["InsertQDQPass"]
    lowered = qcompile.lower(dumped, lowering=lowering, accuracy_level=0)
    assert _serialized(lowered) == _serialized(r.model)
    kernels_used = {row.get("kernel") for row in r.report["layers"]}
    assert None not in kernels_used and kernels_used <= {k.name for k in kernels.KERNELS}


def test_explain_names_the_kernels_the_compile_chooses(mlp_path):
    """explain decides without data what the compile then does, layer by layer."""
    calib = tiny_models.inputs_for(tiny_models.mlp(), 48, seed=1)
    for target, lowering in [("w4", "auto"), ("int8", "auto"), ("fp8", "integer"), ("nvfp4", "function")]:
        e = qcompile.explain(str(mlp_path), target, lowering)
        r = qcompile.compile(str(mlp_path), target, calib=calib, lowering=lowering, min_sqnr=-100.0, validate=False)
        assert {row["node"]: row["kernel"] for row in e["layers"]} == {
            row["node"]: row["kernel"] for row in r.report["layers"] if "kernel" in row}, target
        names = [p["stage"] for p in e["pipeline"]]
        assert [p["name"] for p in r.report["passes"] if p["name"] in names] == [p["name"] for p in r.report["passes"]], \
            "every stage the compile ran is in the declared list"
        ran = [p["name"] for p in r.report["passes"]]
        assert ran == [n for n in names if n in ran], "in the declared order"


def test_explain_cli(mlp_path):
    out = subprocess.run([sys.executable, "-m", "qcompile.cli", "explain", str(mlp_path), "-t", "w4"],
                         capture_output=True, text=True, check=True).stdout
    assert "backend   LowerToMatMulNBitsPass" in out
    assert "fc1 (MatMul): weight int4 block -> com.microsoft.MatMulNBits" in out
    assert "not onnxruntime QDQ fusion: activation is not read through a DequantizeLinear" in out
    js = json.loads(subprocess.run([sys.executable, "-m", "qcompile.cli", "explain", str(mlp_path), "-t", "int8", "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert {row["kernel"] for row in js["layers"]} == {"onnxruntime QDQ fusion"}


def test_dump_after_cli(mlp_path, tmp_path):
    """--dump-after writes the model after each named stage; an unknown stage is a one-line error."""
    out = tmp_path / "out.onnx"
    np.savez(tmp_path / "calib.npz", **tiny_models.inputs_for(tiny_models.mlp(), 48, seed=1))
    cmd = [sys.executable, "-m", "qcompile.cli", str(mlp_path), "-t", "int8", "--calib", str(tmp_path / "calib.npz"),
           "-o", str(out), "--dump-dir", str(tmp_path), "-q"]
    subprocess.run(cmd + ["--dump-after", "FoldBatchNormPass", "--dump-after", "InsertQDQPass"], check=True)
    folded = onnx.load(str(tmp_path / "after-FoldBatchNormPass.onnx"))
    qdq = onnx.load(str(tmp_path / "after-InsertQDQPass.onnx"))
    assert not any(n.op_type == "QuantizeLinear" for n in folded.graph.node)
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    bad = subprocess.run(cmd + ["--dump-after", "NoSuchPass"], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "no such stage" in bad.stderr
    with pytest.raises(InputError, match="no such stage"):
        pipeline.settings_for("int8", dump_after=("nope",))


def test_compile_is_the_declared_list():
    """pipeline.compile builds the settings and runs the declared stages; nothing else (issue 10)."""
    body = inspect.getsource(pipeline.compile).split('"""')[-1]
    assert len([ln for ln in body.splitlines() if ln.strip()]) <= 22
    s = pipeline.settings_for("int8")
    groups = [st.group for st in stages.pipeline_for(s)]
    assert groups == sorted(groups, key=["front", "plan", "quantize", "backend", "emit", "report", "validate",
                                         "finish"].index), "groups in order"
    assert "smoothing-search" in {st.name for st in stages.pipeline_for(s)}  # int8 smooths
    assert "smoothing-search" not in {st.name for st in stages.pipeline_for(pipeline.settings_for("w4"))}


def _smoothed_attention():
    proto = tiny_models.attention()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    plan = make_plan(model, get_target("int8"))
    rng = np.random.default_rng(5)
    scales = {v: rng.uniform(0.5, 2.0, 32).astype(np.float32) for v in smoothable(model.graph, plan)}
    return proto, model, plan, scales


def test_smooth_quant_pass_contract():
    """SmoothQuantPass under the pass contract: a second run with the same scales smooths nothing
    twice (it used to divide the activation by s again), and the graph computes the float function."""
    proto, model, plan, scales = _smoothed_attention()
    assert scales, "the attention block has smoothable activations"
    feeds = tiny_models.inputs_for(proto, 4, seed=2)
    ref = helpers.session(proto, "disable").run(None, feeds)[0]
    helpers.assert_pass_contract(SmoothQuantPass(plan, scales), model, expect_modified=True)
    after = plan_on(model.graph, plan)  # the plan renamed to the smoothed graph: also a no-op
    assert helpers.assert_pass_contract(SmoothQuantPass(after, scales), model).modified is False
    assert sum(SMOOTHED_KEY in n.metadata_props for n in model.graph) >= len(scales)
    got = helpers.session(ir.to_proto(model), "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_smoothing_stats_read_more_samples_when_rows_are_few():
    """One row per sample (an MLP): SMOOTH_SAMPLES spread samples cannot fill the search's rows, so
    a second pass reads as many as fill them (here all 200); the maxima are then those of all the
    data. (The README example fell 0.6 dB when the search scored 32 rows.)"""
    from qcompile.context import CompileContext

    proto = tiny_models.mlp()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    plan = make_plan(model, get_target("int8"))
    feeds = tiny_models.inputs_for(proto, 200, seed=3)
    ctx = CompileContext(pipeline.settings_for("int8"), proto)
    ctx.model, ctx.calib = model, ArrayDataset(feeds, InputInfo.of_model(model))
    names = sorted(smoothable(model.graph, plan))
    assert names and stages.SMOOTH_SAMPLES < 200 <= stages.SEARCH_ROWS
    amax, rows = stages._smoothing_stats(ctx, names)
    assert all(rows[v].shape[0] == 200 for v in names)
    assert "x" in names  # the graph input itself: its maxima are those of all the data
    np.testing.assert_array_equal(amax["x"], np.abs(feeds["x"]).max(axis=0))


def test_smoothing_search_does_not_depend_on_threads():
    """The smoothing search runs its activations on a thread pool with one BLAS thread each: its
    choice is the same with 1 and 2 threads, and an outlier channel makes it smooth something."""
    from qcompile.passes.smooth_quant import choose_scales

    _, model, plan, _ = _smoothed_attention()
    rng = np.random.default_rng(7)
    names = smoothable(model.graph, plan)
    rows = {v: rng.standard_normal((512, 32)).astype(np.float32) * np.where(np.arange(32) == 3, 40.0, 1.0)
            for v in names}
    amax = {v: np.abs(r).max(axis=0) for v, r in rows.items()}
    one, two = (choose_scales(model.graph, plan, amax, rows, threads=t) for t in (1, 2))
    assert one and one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("target", ["int8", "w4", "w8", "fp8", "fp4", "fp6", "mxfp4", "mxfp6", "mxint8", "nvfp4", "w:e3m4"])
def test_stored_form_read_back(target):
    """Every weight's stored form read back from the graph (`qcompile.stored`) is the one the
    quantizer made: same format, codes, scales, axis and block (what the lowering needs)."""
    proto = tiny_models.mlp()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    plan = make_plan(model, get_target(target))
    data = ArrayDataset(tiny_models.inputs_for(proto, 16, seed=1), InputInfo.of_model(model))
    plan = pipeline.calibrate_plan(model, plan, data)
    weights = {(n, q.value): (model.graph.initializers[q.value].const_value.numpy().copy(), q.spec)
               for n, node in plan.nodes.items() for q in node.inputs.values() if q.role == "weight"}
    InsertQDQPass(plan, CAPABILITIES)(model)
    nodes = {n.name: n for n in model.graph}
    assert weights
    for (name, _), (arr, spec) in weights.items():
        t = stored_form(nodes[name].inputs[1].producer())
        ref = quantize(arr, spec)
        assert t is not None, (target, name)
        assert t.fmt.name == ref.fmt.name and (t.axis, t.block_size) == (ref.axis, ref.block_size), (target, name)
        assert t.tensor_scale == ref.tensor_scale
        np.testing.assert_array_equal(np.asarray(t.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(t.scale).reshape(-1), np.asarray(ref.scale).reshape(-1))


def test_lowering_policy_is_one_ordered_table():
    """Decisions come from KERNELS in order; every kernel tried before the chosen one gives a reason."""
    proto = tiny_models.mlp()
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    InsertQDQPass(make_plan(model, get_target("w:e4m3fn")), CAPABILITIES)(model)  # weight-only FP8
    from qcompile.backends.onnxruntime.lower_nbits import _layer

    layer = next(_layer(n, CAPABILITIES) for n in model.graph if _layer(n, CAPABILITIES) is not None)
    d = kernels.choose(layer, "integer")
    assert d.kernel.name == "decoder + MatMul"  # E4M3's grid needs more 4-bit digit planes than MatMulNBits sums
    assert set(d.rejected) == {"onnxruntime QDQ fusion", "com.microsoft.MatMulNBits"} and all(d.rejected.values())
    assert kernels.choose(layer, "function").kernel.name == "decoder + MatMul"
    with pytest.raises(ValueError):
        kernels.choose(layer, "fastest")


def test_every_pass_class_has_a_contract_test():
    """Issue 10, acceptance 2, kept true as passes are added: every onnx_ir pass qcompile defines
    is named in a test module that runs `helpers.assert_pass_contract` (honest `modified`, second
    run a no-op, checker-valid)."""
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    import onnx_ir as ir

    import qcompile as pkg

    classes = set()
    for mod in pkgutil.walk_packages(pkg.__path__, "qcompile."):
        if mod.name.endswith("__main__") or ".native" in mod.name:
            continue
        try:
            m = importlib.import_module(mod.name)
        except ImportError:  # an optional extra (e.g. the zoo's torch) that is not installed
            continue
        classes |= {n for n, c in inspect.getmembers(m, inspect.isclass)
                    if issubclass(c, ir.passes.PassBase) and c.__module__ == m.__name__}
    assert len(classes) >= 10, classes
    tests = [p.read_text() for p in Path(__file__).parent.rglob("test_*.py")]
    tested = {c for c in classes if any("assert_pass_contract" in t and f"{c}(" in t for t in tests)}
    assert classes - tested == set(), "passes without a contract test"


def test_float_reference_is_reused_for_the_same_files(tmp_path, monkeypatch):
    """A second compile of the same model file on the same held-out file reuses the float outputs
    (the float model then runs only over the samples the activation SQNR reads), with the same
    validation figures; touching the held-out file makes it recompute."""
    proto = tiny_models.mlp()
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    feeds = tiny_models.inputs_for(proto, 96, seed=1)
    calib, held = tmp_path / "c.npz", tmp_path / "e.npz"
    np.savez(calib, **feeds)
    np.savez(held, **tiny_models.inputs_for(proto, 96, seed=2))
    runs = []
    real = stages.stream_values

    def counting(model_, names, batches, *a, **kw):
        batches = list(batches)
        runs.append(len(batches))
        return real(model_, names, iter(batches), *a, **kw)

    monkeypatch.setattr(stages, "stream_values", counting)
    stages._FLOAT_REFERENCE.clear()
    first = qcompile.compile(str(model), "int8", calib=str(calib), eval=str(held))
    n_first = list(runs)
    second = qcompile.compile(str(model), "int8", calib=str(calib), eval=str(held))
    assert second.report["outputs"] == first.report["outputs"]
    assert len(stages._FLOAT_REFERENCE) == 1
    # the float reference is each compile's last pass: 12 batches of 8, then only the 64 samples
    # of the activation SQNR
    assert (n_first[-1], runs[-1]) == (12, stages.ACTIVATION_SQNR_SAMPLES // 8)
    np.savez(held, **tiny_models.inputs_for(proto, 96, seed=3))  # new contents, new mtime/size key
    third = qcompile.compile(str(model), "int8", calib=str(calib), eval=str(held))
    assert third.report["outputs"] != first.report["outputs"]
