"""MatMulNBits accuracy level `auto` (the default; qcompile.accuracy_level.py).

Issue 9 ("What to build", portable emission, last sentence): the default `w4` ran MatMulNBits at
accuracy level 0 (float activations), 1.1x float at batch 1 on AVX2 CPUs. `auto` keeps level 4
(int8 activations, 2.3-2.6x faster at batch 1 here) iff validation measures its change to every output
>= 20 dB below the 4-bit weight error, reports the choice and why, and keeps level 0 where int8
activations would cost (an outlier channel setting a block's int8 scale). The level-4 choice made on
this CPU also holds on AVX2: the same model run under `qemu-x86_64 -cpu Haswell` (onnxruntime's
AVX2 kernels) keeps the margin. On e10cd69 every default compile emitted level 0 and reported nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qcompile
import tiny_models
from helpers import avx2_command
from qcompile.accuracy_level import MARGIN_DB
from qcompile.backends.onnxruntime.session import make_session
from qcompile.errors import InputError



def levels(model: ir.Model) -> list[int]:
    return [n.attributes["accuracy_level"].value for n in model.graph if n.op_type == "MatMulNBits"]


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


@pytest.fixture(scope="module")
def mlp():
    proto = tiny_models.mlp()
    return proto, tiny_models.inputs_for(proto, 64, seed=1), tiny_models.inputs_for(proto, 32, seed=2)


def outlier_model(seed: int = 0) -> tuple[onnx.ModelProto, dict, dict]:
    """y = x @ W where input channel 0 carries values ~3000x the others and W's row 0 is zero: the
    output ignores that channel, but in MatMulNBits' int8 activation blocks (32 along K) it sets the
    scale, and the other 31 channels of its block round to 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[0] = 0.0
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
                     [nh.from_array(w, "w")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)

    def data(n: int, s: int) -> dict:
        x = np.random.default_rng(s).standard_normal((n, 64)).astype(np.float32)
        x[:, 0] *= 3000.0
        return {"x": x}

    return proto, data(64, 1), data(32, 2)


def test_auto_picks_level_4_for_w4(mlp):
    """Default w4: level 4 on every MatMulNBits, the report says so with the measured margin, and
    the validated SQNR stays within 0.1 dB of level 0's."""
    proto, calib, ev = mlp
    r = qcompile.compile(proto, "w4", calib=calib, eval=ev)
    choice = r.report["accuracy_level"]
    assert choice["policy"] == "auto" and choice["level"] == 4 and choice["nodes"] == 2, choice
    assert levels(r.model) == [4, 4]
    (out,) = choice["outputs"].values()
    assert out["weight_error_over_level4_change_db"] >= MARGIN_DB and ">= the 20 dB margin" in choice["reason"], choice
    assert abs(r.report["outputs"]["logits"]["sqnr_db"] - out["sqnr_level4_db"]) < 1e-6  # validation ran level 4
    assert out["sqnr_level4_db"] >= out["sqnr_level0_db"] - 0.1, out
    exact = qcompile.compile(proto, "w4", calib=calib, eval=ev, accuracy_level=0)
    assert abs(exact.report["outputs"]["logits"]["sqnr_db"] - out["sqnr_level0_db"]) < 1e-6


def test_auto_keeps_level_0_where_int8_activations_cost():
    """An outlier channel: level 4 would lose most of the signal (checked: forcing it drops the SQNR
    by > 10 dB), so auto keeps level 0, bit for bit the explicit level-0 output, and says why."""
    proto, calib, ev = outlier_model()
    auto = qcompile.compile(proto, "w4", calib=calib, eval=ev)
    choice = auto.report["accuracy_level"]
    assert choice["level"] == 0 and levels(auto.model) == [0], choice
    assert choice["outputs"]["y"]["weight_error_over_level4_change_db"] < MARGIN_DB and "< the 20 dB" in choice["reason"]
    forced = qcompile.compile(proto, "w4", calib=calib, eval=ev, accuracy_level=4, min_sqnr=-100)
    assert forced.report["outputs"]["y"]["sqnr_db"] < auto.report["outputs"]["y"]["sqnr_db"] - 10, (forced.report["outputs"],
                                                                                                   auto.report["outputs"])
    exact = qcompile.compile(proto, "w4", calib=calib, eval=ev, accuracy_level=0)
    assert ir.to_proto(exact.model).SerializeToString() == ir.to_proto(auto.model).SerializeToString()


def test_explicit_levels_and_no_validation(mlp):
    """`accuracy_level=0|4` are emitted as given with no auto entry; auto without validation
    measures nothing and stays at level 0; a model without MatMulNBits reports no level; a bad
    level is an InputError."""
    proto, calib, ev = mlp
    for level in (0, 4):
        r = qcompile.compile(proto, "w4", calib=calib, eval=ev, accuracy_level=level)
        assert levels(r.model) == [level, level] and "accuracy_level" not in r.report
    r = qcompile.compile(proto, "w4", calib=calib, eval=ev, validate=False)
    assert levels(r.model) == [0, 0] and r.report["accuracy_level"]["level"] == 0
    assert "not measured" in r.report["accuracy_level"]["reason"]
    r = qcompile.compile(proto, "int8", calib=calib, eval=ev)
    assert r.report["accuracy_level"] == {"policy": "auto", "nodes": 0, "margin_db": MARGIN_DB, "level": None,
                                          "reason": "no MatMulNBits node"}
    for bad in (5, "fast"):
        with pytest.raises(InputError, match="accuracy_level must be"):
            qcompile.compile(proto, "w4", calib=calib, eval=ev, accuracy_level=bad)


def test_cli_reports_the_choice(mlp, tmp_path):
    proto, calib, ev = mlp
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **calib)
    np.savez(tmp_path / "e.npz", **ev)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    base = [sys.executable, "-m", "qcompile.cli", "m.onnx", "-t", "w4", "--calib", "c.npz", "--eval", "e.npz"]
    r = subprocess.run(base + ["-o", "a.onnx"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "qcompile: MatMulNBits accuracy level 4 (auto: weight quantization error / level-4 change = " in r.stderr
    r = subprocess.run(base + ["--accuracy-level", "0", "-o", "z.onnx"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "accuracy level" not in r.stderr, r.stderr
    assert {a.i for n in onnx.load(tmp_path / "z.onnx").graph.node for a in n.attribute if a.name == "accuracy_level"} == {0}
    r = subprocess.run(base + ["--accuracy-level", "9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr


AVX2_SCRIPT = r"""
import sys
import numpy as np, onnx, onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__ as cpu

float_path, model_path, data_path, out_path = sys.argv[1:]
feed = dict(np.load(data_path))

def run(proto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]

m = onnx.load(model_path)
ys = {}
for level in (0, 4):
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    ys[f"y{level}"] = run(m)
np.savez(out_path, f=run(onnx.load(float_path)), avx512=cpu["AVX512F"], avx2=cpu["AVX2"], **ys)
"""


def run_under_avx2(tmp_path, float_proto, model: ir.Model, feed: dict) -> dict:
    """Float, level-0 and level-4 outputs computed by onnxruntime's AVX2 kernels (this interpreter on
    an AVX2-only CPU, else qemu with AVX-512 hidden: `helpers.avx2_command`)."""
    onnx.save(float_proto, tmp_path / "float.onnx")
    onnx.save(ir.to_proto(model), tmp_path / "q.onnx")
    np.savez(tmp_path / "feed.npz", **feed)
    (tmp_path / "avx2.py").write_text(AVX2_SCRIPT)
    args = [*avx2_command(), "avx2.py", "float.onnx", "q.onnx", "feed.npz", "out.npz"]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(np.load(tmp_path / "out.npz"))
    assert out["avx2"] and not out["avx512"], "the emulated CPU must hide AVX-512"
    return out


def test_level_4_choice_holds_on_avx2(mlp, tmp_path):
    """The model auto compiled to level 4 here, run on AVX2 kernels: level 4's change is still
    >= 20 dB below the weight error there, its SQNR within 0.1 dB of this CPU's, and the AVX2
    level-4 output agrees with this CPU's far beyond the weight error (the same int8 block sums:
    MLAS's AVX2 kernels add u8 x s8 pairs of 4-bit weights, which cannot saturate int16)."""
    proto, calib, ev = mlp
    r = qcompile.compile(proto, "w4", calib=calib, eval=ev)
    assert r.report["accuracy_level"]["level"] == 4
    x = ev["x"]
    out = run_under_avx2(tmp_path, proto, r.model, {"x": x})
    f, y0, y4 = out["f"].astype(np.float64), out["y0"], out["y4"]
    weight_error, change = np.sum((f - y0) ** 2), np.sum((y0.astype(np.float64) - y4) ** 2)
    assert change <= weight_error * 10 ** (-MARGIN_DB / 10), 10 * np.log10(weight_error / change)
    here = make_session(r.model).run(None, {"x": x})[0]
    assert abs(sqnr(f, y4) - sqnr(f, here)) < 0.1
    assert sqnr(here, y4) > sqnr(f, here) + 2 * MARGIN_DB, (sqnr(here, y4), sqnr(f, here))


def test_auto_does_not_measure_when_matmulnbits_do_little_of_the_work():
    """A CNN whose only MatMulNBits is its classifier (0.05% of the multiply-adds here, 0.7% on
    EfficientNet-Lite0): level 4 could not speed it up, so no session is spent measuring it; level
    0, and the reason says so. The share is computed from the graph's shapes."""
    from qcompile.accuracy_level import MIN_SHARE, nbits_share

    rng = np.random.default_rng(0)
    wc = (rng.standard_normal((64, 8, 3, 3)) * 0.2).astype(np.float32)
    wg = (rng.standard_normal((32, 64)) * 0.2).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8, 32, 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])], [nh.from_array(wc, "wc"), nh.from_array(wg, "wg")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    data = lambda n, s: {"x": np.random.default_rng(s).standard_normal((n, 8, 32, 32)).astype(np.float32)}  # noqa: E731
    r = qcompile.compile(proto, "w4", calib=data(32, 1), eval=data(16, 2))
    choice = r.report["accuracy_level"]
    assert choice["level"] == 0 and "not measured" in choice["reason"] and "outputs" not in choice, choice
    assert levels(r.model) == [0]
    share = nbits_share(r.model)
    assert share is not None and share < MIN_SHARE, share
