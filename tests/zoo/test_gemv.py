"""GEMV chain model (qcompile.zoo.gemv): numerics against numpy and external weight data."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from qcompile import zoo
from qcompile.zoo import gemv

slow = pytest.mark.slow

LAYERS, DIM = 3, 256  # the tiny chain of the fast tests


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tiny_chain_numerics_and_external_data(tmp_path):
    import onnx

    path = tmp_path / "tiny.onnx"
    info = gemv.build(path, layers=LAYERS, dim=DIM)
    data = tmp_path / "tiny.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]
    assert info["data_bytes"] == data.stat().st_size == LAYERS * DIM * DIM * 4
    assert info["file_bytes"] == path.stat().st_size < 4096  # the weights are not inline
    assert info["parameters"] == LAYERS * DIM * DIM and info["max_rel_diff"] <= 1e-4

    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version <= 13
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 26
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Mul"] * LAYERS
    weights = [t for t in model.graph.initializer if t.name.startswith("w")]
    assert len(weights) == LAYERS
    for t in weights:
        assert t.data_location == onnx.TensorProto.EXTERNAL and list(t.dims) == [DIM, DIM]
        assert {e.key: e.value for e in t.external_data}["location"] == "tiny.onnx.data"
    full = onnx.load(str(path))  # resolves the external data
    onnx.checker.check_model(full, full_check=True)
    stored = onnx.numpy_helper.to_array(next(t for t in full.graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(stored, gemv.weight(1, DIM))
    assert 0.9 < stored.std() < 1.1 and abs(stored.mean()) < 0.05  # ~N(0, 1)

    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y"]
    for batch in (1, 5):  # dynamic batch
        x = np.random.default_rng(batch).standard_normal((batch, DIM), dtype=np.float32)
        (y,) = session.run(None, {"x": x})
        want = gemv.reference(x, LAYERS, DIM)
        assert y.shape == (batch, DIM) and y.dtype == np.float32
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert 0.3 < want.std() < 3  # the 1/sqrt(dim) scaling keeps activations bounded


def test_tiny_chain_is_deterministic_and_relocatable(tmp_path):
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    a.parent.mkdir(), b.parent.mkdir()
    info_a, info_b = gemv.build(a, LAYERS, DIM), gemv.build(b, LAYERS, DIM)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "m.onnx.data").read_bytes() == (b.parent / "m.onnx.data").read_bytes()
    assert info_a["sha256"] == info_b["sha256"] and info_a["data_sha256"] == info_b["data_sha256"]

    moved = tmp_path / "moved"  # the data file is referenced by a relative name
    moved.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        shutil.move(a.parent / name, moved / name)
    x = np.ones((2, DIM), dtype=np.float32)
    np.testing.assert_array_equal(_session(moved / "m.onnx").run(None, {"x": x})[0],
                                  _session(b).run(None, {"x": x})[0])


def test_failed_verification_removes_data(tmp_path, monkeypatch):
    def bad_verify(path, x, want):
        raise zoo.ZooBuildError("boom")

    monkeypatch.setattr(gemv, "verify", bad_verify)
    with pytest.raises(zoo.ZooBuildError, match="boom"):
        gemv.build(tmp_path / "m.onnx", LAYERS, DIM)
    assert not (tmp_path / "m.onnx.data").exists()


def test_write_npz(tmp_path):
    path = gemv.write_npz(tmp_path / "calib", "calib", 8, dim=DIM)
    assert path == tmp_path / "calib" and path.is_file()
    with np.load(path) as data:
        assert data.files == ["x"]
        x = data["x"]
    assert x.shape == (8, DIM) and x.dtype == np.float32
    assert 0.8 < x.std() < 1.2

    def load(split, seed=0):
        with np.load(gemv.write_npz(tmp_path / f"{split}{seed}.npz", split, 8, seed, DIM)) as d:
            return d["x"]

    np.testing.assert_array_equal(load("calib"), x)
    assert not np.array_equal(load("eval"), x)
    assert not np.array_equal(load("calib", 1), x)
    with np.load(gemv.write_npz(tmp_path / "full.npz", "eval", 1)) as d:  # default dim 4096
        assert d["x"].shape == (1, 4096)
    with pytest.raises(ValueError):
        gemv.write_npz(tmp_path / "x.npz", "train", 1)


@slow
def test_full_chain(tmp_path):
    path = tmp_path / "gemv.onnx"
    info = gemv.build(path)
    data = tmp_path / "gemv.onnx.data"
    assert info["layers"] == 12 and info["dim"] == 4096 and info["max_rel_diff"] <= 1e-4
    assert data.stat().st_size == info["data_bytes"] == 12 * 4096 * 4096 * 4  # 805,306,368 B
    assert path.stat().st_size < 4096

    with np.load(gemv.write_npz(tmp_path / "eval.npz", "eval", 1)) as d:
        x = d["x"]
    session = _session(path)
    (y,) = session.run(None, {"x": x})  # batch 1: the decode-step GEMV shape
    del session  # free the ~805 MB of weights before the reference
    want = gemv.reference(x)
    assert y.shape == (1, 4096)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_get_model_caches_external_data_under_final_names(tmp_path, monkeypatch):
    """get_model builds in a private folder: the weights land as <name>.onnx.data next to <name>.onnx."""
    import functools

    import onnxruntime as ort

    import qcompile.zoo as zoo
    from qcompile.zoo import gemv as gemv_mod

    monkeypatch.setitem(zoo.MODELS, "gemv-tiny", functools.partial(gemv_mod.build, layers=3, dim=256))
    path = zoo.get_model("gemv-tiny", cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["gemv-tiny.json", "gemv-tiny.onnx", "gemv-tiny.onnx.data"], names
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    x = np.ones((1, 256), np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, gemv_mod.reference(x, 3, 256), rtol=1e-4, atol=1e-4 * np.abs(y).max())
