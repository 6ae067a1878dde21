"""Old and odd exports (issue 9, "What was seen" 2 and the IR-3 item of 3): models shaped the way
older exporters wrote them, built with onnx.helper (`foreign_models`), compile and run.

- an opset-9 (and opset-7) IR-3 CNN, every initializer also a graph input, unfused BatchNorm, Upsample,
  Squeeze/Unsqueeze `axes` attributes, an unnamed node, a duplicate node name, an unused initializer:
  onnxscript's converter refused it for int8 ("Target opset version 13 is not supported");
- an opset-17 encoder with ReduceMean/ReduceL2 `axes` attributes (and its opset-11 form with an
  Unsqueeze `axes` attribute): fp8/nvfp4/w4/mxfp4 kept the attributes at opset >= 18 and failed in
  calibration (INVALID_GRAPH) or in onnx.checker;
- an opset-11 Paddle-style backbone: Constants only, BatchNorm with and without a Conv, Clip/Pad/Resize
  with their opset-11 inputs.

Each compile uses 16 synthesized calibration samples and validates on 16 more, at the target's own
gate; the output passes onnx.checker and runs in onnxruntime (ENABLE_ALL) fed the data inputs only.
The opset conversion is reported and exact (max relative error <= 1e-5: the adapters change op forms,
not arithmetic).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import foreign_models
import helpers
import tiny_models
import qcompile

RTOL = 1e-5  # the conversion is exact (see module doc)
N = 16

CASES = [
    ("classic_cnn9", "int8"), ("classic_cnn9", "fp8"), ("classic_cnn9", "w4"),
    ("classic_cnn7", "int8"),
    ("encoder17", "fp8"), ("encoder17", "nvfp4"), ("encoder17", "w4"), ("encoder17", "mxfp4"),
    ("encoder11", "int8"), ("encoder11", "fp8"),
    ("paddle11", "int8"), ("paddle11", "fp8"), ("paddle11", "w4"),
]
BUILD = {
    "classic_cnn9": lambda p: foreign_models.classic_cnn(p, opset=9),
    "classic_cnn7": lambda p: foreign_models.classic_cnn(p, opset=7),
    "encoder17": lambda p: foreign_models.reduce_attr_encoder(p, opset=17),
    "encoder11": lambda p: foreign_models.reduce_attr_encoder(p, opset=11),
    "paddle11": foreign_models.paddle_style,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("old-exports")
    return {k: b(d / f"{k}.onnx") for k, b in BUILD.items()}


def _feeds(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    if name.startswith("encoder"):
        return foreign_models.reduce_attr_data(n, seed)
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("name,target", CASES)
def test_old_export_compiles_and_runs(models, name, target):
    src = models[name]
    source_opset = onnx.load(str(src)).opset_import[0].version
    before = src.read_bytes()
    result = qcompile.compile(str(src), target, calib=_feeds(name, N, 0), eval=_feeds(name, N, 1))
    assert src.read_bytes() == before, "the input file is never modified"
    assert result.passed
    conv = result.report["opset_conversion"]
    assert conv["from"] == source_opset and conv["to"] == result.model.opset_imports[""] > source_opset
    assert conv["samples"] == 8 and conv["max_rel_err"] <= RTOL
    assert result.model.opset_imports[""] == qcompile.pipeline.required_opset_for(
        qcompile.targets.get_target(target).formats(), qcompile.targets.get_target(target).weights.granularity == "block",
        qcompile.backends.onnxruntime.capabilities.CAPABILITIES), "raised only as far as the target needs"
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = {k: v[:1] if name != "encoder17" and name != "encoder11" else v[:2] for k, v in _feeds(name, 2, 2).items()}
    sess = helpers.session(proto, "all")
    assert [i.name for i in sess.get_inputs()] == list(feeds), "only the data inputs are required"
    assert all(np.isfinite(o).all() for o in sess.run(None, feeds))


@pytest.mark.parametrize("ir_version", [3, 7])
def test_initializer_inputs_become_constants(ir_version):
    """IR 3 lists every weight as a graph input (later IRs allow it as overridable defaults): the compiled
    model must run fed the data input only. On the old main an opset-17 CNN so listed failed in
    calibration: "Required inputs ([k1, k2, g1, ...]) are missing" (BatchNorm folded away, weights quantized)."""
    src = foreign_models.initializers_as_inputs(tiny_models.cnn(), ir_version)
    assert len(src.graph.input) == 1 + len(src.graph.initializer)
    feeds = tiny_models.inputs_for(tiny_models.cnn(), 2 * N, seed=0)
    result = qcompile.compile(src, "int8", calib={k: v[:N] for k, v in feeds.items()}, eval={k: v[N:] for k, v in feeds.items()})
    assert result.passed
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert result.model.ir_version >= 8, "raised to what the opset needs"
    (y,) = helpers.run(result.model, tiny_models.inputs_for(tiny_models.cnn(), 1, seed=3))
    assert np.isfinite(y).all()
