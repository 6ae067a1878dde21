"""Cross-layer equalization (passes/equalize.py, the `equalization` stages, `--cle`)."""
from __future__ import annotations

import helpers
import numpy as np
import onnx_ir as ir
import pytest
import tiny_models

import qcompile
from qcompile.errors import InputError
from qcompile.passes import equalize
from qcompile.passes.normalize import NormalizePass


def _model(proto):
    model = ir.from_proto(proto)
    NormalizePass(21, 26)(model)
    return model


def _ranges(model, node, axis_of):
    n = {x.name: x for x in model.graph}[node]
    w = n.inputs[1].const_value.numpy()
    return equalize._ranges(w, axis_of(n))


@pytest.mark.parametrize("build,expect", [
    (tiny_models.depthwise_cnn, [("expand", "depthwise", "Clip"), ("depthwise", "project", "Clip")]),
    (tiny_models.mlp, [("fc1", "fc2", "Relu")]),
])
def test_chains_equalize_exactly(build, expect):
    """The chains CLE can scale (the stem's output also feeds the residual Add: not a chain); after
    DFQ's scales W1's output ranges equal W2's input ranges (sqrt(r1 r2)); the function is unchanged
    to float32 rounding; a Relu6 becomes Relu + a per-channel Min; a second run scales nothing."""
    proto = build()
    model = _model(proto)
    found = equalize.chains(model.graph)
    nodes = {n.name: n for n in model.graph}
    assert [(c.producer, c.consumer, nodes[c.activation].op_type) for c in found] == expect
    scales = equalize.equalization_scales(model.graph, found)
    assert all(np.any(np.abs(np.log(s)) > 0.1) for s in scales.values()), "heavy-tailed weights need real scales"
    feeds = tiny_models.inputs_for(proto, 4, seed=2)
    ref = helpers.session(proto, "disable").run(None, feeds)[0]
    helpers.assert_pass_contract(equalize.CrossLayerEqualizationPass(scales), model, expect_modified=True)
    got = helpers.session(ir.to_proto(model), "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    last = found[-1]  # the last chain's consumer is no producer: its ranges are exactly balanced
    r1 = _ranges(model, last.producer, equalize.out_axis)
    r2 = _ranges(model, last.consumer, equalize.in_axis)
    if last.producer not in {c.consumer for c in found}:
        np.testing.assert_allclose(r1, r2, rtol=1e-4)
    ops = [n.op_type for n in model.graph]
    assert "Clip" not in ops and ops.count("Min") == sum(a == "Clip" for *_, a in expect)
    assert all(equalize.EQUALIZED_KEY in nodes[c.producer].metadata_props for c in found)


def test_cle_per_tensor_gains_and_per_channel_is_untouched(tmp_path):
    """Through the compile: per-tensor int8 weights get scales (the gain is measured on real
    EfficientNet weights, tests/test_cle_quality.py: these random ones have no disparate channels);
    per-channel int8 has every producer's scales absorbed by its quantizer, so nothing is scaled;
    the plan records the scales and a replay gives the same model; target none stays exact."""
    proto = tiny_models.depthwise_cnn()
    path = tmp_path / "dw.onnx"
    import onnx

    onnx.save(proto, str(path))
    x = np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x[:32])
    np.savez(tmp_path / "e.npz", x=x[32:])
    kw = dict(calib=str(tmp_path / "c.npz"), eval=str(tmp_path / "e.npz"), min_sqnr=-100)
    sq = lambda r: r.report["verdict"]["worst_output_sqnr_db"]
    base, cle = (qcompile.compile(str(path), "w:int8/tensor,a:int8", cle=c, **kw) for c in (False, True))
    assert set(cle.plan.equalization) == {"expand", "depthwise"}
    assert sq(cle) > 20 and sq(base) > 20, (sq(base), sq(cle))
    entries = [e for e in cle.report["transforms"] if e["transform"] == "equalize"]
    assert [e["nodes"] for e in entries] == [["expand", "depthwise"], ["depthwise", "project"]]
    assert qcompile.compile(str(path), "int8", cle=True, **kw).plan.equalization == {}
    cle.plan.save(tmp_path / "plan.json")
    replay = qcompile.compile(str(path), "w:int8/tensor,a:int8", plan=str(tmp_path / "plan.json"), **kw)
    assert (ir.to_proto(replay.model).SerializeToString(deterministic=True)
            == ir.to_proto(cle.model).SerializeToString(deterministic=True))
    none = qcompile.compile(str(path), "none", cle=True, **kw)
    assert none.plan.equalization and none.report["outputs"]["logits"]["sqnr_db"] > 100
    with pytest.raises(InputError, match="cle"):
        qcompile.compile(str(path), "int8", cle="yes", **kw)
