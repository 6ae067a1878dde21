"""Issue 9, acceptance 3: TorchScript (`dynamo=False`) exports of MiniLM (opset 17) and
EfficientNet-Lite0 (opset 13) compile to every target in the registry and pass validation on
held-out data (16 real calibration and 16 disjoint held-out samples, the target's own gate).

These exports are what onnxscript's converter broke on: MiniLM's ReduceL2 with an `axes` attribute at
opset 17 (kept at >= 18: INVALID_GRAPH), and opset 13 refused outright. Every compile that
raises the opset reports the conversion, checked here to be exact (max relative error <= 1e-5 on
the calibration inputs).

CI compiles `CI_CASES` (the opset conversions 17 -> 19 / 21 and 13 -> 21, and the fused int8 path):
one compile takes 25-55 s on the project's 2-core machine (MiniLM int8 with its SmoothQuant search
and the MX targets' function ops 250-320 s, measured with the machine shared), so all 34 do not fit
the suite's budget. `QCOMPILE_ALL_TARGETS=1` runs every target of the registry on both models.

On EfficientNet-Lite0 every target that quantizes the Convs' weights other than `int8` first lands
below its gate (w8 17.3 dB, fp8 4.4, fp6-e3m2 5.4, mxfp8 4.0: the stem and first depthwise/projection
convs decide the output, `qcompile.restore`); the compile then keeps the most sensitive layers in float
(1 for w8 and a16w8, 2-12 of 50 for the others, <= 5 % of the weights) and passes. A target still below
its gate is a strict xfail with the measured figure, so it turns red the day it is fixed: `mxfp4` (W4A4)
at -0.4 dB, where even its weights alone (`w:mxfp4`, every activation float) give 2.5 dB < 5, so no
restore within the budget reaches the gate. The dynamo export of the zoo gives the same figures, so it
is the quantizer's quality on this network, not the export.
"""
from __future__ import annotations

import os

import pytest

import qcompile
from qcompile import restore, zoo
from qcompile.errors import ValidationFailed

pytestmark = pytest.mark.slow

N = 16
RTOL = 1e-5  # the opset conversion is exact
MODELS = ("minilm-torchscript", "efficientnet-lite0-torchscript")
CI_CASES = {("minilm-torchscript", "fp8"), ("minilm-torchscript", "w4"), ("minilm-torchscript", "w8"),
            ("efficientnet-lite0-torchscript", "int8"), ("efficientnet-lite0-torchscript", "w4"),
            ("efficientnet-lite0-torchscript", "fp8")}  # fp8: 4.4 dB, passes with 4-8 layers restored
ALL = os.environ.get("QCOMPILE_ALL_TARGETS") == "1"
# Output SQNR on 16/16 samples below the target's gate (AMD EPYC with AVX-512 VNNI); see the module doc.
_EFF = "efficientnet-lite0-torchscript"
BELOW_GATE: dict[tuple[str, str], str] = {
    (_EFF, "mxfp4"): "-0.37 dB < 5; weights alone 2.45 dB: no restore within 5 % of the weights reaches it",
}


def _cases():
    for model in MODELS:
        for target in qcompile.TARGETS:
            if not ALL and (model, target) not in CI_CASES:
                continue
            reason = BELOW_GATE.get((model, target))
            marks = [pytest.mark.xfail(strict=True, raises=ValidationFailed, reason=reason)] if reason else []
            yield pytest.param(model, target, marks=marks, id=f"{model}-{target}")


@pytest.fixture(scope="module")
def data():
    """{model: (path, calib npz, held-out npz)}, from the shared zoo cache (built on first use)."""
    return {m: (zoo.get_model(m), zoo.get_data(m, "calib", N), zoo.get_data(m, "eval", N)) for m in MODELS}


def test_exports_are_the_old_opsets(data):
    import onnx

    for model, want in zip(MODELS, (17, 13)):
        proto = onnx.load(str(data[model][0]), load_external_data=False)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [want]
    minilm = onnx.load(str(data["minilm-torchscript"][0]), load_external_data=False)
    # the final L2 normalization: ReduceL2 with an `axes` attribute (an input from opset 18)
    assert any(n.op_type == "ReduceL2" and any(a.name == "axes" for a in n.attribute) for n in minilm.graph.node)


@pytest.mark.parametrize("model,target", list(_cases()))
def test_compiles_to_every_target_and_validates(data, model, target):
    path, calib, held = data[model]
    try:
        result = qcompile.compile(str(path), target, calib=str(calib), eval=str(held))
    except ValidationFailed as e:
        print(f"\n{model} {target}: {e}")  # the figures of the README table (pytest -s)
        raise
    restored = result.report.get("restored")
    first = restored["first_sqnr_db"] if restored else None
    print(f"\n{model} {target}: {result.report['verdict']['worst_output_sqnr_db']:.2f} dB"
          + (f" (first {first:.2f} dB, {len(restored['layers'])} layers restored)" if restored else ""))
    assert result.passed and result.report["validation"]["samples"] == N
    if restored is not None:  # kept in float to meet the gate: within the budget, named in the layer table
        assert restored["weight_share"] <= restore.BUDGET
        kept = {r["node"] for r in result.report["layers"] if "kept_float" in r}
        assert {r["node"] for r in restored["layers"]} <= kept
    conv = result.report.get("opset_conversion")
    source = 17 if model.startswith("minilm") else 13
    if result.model.opset_imports[""] > source:
        assert conv is not None and conv["from"] == source and conv["to"] == result.model.opset_imports[""]
        assert conv["max_rel_err"] <= RTOL, conv
    else:
        assert conv is None
