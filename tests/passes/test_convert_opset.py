"""ConvertOpsetPass: exact opset conversion with onnx's C++ version converter, on the structure only.

Exact rewrite: the converted model's outputs equal the original's within rtol 1e-5 (the adapters
change op forms, not arithmetic; measured 0.0 on every model here).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import foreign_models
import helpers
from qcompile.errors import QCompileError, UnsupportedModelError
from qcompile.backends.onnxruntime.session import make_session
from qcompile.passes.convert_opset import ConvertOpsetPass, compare_outputs, pop_record

RTOL = 1e-5  # exact rewrite (see module doc)


def _x(seed=0, shape=(1, 3, 16, 16)):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _ops(graph) -> dict[str, list[ir.Node]]:
    out: dict[str, list] = {}
    for n in ir.traversal.RecursiveGraphIterator(graph):
        out.setdefault(n.op_type, []).append(n)
    return out


@pytest.mark.parametrize("opset", [7, 9])
def test_classic_cnn_converts_exactly_and_weights_are_not_copied(tmp_path, opset):
    proto = onnx.load(str(foreign_models.classic_cnn(tmp_path / "cnn.onnx", opset=opset)))
    model = ir.from_proto(proto)
    weight = model.graph.initializers["conv2.W"].const_value  # 18 KB: above STRIP_BYTES, never serialized
    result = ConvertOpsetPass(13, 26, feeds=[_x(1), _x(2)], session=make_session)(model)
    assert result.modified and model.opset_imports[""] == 13
    assert model.graph.initializers["conv2.W"].const_value is weight, "the same tensor object is re-attached"
    ops = _ops(model.graph)
    assert "Upsample" not in ops and len(ops["Resize"]) == 1
    assert all(len(n.inputs) == 2 for n in ops["Unsqueeze"] + ops["Squeeze"]), "axes attribute -> input at 13"
    record = pop_record(model)
    assert record["from"] == opset and record["to"] == 13 and record["max_rel_err"] <= RTOL
    assert "qcompile.opset_conversion" not in model.metadata_props
    helpers.check_model(model)
    for seed in (3, 4):  # fresh inputs, not the verification feeds
        want = helpers.run(_renamed(proto), _x(seed))[0]
        np.testing.assert_allclose(helpers.run(model, _x(seed))[0], want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def _renamed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with its duplicate node name fixed: onnxruntime refuses the original itself."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    seen = set()
    for i, n in enumerate(p.graph.node):
        if n.name in seen:
            n.name = f"{n.name}_{i}"
        seen.add(n.name)
    return p


def test_raises_only_as_far_as_the_target_needs_and_never_down(tmp_path):
    model = ir.from_proto(onnx.load(str(foreign_models.reduce_attr_encoder(tmp_path / "enc.onnx", opset=17))))
    assert not ConvertOpsetPass(13, 26)(model).modified and model.opset_imports[""] == 17
    assert ConvertOpsetPass(19, 26)(model).modified and model.opset_imports[""] == 19
    assert all(len(n.inputs) == 2 for n in _ops(model.graph)["ReduceMean"]), "ReduceMean axes -> input at 18"
    assert all(len(n.inputs) == 2 for n in _ops(model.graph)["ReduceL2"])


def test_if_branches_and_local_functions_are_converted():
    then = h.make_graph([h.make_node("Unsqueeze", ["x"], ["t"], axes=[0]), h.make_node("ReduceMean", ["t"], ["o"], axes=[1], keepdims=0)],
                        "then", [], [h.make_tensor_value_info("o", T.FLOAT, [1, 4])])
    els = h.make_graph([h.make_node("Scale2", ["x"], ["s"], domain="local"), h.make_node("Unsqueeze", ["s"], ["t2"], axes=[1]),
                        h.make_node("ReduceMean", ["t2"], ["o2"], axes=[0], keepdims=0)],
                       "else", [], [h.make_tensor_value_info("o2", T.FLOAT, [1, 4])])
    fn = h.make_function("local", "Scale2", ["a"], ["b"], [h.make_node("Unsqueeze", ["a"], ["u"], axes=[0]),
                                                           h.make_node("Squeeze", ["u"], ["b0"], axes=[0]),
                                                           h.make_node("Add", ["b0", "b0"], ["b"])],
                         opset_imports=[h.make_opsetid("", 11)])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [3, 4]), h.make_tensor_value_info("c", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 11), h.make_opsetid("local", 1)], functions=[fn], ir_version=6)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    feeds = [{"x": x, "c": np.array(c)} for c in (True, False)]
    ConvertOpsetPass(18, 26, feeds, session=make_session)(model)
    assert model.opset_imports[""] == 18 and not model.functions, "functions are inlined, then converted"
    ops = _ops(model.graph)
    assert len(ops["Unsqueeze"]) == 3 and all(len(n.inputs) == 2 for n in ops["Unsqueeze"] + ops["ReduceMean"])
    helpers.check_model(model)
    for f in feeds:
        np.testing.assert_allclose(helpers.run(model, f)[0], helpers.run(proto, f)[0], rtol=RTOL)


def test_external_data_weights_are_never_read(tmp_path):
    """A model whose weights live in an external data file converts without loading them (any size)."""
    src = onnx.load(str(foreign_models.classic_cnn(tmp_path / "cnn.onnx", opset=9, ir_version=4)))
    onnx.save(src, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=1024)
    model = ir.load(tmp_path / "ext.onnx")
    ext = {k: v.const_value for k, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    assert ext
    ConvertOpsetPass(13, 26)(model)
    assert all(model.graph.initializers[k].const_value is t for k, t in ext.items())
    assert all(t._array is None for t in ext.values()), "no weight was read (onnx_ir loads external data lazily)"
    ir.save(model, tmp_path / "out.onnx")
    np.testing.assert_allclose(helpers.run(tmp_path / "out.onnx", _x(5))[0], helpers.run(_renamed(onnx.load(str(tmp_path / "cnn.onnx"))), _x(5))[0], rtol=RTOL)


def test_an_op_without_a_schema_is_refused_naming_it():
    g = h.make_graph([h.make_node("ImageScaler", ["x"], ["y"], scale=2.0)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4, 4])], [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 4, 4])])
    model = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 9)], ir_version=4))
    before = helpers.snapshot(model)
    with pytest.raises(UnsupportedModelError) as info:
        ConvertOpsetPass(13, 26)(model)
    assert str(info.value) == "cannot convert opset 9 to 13: op ImageScaler has no ONNX schema at opset 9 (a custom or removed op)"
    assert helpers.snapshot(model) == before


def test_a_mismatch_is_refused(tmp_path):
    """The gate: with a threshold no error can meet, the pass refuses (it never continues silently)."""
    model = ir.from_proto(onnx.load(str(foreign_models.classic_cnn(tmp_path / "cnn.onnx"))))
    with pytest.raises(UnsupportedModelError, match=r"opset conversion 9 -> 13 changed the float model: output 'prob' differs by 0 relative"):
        ConvertOpsetPass(13, 26, [_x()], rtol=-1.0, session=make_session)(model)


def test_compare_outputs_measures_the_difference(tmp_path):
    def model(scale):
        g = h.make_graph([h.make_node("Mul", ["x", "s"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [4])], [nh.from_array(np.float32(scale), "s")])
        p = tmp_path / f"m{scale}.onnx"
        onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8), str(p))
        return p

    x = np.array([1, -2, 3, -4], np.float32)
    r = compare_outputs(model(1.0), model(1.001), [{"x": x}], make_session)
    assert r["max_abs_err"] == pytest.approx(0.004, rel=1e-3) and r["max_rel_err"] == pytest.approx(1e-3, rel=1e-3)


def test_newer_than_the_runtime_is_refused():
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [2])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2])])
    with pytest.raises((QCompileError, ir.passes.PreconditionError), match="newer than onnxruntime supports"):
        ConvertOpsetPass(13, 26)(ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 27)], ir_version=10)))


def test_contract_second_run_is_a_noop(tmp_path):
    model = ir.from_proto(onnx.load(str(foreign_models.paddle_style(tmp_path / "p.onnx"))))
    helpers.assert_pass_contract(ConvertOpsetPass(13, 26), model, expect_modified=True)
