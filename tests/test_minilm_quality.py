"""qcompile vs onnxruntime's own quantizer on real MiniLM-L6, real data (EfficientNet-Lite0:
test_efficientnet_quality.py; the shared runner: quality.py).

One test, side by side, on the same 256 calibration and 256 held-out sentences (disjoint splits of
`qcompile.zoo.text`), every model measured by the same `compare` (onnxruntime ENABLE_ALL, 1 thread):

- `--target int8`: mean embedding cosine >= 0.995 vs float, and output SQNR >= the best
  onnxruntime configuration of any mode + 3 dB (issue 9), and the compiled model's SQNR on
  onnxruntime's AVX2 kernels within 0.3 dB of this CPU's (on the first 16 sentences);
- `--target fp8`: mean embedding cosine >= 0.99.

For scale (onnxruntime 1.31, this data): quantize_static QDQ on all ops (MinMax) cosine 0.355
(-1.1 dB, a broken model: the -3.4e38 attention-mask bias sets an activation range); MatMul-only
static 0.93 (8.6-8.8 dB with MinMax, percentile or entropy); quantize_dynamic per-channel 0.993
(18.4 dB); FP8 quantize_static 0.699 (2.2 dB; it only loads with onnxruntime's QDQ fusions
disabled, and then runs ~4.5x slower than float); MatMulNBits int4 0.967 (11.8 dB).

The table (SQNR, cosine mean/min, the margin to qcompile int8, build seconds, peak RSS) is printed
(visible with `pytest -s`) and written to `minilm_quality.json` under the test's tmp_path.

onnxruntime's histogram calibrators (percentile, entropy, FP8's Distribution) keep every calibrated
tensor of all 256 samples in memory: 6.3 GB peak RSS for MatMul inputs, 13.2 GB for all ops. Here
they run with `calib_stride=32` (onnxruntime's CalibStridedMinMax: histograms merged 32 samples at a
time): 1.45 GB (2.3 GB for all ops) and 13-25 s, same quality within 0.06 dB for percentile and FP8.
(Without strides MatMul-only entropy is bit-identical to MinMax, 8.64 dB: quantize_static cannot set
its bin counts, and 128 bins with 128 quantized bins leave the full range as the only candidate;
strided, the merged histograms grow past 128 bins and it reaches 8.79 dB.)

Left out of CI (`EXCLUDED`, measured on the project's 2-core machine; run them with
QCOMPILE_ALL_BASELINES=1): all-op percentile and entropy. They cannot be the best configuration:
the -3.4e38 mask bias breaks them as it breaks all-op MinMax (percentile -1.1 dB, cosine 0.356;
entropy fails to build, its histogram over +-3.4e38 overflows).
"""
from __future__ import annotations

import json
import os
import time

import pytest

from qcompile import baselines, zoo
from qcompile.zoo import text
from quality import AVX2_SAMPLES, INT8_MARGIN_DB, MAX_ISA_GAP_DB, N_CALIB, N_EVAL, int8_on_avx2, side_by_side

pytestmark = pytest.mark.slow

OUTPUT = "sentence_embedding"

# Acceptance thresholds (issue, point 3). Not tolerances to tune: they are the criteria.
INT8_MIN_COSINE = 0.995
FP8_MIN_COSINE = 0.99

# onnxruntime configurations built in CI: every mode (dynamic, static all ops / MatMul only, FP8,
# weight-only int4) and, for MatMul-only static, every calibrator.
CI_BASELINES = (
    "ort-dynamic", "ort-dynamic-pt", "ort-static-all-minmax", "ort-static-matmul-minmax",
    "ort-static-matmul-percentile", "ort-static-matmul-entropy", "ort-fp8", "ort-int4",
)
# Measured on the project's 2-core, 23 GB machine with this data (onnxruntime 1.31.1); build time
# includes quant_pre_process, peak RSS is the building process's.
EXCLUDED = {
    "ort-static-all-percentile": "-1.1 dB, cosine 0.356, broken like all-op MinMax; 25 s, 2.3 GB with stride 32 "
                                 "(59-97 s, 13.2 GB without)",
    "ort-static-all-entropy": "fails to build: its histogram over the +-3.4e38 mask bias overflows "
                              "(after 4 s, 2.3 GB with stride 32; 21-64 s, 13.1 GB without)",
}


@pytest.fixture(scope="module")
def minilm():
    """The exported MiniLM-L6 ONNX file, from $QCOMPILE_CACHE or the default cache (built once)."""
    return zoo.get_model("minilm")


def _baseline_names() -> tuple[str, ...]:
    if os.environ.get("QCOMPILE_ALL_BASELINES", "") not in ("", "0"):
        return tuple(baselines.BASELINES)
    return CI_BASELINES


def test_minilm_int8_and_fp8_beat_onnxruntime_quantizer(minilm, tmp_path):
    t_start = time.perf_counter()
    calib = text.write_npz(tmp_path / "calib.npz", "calib", N_CALIB)
    eval_npz = text.write_npz(tmp_path / "eval.npz", "eval", N_EVAL)
    (int8, fp8), ort_rows, best, table = side_by_side(minilm, calib, eval_npz, tmp_path, ["int8", "fp8"],
                                                      _baseline_names(), OUTPUT, EXCLUDED)
    int8_sqnr, int8_cos = int8["metrics"]["sqnr_db"], int8["metrics"]["cosine_mean"]
    fp8_cos = fp8["metrics"]["cosine_mean"]
    here, avx2 = int8_on_avx2(minilm, tmp_path / "qcompile-int8.onnx", eval_npz, AVX2_SAMPLES, OUTPUT, tmp_path)
    summary = {
        "calibration_samples": N_CALIB, "eval_samples": N_EVAL,
        "best_onnxruntime": best and {"config": best["config"], **best["metrics"]},
        "int8_margin_db_over_best_onnxruntime": best and round(int8_sqnr - best["metrics"]["sqnr_db"], 3),
        "int8_first_samples_this_cpu_vs_avx2_db": [here, avx2],
        "rows": [int8, fp8, *ort_rows], "excluded": EXCLUDED, "test_seconds": round(time.perf_counter() - t_start, 1),
    }
    (tmp_path / "minilm_quality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nMiniLM-L6, {N_CALIB} calibration / {N_EVAL} held-out sentences "
          f"(SQNR and cosine of {OUTPUT} vs float; 'int8 +dB' = qcompile int8 SQNR minus the row's):\n{table}\n"
          f"int8 on the first {AVX2_SAMPLES} sentences: {here:.2f} dB here, {avx2:.2f} dB on the AVX2 kernels\n"
          f"test time {summary['test_seconds']} s; JSON: {tmp_path / 'minilm_quality.json'}")

    # Without the strongest onnxruntime configuration the comparison below would prove nothing.
    dynamic = next((r for r in ort_rows if r["config"] == "ort-dynamic"), None)
    assert dynamic is not None and dynamic["metrics"] is not None, f"ort-dynamic did not run:\n{table}"

    assert int8_cos >= INT8_MIN_COSINE, f"qcompile int8 mean cosine {int8_cos:.4f} < {INT8_MIN_COSINE}\n{table}"
    assert int8_sqnr >= best["metrics"]["sqnr_db"] + INT8_MARGIN_DB, (
        f"qcompile int8 SQNR {int8_sqnr:.2f} dB < best onnxruntime configuration {best['config']} "
        f"{best['metrics']['sqnr_db']:.2f} dB + {INT8_MARGIN_DB} dB\n{table}")
    assert abs(here - avx2) <= MAX_ISA_GAP_DB, f"int8: {here:.2f} dB here, {avx2:.2f} dB on the AVX2 kernels"
    assert fp8_cos >= FP8_MIN_COSINE, f"qcompile fp8 mean cosine {fp8_cos:.4f} < {FP8_MIN_COSINE}\n{table}"
