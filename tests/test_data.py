"""Calibration / evaluation data: .npz files, directories of them, batching, checks (qcompile.data)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import tiny_models
from qcompile.data import ArrayDataset, Dataset, InputInfo, synthesize
from qcompile.errors import InputError


def _inputs(proto: onnx.ModelProto) -> list[InputInfo]:
    return InputInfo.of_model(ir.from_proto(proto))


def _concat(batches, name="x"):
    return np.concatenate([b[name] for b in batches])


def _two_input_model(batch_dim):
    g = h.make_graph(
        [h.make_node("Add", ["a", "b"], ["y"])], "g",
        [h.make_tensor_value_info("a", T.FLOAT, [batch_dim, 4]), h.make_tensor_value_info("b", T.FLOAT, [batch_dim, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [batch_dim, 4])],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_input_info_of_model():
    (info,) = _inputs(tiny_models.cnn())
    assert info == InputInfo("x", np.dtype(np.float32), (None, 3, 16, 16), batch_axis=0)


def test_npz_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, extra=np.zeros(3))  # extra arrays are ignored
    ds = Dataset(tmp_path / "d.npz", _inputs(tiny_models.mlp()))
    assert len(ds) == 20
    batches = list(ds.batches(8))
    assert [b["x"].shape[0] for b in batches] == [8, 8, 4]
    np.testing.assert_array_equal(_concat(batches), x)
    # take: a sample range, without copying files
    np.testing.assert_array_equal(_concat(ds.take(5, 12).batches(4)), x[5:12])
    np.testing.assert_array_equal(_concat(ds.take(15).batches(4)), x[15:])
    assert len(ds.take(15)) == 5 and len(ds.take(0, 100)) == 20


def test_directory_of_npz_in_name_order(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 7, 3)]
    for i, p in enumerate(parts):  # written out of order: reading must sort by file name
        np.savez(tmp_path / f"part{[2, 0, 1][i]}.npz", x=p)
    ds = Dataset(tmp_path, _inputs(tiny_models.mlp()))
    expected = np.concatenate([parts[1], parts[2], parts[0]])
    assert len(ds) == 15
    np.testing.assert_array_equal(_concat(ds.batches(4)), expected)
    # a range across the file boundaries
    np.testing.assert_array_equal(_concat(ds.take(6, 13).batches(100)), expected[6:13])


def test_missing_input_name_is_an_input_error(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 64), np.float32))
    with pytest.raises(InputError, match=r"missing arrays for model inputs \['x'\] \(has \['input'\]\)"):
        Dataset(tmp_path / "d.npz", _inputs(tiny_models.mlp()))
    with pytest.raises(InputError, match=r"missing arrays for model inputs \['x'\]"):
        ArrayDataset({"input": np.zeros((4, 64), np.float32)}, _inputs(tiny_models.mlp()))


def test_unusable_data_paths_are_input_errors(tmp_path):
    inputs = _inputs(tiny_models.mlp())
    with pytest.raises(InputError, match="no such file or directory"):
        Dataset(tmp_path / "nope.npz", inputs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .npz files"):
        Dataset(tmp_path / "empty", inputs)
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(InputError, match="not a readable .npz"):
        Dataset(tmp_path / "bad.npz", inputs)


def test_mismatched_sample_counts_and_dtypes(tmp_path):
    inputs = _inputs(_two_input_model("N"))
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 4), np.float32), b=np.zeros((5, 4), np.float32))
    with pytest.raises(InputError, match="different sample counts"):
        Dataset(tmp_path / "d.npz", inputs)
    # float64 data is cast to the model's float32; strings are refused
    ds = ArrayDataset({"a": np.zeros((2, 4)), "b": np.ones((2, 4))}, inputs)
    assert next(ds.batches())["a"].dtype == np.float32
    with pytest.raises(InputError, match="is <U1, the model wants float32"):
        ArrayDataset({"a": np.full((2, 4), "a"), "b": np.ones((2, 4))}, inputs)


def test_fixed_batch_dim_is_fed_one_sample_at_a_time(tmp_path):
    inputs = _inputs(_two_input_model(1))
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.savez(tmp_path / "d.npz", a=a, b=-a)
    batches = list(Dataset(tmp_path / "d.npz", inputs).batches(batch_size=8))
    assert len(batches) == 10
    assert all(b["a"].shape == (1, 4) and b["b"].shape == (1, 4) for b in batches)
    np.testing.assert_array_equal(_concat(batches, "a"), a)
    # with a symbolic batch dim the same data comes in batches of 8
    assert [b["a"].shape[0] for b in Dataset(tmp_path / "d.npz", _inputs(_two_input_model("N"))).batches(8)] == [8, 2]


def test_spread_takes_every_kth_sample_across_files(tmp_path):
    """`spread(n)`: at most n samples evenly strided over the whole dataset (file boundaries and a
    range's offset included), so a subset of data stored in order still covers it all."""
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 7, 3, 9)]
    for i, p in enumerate(parts):
        np.savez(tmp_path / f"part{i}.npz", x=p)
    ds = Dataset(tmp_path, _inputs(tiny_models.mlp()))
    every = np.concatenate(parts)
    for n, step in ((8, 3), (24, 1), (100, 1), (5, 5), (1, 24)):
        sub = ds.spread(n)
        np.testing.assert_array_equal(_concat(sub.batches(4)), every[::step])
        assert len(sub) == len(every[::step]) <= n
    part = ds.take(4, 21).spread(6)  # 17 samples from 4: every 3rd
    np.testing.assert_array_equal(_concat(part.batches(2)), every[4:21:3])
    assert len(part) == 6
    arr = ArrayDataset({"x": every}, _inputs(tiny_models.mlp())).take(4, 21).spread(6)
    np.testing.assert_array_equal(_concat(arr.batches(5)), every[4:21:3])


def test_array_dataset_batches():
    inputs = _inputs(tiny_models.mlp())
    x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)
    ds = ArrayDataset({"x": x}, inputs)
    assert len(ds) == 10
    np.testing.assert_array_equal(_concat(ds.batches(3)), x)


def test_array_dataset_take():
    # a slice of in-memory data stays in memory (the held-out split of compile() relies on it)
    x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)
    ds = ArrayDataset({"x": x}, _inputs(tiny_models.mlp()))
    part = ds.take(2, 7)
    assert len(part) == 5
    np.testing.assert_array_equal(_concat(part.batches(2)), x[2:7])


def test_synthesize_follows_input_types():
    g = h.make_graph(
        [h.make_node("Identity", ["x"], ["y"])], "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3]), h.make_tensor_value_info("ids", T.INT64, ["N", "S"]),
         h.make_tensor_value_info("attention_mask", T.INT64, ["N", "S"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])],
    )
    inputs = _inputs(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    d = synthesize(inputs, 5, seed=0, dim=7)
    assert d["x"].shape == (5, 3) and d["x"].dtype == np.float32
    assert d["ids"].shape == (5, 7) and d["ids"].dtype == np.int64 and d["ids"].min() >= 0
    assert (d["attention_mask"] == 1).all()
    np.testing.assert_array_equal(synthesize(inputs, 5, seed=0, dim=7)["x"], d["x"])  # seeded


# --- foreign input layouts (issue 9, "What was seen" 3: "synthesized data against dynamic or fixed
# leading dims: input 'x': model batch dim is -1, data gives 1; a recurrent-state input of shape
# [2, batch, 128] read as batch dim is 2"). On e10cd69 these raise that InputError or feed wrong shapes.
def _model(inputs, outputs=None, nodes=None):
    nodes = nodes or [h.make_node("Identity", [inputs[0].name], ["y"])]
    g = h.make_graph(nodes, "g", inputs, outputs or [h.make_tensor_value_info("y", T.FLOAT, None)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _vad_like(state_batch="batch"):
    return _model([h.make_tensor_value_info("input", T.FLOAT, ["batch", "samples"]),
                   h.make_tensor_value_info("state", T.FLOAT, [2, state_batch, 128]),
                   h.make_tensor_value_info("sr", T.INT64, [])])


def test_state_tensor_batch_axis_is_not_its_leading_dim():
    inputs = _inputs(_vad_like())
    assert [i.batch_axis for i in inputs] == [0, 1, None]
    d = synthesize(inputs, 5, seed=0, dim=16)
    assert d["input"].shape == (5, 16) and d["state"].shape == (5, 2, 128) and d["sr"].shape == (5,)
    batches = list(ArrayDataset(d, inputs).batches(8))  # sr is one whole scalar per sample: one sample per batch
    assert len(batches) == 5
    assert batches[0]["state"].shape == (2, 1, 128) and batches[0]["input"].shape == (1, 16) and batches[0]["sr"].shape == ()
    np.testing.assert_array_equal(batches[3]["state"][:, 0], d["state"][3])


def test_unnamed_free_dims_and_rows_along_the_batch_axis():
    # Silero's export leaves the dims unnamed: [?, ?] and [2, ?, 128]; rows go along each input's first free dim
    inputs = _inputs(_model([h.make_tensor_value_info("input", T.FLOAT, [None, None]),
                             h.make_tensor_value_info("state", T.FLOAT, [2, None, 128])]))
    assert [i.batch_axis for i in inputs] == [0, 1]
    data = {"input": np.zeros((10, 512), np.float32), "state": np.arange(10 * 256, dtype=np.float32).reshape(10, 2, 128)}
    batches = list(ArrayDataset(data, inputs).batches(4))
    assert [b["state"].shape for b in batches] == [(2, 4, 128), (2, 4, 128), (2, 2, 128)]
    np.testing.assert_array_equal(batches[1]["state"][:, 2], data["state"][6])


def test_fixed_batch_larger_than_one(tmp_path):
    inputs = _inputs(_two_input_model(2))
    d = synthesize(inputs, 6, seed=0)  # whole inputs [6, 2, 4]
    assert d["a"].shape == (6, 2, 4)
    assert [b["a"].shape for b in ArrayDataset(d, inputs).batches(8)] == [(2, 4)] * 6
    rows = {"a": np.arange(24, dtype=np.float32).reshape(6, 4), "b": np.zeros((6, 4), np.float32)}
    batches = list(ArrayDataset(rows, inputs).batches(8))  # rows: two per batch
    assert [b["a"].shape for b in batches] == [(2, 4)] * 3
    np.testing.assert_array_equal(batches[2]["a"], rows["a"][4:6])


def test_input_shape_fixes_free_dims_across_inputs():
    m = _model([h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"]), h.make_tensor_value_info("mask", T.INT64, ["batch", "seq"])])
    inputs = InputInfo.of_model(ir.from_proto(m), {"ids": (1, 12)})
    assert [i.shape for i in inputs] == [(1, 12), (1, 12)]  # the symbols batch and seq are fixed on mask too
    d = synthesize(inputs, 3, seed=0)
    assert d["ids"].shape == (3, 1, 12) and d["mask"].shape == (3, 1, 12)  # whole inputs: the batch dim is fixed
    assert [b["ids"].shape for b in ArrayDataset(d, inputs).batches(8)] == [(1, 12)] * 3
    with pytest.raises(InputError, match=r"--input-shape names \['idz'\], not inputs of the model"):
        InputInfo.of_model(ir.from_proto(m), {"idz": (1, 2)})
    with pytest.raises(InputError, match="--input-shape ids: 3 dims given, the input has rank 2"):
        InputInfo.of_model(ir.from_proto(m), {"ids": (1, 2, 3)})
    with pytest.raises(InputError, match="--input-shape state: dim 2 is fixed to 128 by the model, 64 given"):
        InputInfo.of_model(ir.from_proto(_vad_like()), {"state": (2, 1, 64)})


def test_integer_inputs_in_the_range_the_graph_uses():
    table = h.make_tensor("emb", T.FLOAT, [30, 4], np.zeros(120, np.float32))
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"]), h.make_node("Equal", ["sr", "k16"], ["is16"]),
             h.make_node("Identity", ["e"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT64, ["N", 7]), h.make_tensor_value_info("sr", T.INT64, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [table, h.make_tensor("k16", T.INT64, [], [16000])])
    ids, sr = InputInfo.of_model(ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 17)])))
    assert ids.int_range == (0, 30) and sr.int_choices == (16000,)
    d = synthesize([ids, sr], 200, seed=0)
    assert d["ids"].min() >= 0 and d["ids"].max() < 30 and (d["sr"] == 16000).all()


@pytest.mark.parametrize("bad,match", [
    ({"x": np.full((4, 64), np.nan, np.float32)}, r"input 'x': 256 NaN/Inf value\(s\) in the data"),
    ({"x": np.zeros((4, 63), np.float32)}, r"input 'x': a sample has shape \[63\], the model wants \[64\]"),
    ({"x": np.zeros((4, 2, 3, 64), np.float32)}, r"input 'x': data of shape \[4, 2, 3, 64\] does not fit the model's \[\?, 64\]"),
    ({"x": np.zeros((4, 64), np.complex64)}, r"input 'x': data is complex64, the model wants float32"),
    ({"x": np.float32(1.0)}, r"input 'x': a 0-d array has no sample axis"),
])
def test_calibration_data_that_does_not_fit_is_one_line_naming_the_input(bad, match, tmp_path):
    inputs = _inputs(tiny_models.mlp())
    with pytest.raises(InputError, match=match) as e:
        ArrayDataset(bad, inputs)
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "d.npz", **bad)
    with pytest.raises(InputError, match=match):
        Dataset(tmp_path / "d.npz", inputs)
