"""Golden test: the compile gives the same plans and the same compiled models as main did before the
issue-10 refactor (files made by `tests/golden/make.py` from 04318fb), for MiniLM and
EfficientNet-Lite0 x int8, fp8, w4, mxfp4, nvfp4, a16w8. EfficientNet-Lite0's w4, mxfp4 and nvfp4
files were made again (plans unchanged) when accuracy level "auto" stopped measuring models whose
MatMulNBits nodes do under 10% of the multiply-adds (its classifier: 0.7%): level 0 since.

On the CPU class the files were made on, plans and outputs must be identical (same onnxruntime
kernels, so any difference is a change of the compile). On another class onnxruntime's float
kernels round differently, which moves calibrated ranges in their last bits: then the plan's
structure (every node, input, format, granularity, method) must be identical, every number in it
within 1e-3 relative, and the outputs within 30 dB SQNR of the golden ones (a one-step change of a
few activation codes; a wrong scale or a missing layer gives < 15 dB).
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "golden"))
import make  # noqa: E402

pytestmark = pytest.mark.slow


def _same_structure(a, b, path="plan"):
    """Assert `a` and `b` (plan JSON) are equal except numbers, which must agree to 1e-3 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            _same_structure(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _same_structure(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    noise = float(np.sum((ref - out) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)


@pytest.mark.parametrize("case", make.CASES)
def test_golden(case):
    from qcompile.cpu import host_cpu

    stem = HERE / "golden" / case.replace(":", "-")
    with gzip.open(f"{stem}.plan.json.gz", "rt") as f:
        golden_plan = json.load(f)
    golden_out = dict(np.load(f"{stem}.outputs.npz"))
    meta = json.loads(Path(f"{stem}.meta.json").read_text())
    assert make.data_digest(case) == meta["data_sha256"], (
        "the zoo's calibration/held-out data differ from those the golden files were made with")
    plan, outs, report = make.compile_case(case)
    plan = json.loads(json.dumps(plan, sort_keys=True))
    assert outs.keys() == golden_out.keys()
    if host_cpu().value == meta["cpu"]:
        assert plan == golden_plan, "the plan changed"
        for k in outs:
            np.testing.assert_array_equal(outs[k], golden_out[k], err_msg=f"output {k} changed")
        assert report.get("accuracy_level", {}).get("level") == meta["accuracy_level"]
    else:
        _same_structure(plan, golden_plan)
        for k in outs:
            assert _sqnr(golden_out[k], outs[k]) >= 30.0, f"output {k} differs from the golden one"
