"""`--rotate auto` on real MiniLM weights (issue 11, acceptance 5): never worse than the better of
none and hadamard by more than 0.2 dB on int8, w4a8, mxfp4 and nvfp4."""
from __future__ import annotations

import pytest
from quality import N_CALIB, N_EVAL
from quality import output_sqnr as _sqnr

from qcompile import zoo

pytestmark = pytest.mark.slow
AUTO_SLACK_DB = 0.2  # acceptance 5


@pytest.fixture(scope="module")
def minilm_data():
    return (str(zoo.get_model("minilm")), str(zoo.get_data("minilm", "calib", N_CALIB)),
            str(zoo.get_data("minilm", "eval", N_EVAL)))


@pytest.mark.parametrize("target", ["int8", "w4a8", "mxfp4", "nvfp4"])
def test_rotate_auto_is_never_worse_than_the_better_of_none_and_hadamard(minilm_data, target):
    """Acceptance 5: per value, auto keeps a rotation only where it measures a smaller quantized
    output error on calibration rows; on nvfp4 (where every Hadamard block loses 1.2-1.9 dB) it
    must keep (almost) none, on int8 (+5 dB) (almost) all. On the 256 + 256 sentences of
    acceptance 2: with 64 + 64 the choice is noisier and auto fell 0.22-0.30 dB below the best
    fixed setting on int8, w4a8 and mxfp4 (when written; the 256 figures are in the README)."""
    none, had, auto = (_sqnr(minilm_data, target, **({"rotate": r} if r != "none" else {})) for r in ("none", "hadamard", "auto"))
    print(f"MiniLM {target}: none {none:.2f} dB, hadamard {had:.2f}, auto {auto:.2f}")
    assert auto >= max(none, had) - AUTO_SLACK_DB, (none, had, auto)


