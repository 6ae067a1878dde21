"""Models with external data (issue 9, "> 2 GB by design"), at CI size: a 4 MB model whose weights live
in an external data file, with the size threshold lowered by argument where a test needs it.

Checked: the weights stay memory-mapped where they are (a session file hard-links the input's data
file instead of copying it), the output is written with external data (auto / always / never), it
loads and runs and gives the compiled model's own outputs bit for bit, the input files are never
modified or overwritten, and the w4 output has no decode chain: its MatMulNBits read initializers.

Tolerances: the saved output against the in-memory compiled model is the same graph and bytes:
exact (atol 0). Against the float model, the target's own validation floor (the compile gates it).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import helpers
import qcompile
from qcompile import external
from qcompile.errors import InputError

DIM, LAYERS = 512, 4  # 4 MiB of float32 weights


def _write_model(d: Path, external_data: bool = True) -> Path:
    """y = x @ W0 @ ... @ W3 (seeded), every weight in m.onnx.data (or inline)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes.append(h.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", DIM])],
                     [h.make_tensor_value_info(x, T.FLOAT, ["N", DIM])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    path = d / "m.onnx"
    if external_data:
        onnx.save(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _digest(paths) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)}


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """The external-data model compiled to w4 and saved with `auto` (the input used external data)."""
    d = tmp_path_factory.mktemp("ext")
    src = _write_model(d)
    inputs = [src, d / "m.onnx.data"]
    before = _digest(inputs)
    result = qcompile.compile(src, "w4", calib=_data(16, 1), eval=_data(16, 2))
    out = d / "m.w4.onnx"
    size = qcompile.save_model(result.model, out)
    return {"src": src, "inputs": inputs, "before": before, "result": result, "out": out, "size": size}


def test_output_has_external_data_and_loads(w4):
    out, data = w4["out"], w4["out"].with_name("m.w4.onnx.data")
    assert data.is_file() and w4["size"] == out.stat().st_size + data.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.data_location == T.EXTERNAL]
    assert big and all(e.value == data.name for t in big for e in t.external_data if e.key == "location")
    x = _data(3, 7)
    (saved,) = helpers.session(out).run(None, x)  # loads from the path, external data beside it
    (memory,) = helpers.session(w4["result"].model).run(None, x)
    np.testing.assert_array_equal(saved, memory)
    assert w4["result"].passed


def test_input_files_untouched(w4):
    assert _digest(w4["inputs"]) == w4["before"]
    assert sorted(p.name for p in w4["src"].parent.iterdir()) == ["m.onnx", "m.onnx.data", "m.w4.onnx", "m.w4.onnx.data"]


def test_w4_has_no_decode_chain(w4):
    """Only MatMulNBits remain, every one of their weight inputs an initializer (the kernel's layout)."""
    proto = onnx.load(str(w4["out"]), load_external_data=False)
    assert {n.op_type for n in proto.graph.node} == {"MatMulNBits"}
    inits = {t.name for t in proto.graph.initializer}
    for n in proto.graph.node:
        assert all(i in inits for i in n.input[1:] if i), n.name
    assert not proto.functions


def test_session_reads_the_weights_in_place(tmp_path):
    """A session of an in-memory model maps the input's data file itself: the session file is a
    hidden temporary file beside it (no copy, no hard link), gone once the session exists."""
    src = _write_model(tmp_path)
    model = qcompile.load_model(src)
    x = _data(2, 3)
    ref = x["x"].astype(np.float64)
    for i in range(LAYERS):
        ref = ref @ model.graph.initializers[f"w{i}"].const_value.numpy()
    with external.session_path(model) as path:
        assert path.parent == tmp_path and path.name.startswith(".qcompile-session-")
        assert (tmp_path / "m.onnx.data").stat().st_nlink == 1
        assert sum(p.stat().st_size for p in tmp_path.iterdir()) < (tmp_path / "m.onnx.data").stat().st_size + 8192
        sess = helpers.session(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)  # the model is unchanged
    (y,) = sess.run(None, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)  # float32 GEMM chain against float64


def test_session_file_links_weights_elsewhere(tmp_path):
    """Into another directory, the data file is hard-linked (same inode), not copied."""
    src = _write_model(tmp_path)
    model = qcompile.load_model(src)
    (tmp_path / "s").mkdir()
    path = external.session_file(model, tmp_path / "s" / "model.onnx")
    (linked,) = (tmp_path / "s").glob("*.weights*.data")
    assert linked.stat().st_ino == (tmp_path / "m.onnx.data").stat().st_ino
    assert helpers.session(path).run(None, _data(1, 4))[0].shape == (1, DIM)


def test_int8_calibrates_from_external_data(tmp_path):
    """Calibration and validation sessions run on files referring to the input's weights."""
    src = _write_model(tmp_path)
    before = _digest([src, tmp_path / "m.onnx.data"])
    r = qcompile.compile(src, "int8", calib=_data(16, 1), eval=_data(16, 2), cpu="vnni")
    assert r.passed and r.report["outputs"]
    size = qcompile.save_model(r.model, tmp_path / "q.onnx", external_data="never")
    assert not (tmp_path / "q.onnx.data").exists() and size == (tmp_path / "q.onnx").stat().st_size
    (y,) = helpers.session(tmp_path / "q.onnx").run(None, _data(2, 5))
    assert np.isfinite(y).all()
    assert _digest([src, tmp_path / "m.onnx.data"]) == before


def test_auto_threshold_and_always(tmp_path):
    """auto: inline for an inline input under the threshold, external past it; always: external."""
    src = _write_model(tmp_path, external_data=False)
    model = qcompile.load_model(src)
    assert qcompile.save_model(model, tmp_path / "a.onnx") and not (tmp_path / "a.onnx.data").exists()
    qcompile.save_model(model, tmp_path / "b.onnx", threshold=1 << 20)
    qcompile.save_model(model, tmp_path / "c.onnx", external_data="always")
    for name in ("b", "c"):
        assert (tmp_path / f"{name}.onnx.data").stat().st_size >= LAYERS * DIM * DIM * 4
        assert (tmp_path / f"{name}.onnx").stat().st_size < 4096
        helpers.session(tmp_path / f"{name}.onnx")
    with pytest.raises(InputError, match="external_data must be one of"):
        qcompile.save_model(model, tmp_path / "d.onnx", external_data="sometimes")


def test_never_overwrites_the_input_data_file(tmp_path):
    """An output that is the input's model or data file, or whose data file would be the input's, is
    refused, and nothing is written."""
    src = _write_model(tmp_path)
    before = _digest([src, tmp_path / "m.onnx.data"])
    model = qcompile.load_model(src)
    with pytest.raises(InputError, match="input's external data file"):
        qcompile.save_model(model, tmp_path / "m.onnx.data")  # the output itself would be the data file
    with pytest.raises(InputError, match="input's external data file"):
        qcompile.save_model(model, tmp_path / "m.onnx", external_data="always")  # m.onnx.data is the input's
    with pytest.raises(InputError, match="is the input model"):
        qcompile.save_model(model, tmp_path / "m.onnx", external_data="never")
    assert _digest([src, tmp_path / "m.onnx.data"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_cli_external_data_option(tmp_path):
    src = _write_model(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    base = [sys.executable, "-m", "qcompile.cli", "compile", str(src), "-t", "w4", "-q", "--no-validate"]
    p = subprocess.run([*base, "-o", str(tmp_path / "n.onnx"), "--external-data", "never"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "n.onnx.data").exists()
    p = subprocess.run([*base, "--external-data", "bogus"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_smoothed_weights_stay_file_backed(tmp_path):
    """SmoothQuant's rewritten weights of an external-data model are recomputed from the input's
    file when read (`external.derived`), never held in memory, and equal W * s exactly; the smoothed
    graph computes the float function (rtol 1e-5: the scales move between the factors of a product)."""
    from qcompile.analyze import PlanOptions, make_plan
    from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
    from qcompile.backends.onnxruntime.session import make_session
    from qcompile.passes.normalize import NormalizePass
    from qcompile.passes.smooth_quant import SmoothQuantPass, smoothable
    from qcompile.pipeline import load_model
    from qcompile.targets import get_target

    m = load_model(_write_model(tmp_path))
    NormalizePass(21, 26)(m)
    plan = make_plan(m, get_target("int8"), PlanOptions(), CAPABILITIES)
    rng = np.random.default_rng(3)
    scales = {v: rng.uniform(0.5, 2.0, DIM).astype(np.float32) for v in smoothable(m.graph, plan)}
    assert len(scales) == LAYERS
    feeds = _data(4, 7)
    def run():  # a session file referring to the weights in place (a proto would need them inline)
        return make_session(m, level="disable").run(None, feeds)[0]

    ref = run()
    original = {n.name: n.inputs[1].const_value.numpy().copy() for n in m.graph}
    p = SmoothQuantPass(plan, scales)
    p(m)
    for n in m.graph:
        if n.op_type != "MatMul":
            continue
        t = n.inputs[1].const_value
        assert external.file_backed(t) and not isinstance(t, ir.Tensor), n.name
    mm1 = helpers.node_by_name(m, "mm1")
    s1, s2 = scales["y0"], scales["y1"]  # mm1 reads y0 (rows scaled) and writes y1 (columns divided)
    np.testing.assert_array_equal(mm1.inputs[1].const_value.numpy(), (original["mm1"] * s1[:, None]) / s2[None, :])
    got = run()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert len([v for v in m.graph.initializers.values() if v.const_value.size > DIM]) == LAYERS  # no stale copies


def test_derived_of_an_in_memory_tensor_is_computed_now():
    t = ir.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    d = external.derived(t, lambda a: a[:, ::-1], "r")
    assert isinstance(d, ir.Tensor) and not external.file_backed(d)
    np.testing.assert_array_equal(d.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1])
