"""Packed storage (issue 4, acceptance 3): a 4096 x 4096 float weight compiled to mxfp4 is <= 15% of
the float file, to nvfp4 <= 16%, whichever way the weight is lowered (the MatMulNBits planes are
decoded from the packed codes inside the graph, so the file keeps 4.25 / 4.5 bits per weight).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import qcompile

DIM = 4096
LIMIT = {"mxfp4": 0.15, "nvfp4": 0.16}
BITS = {"mxfp4": 4 + 8 / 32, "nvfp4": 4 + 8 / 16}  # element + block scale, per weight


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((DIM, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", DIM])], [h.make_tensor_value_info("y", T.FLOAT, ["N", DIM])],
                     [nh.from_array(w, "w")])
    path = tmp_path_factory.mktemp("size") / "big.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10), path)
    return path


@pytest.mark.parametrize("lowering", ["auto", "function"])
@pytest.mark.parametrize("target", list(LIMIT))
def test_file_size(float_model, tmp_path, target, lowering):
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((16, DIM), dtype=np.float32)}
    ev = {"x": rng.standard_normal((8, DIM), dtype=np.float32)}
    r = qcompile.compile(float_model, target, calib=calib, eval=ev, lowering=lowering)
    out = tmp_path / "q.onnx"
    size = qcompile.save_model(r.model, out)
    ratio = size / float_model.stat().st_size
    assert ratio <= LIMIT[target], f"{target}/{lowering}: {ratio:.4f} of the float file"
    assert ratio >= BITS[target] / 32 * 0.99, "cannot be smaller than the packed codes and scales"
    (row,) = r.report["layers"]
    assert row["quant_bytes"] == DIM * DIM * BITS[target] / 8 + (4 if target == "nvfp4" else 0)
    assert np.isfinite(helpers.run(out, ev)[0]).all()
