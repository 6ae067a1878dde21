"""NormalizePass: opset upgrade, unique names, constants as initializers, shapes.

Exact rewrite: outputs equal the input model within rtol 1e-5 (constant folding evaluates the same
float32 ops once; the opset upgrade changes no arithmetic).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
import tiny_models
from qcompile.errors import QCompileError
from qcompile.passes.normalize import NormalizePass

RTOL = 1e-5  # exact rewrite (see module doc)


def _messages(e: BaseException) -> str:
    """The exception's message and its causes' (a wrapped precondition keeps the reason in __cause__)."""
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__
    return " | ".join(out)


def _raw_model(opset=13):
    """MatMul whose weight is Transpose(Constant) (a constant subgraph), unnamed and duplicate-named nodes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [
        h.make_node("Constant", [], ["wt"], value=nh.from_array(np.ascontiguousarray(w.T))),
        h.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "w"], ["y0"], name="dup"),
        h.make_node("Add", ["y0", "b"], ["y1"], name="dup"),
        h.make_node("Relu", ["y1"], ["y"]),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [nh.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def test_upgrades_folds_constants_names_and_infers_shapes():
    proto = _raw_model(opset=13)
    model = ir.from_proto(proto)
    result = NormalizePass(21, 26)(model)
    assert result.modified
    helpers.check_model(model)
    assert model.opset_imports[""] == 21
    # Constant -> Transpose folded into one initializer read directly by the MatMul
    ops = [n.op_type for n in model.graph]
    assert ops == ["MatMul", "Add", "Relu"]
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1].const_value is not None and matmul.inputs[1].name in model.graph.initializers
    np.testing.assert_array_equal(matmul.inputs[1].const_value.numpy(), nh.to_array(proto.graph.node[0].attribute[0].t).T)
    # every node has a unique, non-empty name
    names = [n.name for n in model.graph]
    assert all(names) and len(set(names)) == len(names)
    # shapes and types of every intermediate value
    for n in model.graph:
        for o in n.outputs:
            assert o.dtype == ir.DataType.FLOAT and o.shape is not None and len(o.shape) == 2, o
    # (onnxruntime refuses the input model itself: two nodes named "dup"; numpy is the reference)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    w = nh.to_array(proto.graph.node[0].attribute[0].t).T
    ref = np.maximum(x @ w + nh.to_array(proto.graph.initializer[0]), 0)
    np.testing.assert_allclose(helpers.run(model, {"x": x})[0], ref, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_upgrades_older_tiny_models(opset):
    proto = tiny_models.mlp()
    proto.opset_import[0].version = opset
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    assert model.opset_imports[""] == 21
    helpers.check_model(model)
    x = tiny_models.inputs_for(proto, 8)
    ref = helpers.run(tiny_models.mlp(), x)[0]
    np.testing.assert_allclose(helpers.run(model, x)[0], ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


def test_keeps_a_newer_opset():
    model = ir.from_proto(tiny_models.attention())
    NormalizePass(13, 26)(model)
    assert model.opset_imports[""] == 17, "never downgrades"
    assert [v.name for v in model.graph.outputs] == ["y"] and [v.name for v in model.graph.inputs] == ["x"]


def test_contract_second_run_is_a_noop():
    model = ir.from_proto(_raw_model())
    helpers.assert_pass_contract(NormalizePass(21, 26), model, expect_modified=True)


def test_opset_newer_than_the_runtime_is_refused():
    proto = tiny_models.mlp()
    proto.opset_import[0].version = 27
    model = ir.from_proto(proto)
    before = helpers.snapshot(model)
    with pytest.raises((QCompileError, ir.passes.PreconditionError)) as info:
        NormalizePass(13, 26)(model)
    assert "model opset 27 is newer than onnxruntime supports (26)" in _messages(info.value)
    assert helpers.snapshot(model) == before, "a refused model is not touched"


def test_model_without_default_opset_is_refused():
    proto = tiny_models.mlp()
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    with pytest.raises((QCompileError, ir.passes.PreconditionError)) as info:
        NormalizePass(13, 26)(ir.from_proto(proto))
    assert "imports no default-domain opset" in _messages(info.value)


def test_initializers_listed_as_inputs_become_constants():
    """IR 3 lists every weight as a graph input; after the pass only the data input is left, the
    weights are plain constants and the outputs are unchanged (exact, RTOL)."""
    import foreign_models

    proto = foreign_models.initializers_as_inputs(tiny_models.mlp(), ir_version=3)
    model = ir.from_proto(proto)
    assert len(model.graph.inputs) > 1
    NormalizePass(13, 26)(model)
    assert [v.name for v in model.graph.inputs] == ["x"]
    x = tiny_models.inputs_for(tiny_models.mlp(), 4)
    ref = helpers.run(tiny_models.mlp(), x)[0]
    np.testing.assert_allclose(helpers.run(model, x)[0], ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))
