"""FoldConstantOfShapePass: weights made by ConstantOfShape become initializers.

Exact rewrite (the same constant, materialized): outputs equal the float graph at rtol 1e-5.
Only a ConstantOfShape read solely as a parameter (input >= 1 of Conv/MatMul/Gemm/BatchNorm) is
folded; one that also feeds an elementwise op (a mask, a state) stays.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import qcompile
from qcompile.passes.fold_constant_of_shape import FoldConstantOfShapePass

RTOL = 1e-5  # exact rewrite


def _model(extra_use: bool = False) -> ir.Model:
    """y = Gemm(x, W) + b with W = ConstantOfShape([8, 4], 0.02) (onnx's light/ models' form);
    extra_use: W also feeds an Add."""
    nodes = [h.make_node("ConstantOfShape", ["w_shape"], ["W"], value=h.make_tensor("v", T.FLOAT, [1], [0.02])),
             h.make_node("Gemm", ["x", "W", "b"], ["y"])]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, [None, 4])]
    if extra_use:
        nodes.append(h.make_node("Add", ["W", "W"], ["w2"]))
        outputs.append(h.make_tensor_value_info("w2", T.FLOAT, [8, 4]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None, 8])], outputs,
                     [nh.from_array(np.array([8, 4], np.int64), "w_shape"),
                      nh.from_array(np.linspace(-1, 1, 4).astype(np.float32), "b")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return ir.from_proto(m)


def test_a_constant_of_shape_weight_becomes_an_initializer():
    m = _model()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    ref = helpers.run(m, {"x": x})[0]
    helpers.assert_pass_contract(FoldConstantOfShapePass(), m, expect_modified=True)
    assert [n.op_type for n in m.graph] == ["Gemm"]
    w = m.graph.node(0).inputs[1]
    assert w.is_initializer() and np.all(w.const_value.numpy() == np.float32(0.02)) and w.shape == ir.Shape([8, 4])
    assert "w_shape" not in m.graph.initializers  # the shape is not kept once unused
    np.testing.assert_allclose(helpers.run(m, {"x": x})[0], ref, rtol=RTOL)


def test_a_constant_of_shape_with_another_use_stays():
    m = _model(extra_use=True)
    helpers.assert_pass_contract(FoldConstantOfShapePass(), m, expect_modified=False)
    assert "ConstantOfShape" in [n.op_type for n in m.graph]


def test_w4_quantizes_a_constant_of_shape_weight(tmp_path):
    """Before the pass the Gemm had no constant weight: w4 refused 'nothing to quantize'."""
    path = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(_model()), path)
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    r = qcompile.compile(path, "w4", calib={"x": x}, eval={"x": x})
    assert [row["node"] for row in r.report["layers"] if row.get("weight_format")], r.report["layers"]
