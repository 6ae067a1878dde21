"""FoldBatchNormPass: inference BatchNormalization folded into the preceding Conv.

Exact rewrite: outputs equal the float graph within rtol 1e-5 (the fold is computed in float64
and rounded once to float32; one rounding per weight is ~6e-8 relative, accumulated over 27-72
products per output). The pass has no opset requirement (it runs after NormalizePass), so there is
no "opset too old" case here; see test_normalize.py.
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
from qcompile.passes.fold_batchnorm import FoldBatchNormPass

RTOL = 1e-5  # exact rewrite (see module doc)


def _f(arr, name):
    return nh.from_array(np.asarray(arr, dtype=np.float32), name)


def _bn_params(rng, i, c=4):
    return [_f(1 + 0.2 * rng.standard_normal(c), f"g{i}"), _f(0.1 * rng.standard_normal(c), f"be{i}"),
            _f(0.1 * rng.standard_normal(c), f"mu{i}"), _f(0.5 + rng.random(c), f"var{i}")]


def _model(nodes, inits, outputs, inputs=None, opset=17):
    inputs = inputs or [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])]
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info(o, T.FLOAT, ["N", 4, 8, 8]) for o in outputs], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _x(n=2, seed=5, hw=8):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, hw, hw)).astype(np.float32)}


def _assert_same_outputs(ref_proto, model: ir.Model, feeds):
    # reference at DISABLE_ALL: onnxruntime's own Conv+BN fusion must not be what we compare against
    ref = helpers.run(ref_proto, feeds, "disable")
    out = helpers.run(model, feeds, "disable")
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o, r, rtol=RTOL, atol=RTOL * float(np.abs(r).max()))


def test_folds_both_bns_of_the_cnn():
    proto = tiny_models.cnn()
    model = ir.from_proto(proto)
    before = [(n.op_type, n.name) for n in model.graph]
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=True)
    after = [(n.op_type, n.name) for n in model.graph]
    # structure: exactly the two BatchNormalization nodes are gone, everything else stays in order
    assert after == [t for t in before if t[0] != "BatchNormalization"]
    conv1, conv2 = helpers.node_by_name(model, "conv1"), helpers.node_by_name(model, "conv2")
    for conv in (conv1, conv2):
        assert len(conv.inputs) == 3 and conv.inputs[2].const_value is not None, "a bias is created"
        assert "_bnfold" in conv.inputs[1].name
    assert helpers.node_by_name(model, "relu1").inputs[0] is conv1.outputs[0]
    # BN parameters and the unfolded kernels are no longer in the model
    assert not {"g1", "be1", "mu1", "var1", "k1", "k2"} & set(model.graph.initializers)
    # numerics: the formula on conv1's first channel, and the whole model against the float graph
    W = {i.name: nh.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    k = W["g1"] / np.sqrt(W["var1"] + 1e-5)
    np.testing.assert_allclose(conv1.inputs[1].const_value.numpy(), W["k1"] * k[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(conv1.inputs[2].const_value.numpy(), W["be1"] - W["mu1"] * k, rtol=1e-6, atol=1e-7)
    _assert_same_outputs(proto, model, _x(4, hw=16))


def test_folds_into_existing_bias_and_custom_epsilon():
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "k", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g1", "be1", "mu1", "var1"], ["z"], name="bn", epsilon=0.1),
             h.make_node("Relu", ["z"], ["y"], name="relu")]
    proto = _model(nodes, [_f(rng.standard_normal((4, 3, 3, 3)), "k"), _f(rng.standard_normal(4), "b"), *_bn_params(rng, 1)], ["y"])
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=True)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    _assert_same_outputs(proto, model, _x())


def test_shared_weight_is_cloned_not_modified():
    # conv1 (followed by BN) and conv2 (no BN) share kernel k: conv2 must keep reading the original
    rng = np.random.default_rng(1)
    nodes = [h.make_node("Conv", ["x", "k"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c1", "g1", "be1", "mu1", "var1"], ["z1"], name="bn1"),
             h.make_node("Relu", ["z1"], ["y1"], name="relu1"),
             h.make_node("Conv", ["x", "k"], ["y2"], name="conv2", pads=[1, 1, 1, 1])]
    k = rng.standard_normal((4, 3, 3, 3))
    proto = _model(nodes, [_f(k, "k"), *_bn_params(rng, 1)], ["y1", "y2"])
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=True)
    conv2 = helpers.node_by_name(model, "conv2")
    assert conv2.inputs[1].name == "k"
    np.testing.assert_array_equal(conv2.inputs[1].const_value.numpy(), k.astype(np.float32))
    assert helpers.node_by_name(model, "conv1").inputs[1] is not conv2.inputs[1]
    _assert_same_outputs(proto, model, _x())


def test_shared_weight_with_two_bns():
    rng = np.random.default_rng(2)
    nodes = []
    inits = [_f(rng.standard_normal((4, 3, 3, 3)), "k")]
    for i in (1, 2):
        inits += _bn_params(rng, i)
        nodes += [h.make_node("Conv", ["x", "k"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  h.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"mu{i}", f"var{i}"], [f"z{i}"], name=f"bn{i}"),
                  h.make_node("Relu", [f"z{i}"], [f"y{i}"], name=f"relu{i}")]
    proto = _model(nodes, inits, ["y1", "y2"])
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=True)
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 0
    _assert_same_outputs(proto, model, _x())


def test_bn_output_is_a_graph_output():
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g1", "be1", "mu1", "var1"], ["y"], name="bn")]
    proto = _model(nodes, [_f(rng.standard_normal((4, 3, 3, 3)), "k"), *_bn_params(rng, 1)], ["y"])
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=True)
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert [v.name for v in model.graph.outputs] == ["y"], "the graph output keeps its name"
    _assert_same_outputs(proto, model, _x())


def _unfoldable_cases():
    rng = np.random.default_rng(4)
    k = _f(rng.standard_normal((4, 3, 3, 3)), "k")
    bn = h.make_node("BatchNormalization", ["c", "g1", "be1", "mu1", "var1"], ["z"], name="bn")
    relu = h.make_node("Relu", ["z"], ["y"], name="relu")
    conv = h.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1])
    params = _bn_params(rng, 1)
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])
    return {
        # a BN parameter that is not a constant (a graph input)
        "non-constant mean": _model([conv, bn, relu], [k, *[p for p in params if p.name != "mu1"]], ["y"],
                                    inputs=[x, h.make_tensor_value_info("mu1", T.FLOAT, [4])]),
        # a Conv kernel that is not a constant
        "non-constant kernel": _model([conv, bn, relu], params, ["y"],
                                      inputs=[x, h.make_tensor_value_info("k", T.FLOAT, [4, 3, 3, 3])]),
        # the Conv output is also read by another node: folding would change that reader
        "conv output shared": _model([conv, bn, relu, h.make_node("Sigmoid", ["c"], ["s"], name="other")], [k, *params], ["y", "s"]),
        # BN after a non-Conv producer
        "not after conv": _model([h.make_node("Relu", ["x"], ["c"], name="pre"), bn, relu], params, ["y"],
                                 inputs=[h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 8, 8])]),
    }


@pytest.mark.parametrize("case", list(_unfoldable_cases()))
def test_unfoldable_bn_is_left_alone(case):
    proto = _unfoldable_cases()[case]
    model = ir.from_proto(proto)
    helpers.assert_pass_contract(FoldBatchNormPass(), model, expect_modified=False)
    assert "BatchNormalization" in [n.op_type for n in model.graph]
