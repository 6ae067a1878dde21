"""qcompile vs onnxruntime's own quantizer on real MiniLM-L6 and EfficientNet-Lite0, real data.

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
import subprocess
import sys
import time

import pytest

from qcompile import baselines, zoo
from qcompile.backends.onnxruntime.session import make_session
from qcompile.zoo import text

pytestmark = pytest.mark.slow

N_CALIB = 256
N_EVAL = 256
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
# Histogram calibrators merge 32 samples at a time (onnxruntime's CalibStridedMinMax), see above.
CALIB_STRIDE = 32
BUILD_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def minilm():
    """The exported MiniLM-L6 ONNX file, from $QCOMPILE_CACHE or the default cache (built once)."""
    return zoo.get_model("minilm")


def _baseline_names() -> tuple[str, ...]:
    if os.environ.get("QCOMPILE_ALL_BASELINES", "") not in ("", "0"):
        return tuple(baselines.BASELINES)
    return CI_BASELINES


_QCOMPILE_CHILD = """
import json, sys, time
import qcompile
from qcompile.baselines import peak_rss_bytes
from qcompile.errors import ValidationFailed
model, target, calib, eval_npz, out = sys.argv[1:]
t0 = time.perf_counter()
try:
    result, error = qcompile.compile(model, target, calib=calib, eval=eval_npz), None
except ValidationFailed as e:  # below the target's own gate: still report (and judge) its numbers
    result, error = e.result, str(e)
seconds = time.perf_counter() - t0
qcompile.save_model(result.model, out)
print(json.dumps({"outputs": result.report["outputs"], "error": error, "seconds": round(seconds, 3),
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def _qcompile_row(model, target: str, calib, eval_npz, out_dir, output: str = OUTPUT) -> dict:
    """`qcompile.compile` in a fresh process, like the baselines, so its peak RSS is its own.

    compile validates on `eval_npz` with `compare` in the session `baselines.evaluate` uses, so its
    report's metrics are the ones the baselines get.
    """
    out = out_dir / f"qcompile-{target}.onnx"
    proc = subprocess.run([sys.executable, "-c", _QCOMPILE_CHILD, str(model), target, str(calib), str(eval_npz),
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, f"qcompile {target} crashed:\n{proc.stderr[-3000:]}"
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"config": f"qcompile {target}", "metrics": rec["outputs"][output], "error": rec["error"],
            "seconds": rec["seconds"], "peak_rss_bytes": rec["peak_rss_bytes"]}


def _baseline_row(name: str, model, calib, eval_npz, out_dir, float_session, output: str = OUTPUT) -> dict:
    rec = baselines.build_isolated(name, model, calib, out_dir / f"{name}.onnx",
                                   calib_stride=CALIB_STRIDE if name in baselines.HISTOGRAM_CALIBRATED else None, timeout=BUILD_TIMEOUT_S)
    row = {"config": name, "metrics": None, "error": rec["error"], "seconds": rec["seconds"],
           "peak_rss_bytes": rec["peak_rss_bytes"]}
    if rec["error"] is None:
        row["metrics"] = baselines.evaluate(model, rec["path"], eval_npz, float_session=float_session)[output]
    elif rec["stage"] == "load":
        # Built, but onnxruntime's default session rejects it: measure it the only way it runs.
        row["metrics"] = baselines.evaluate(model, rec["path"], eval_npz, float_session=float_session,
                                            session_config=baselines.FALLBACK_SESSION_CONFIG)[output]
        row["session"] = baselines.FALLBACK_SESSION_CONFIG
    return row


def _format(rows: list[dict], int8_sqnr: float) -> str:
    head = f"{'configuration':<30} {'SQNR dB':>8} {'cos mean':>9} {'cos min':>8} {'int8 +dB':>8} {'build s':>8} {'RSS GB':>7}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["metrics"]
        rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r.get("peak_rss_bytes") else "-"
        if m:
            nums = f"{m['sqnr_db']:>8.2f} {m['cosine_mean']:>9.4f} {m['cosine_min']:>8.4f} {int8_sqnr - m['sqnr_db']:>8.2f}"
        else:
            nums = f"{'-':>8} {'-':>9} {'-':>8} {'-':>8}"
        note = f"failed: {r['error']}" if r.get("error") else ""
        if r.get("session"):
            note = f"[metrics with {r['session']}] {note}"
        lines.append(f"{r['config']:<30} {nums} {r['seconds']:>8.1f} {rss:>7}  {note[:200]}")
    for name, why in EXCLUDED.items():
        if not any(r["config"] == name for r in rows):
            lines.append(f"{name:<30} {'not run in CI':>44}  {why}")
    return "\n".join(lines)


def _int8_on_avx2(model, compiled, eval_npz, n: int, output: str, tmp_path) -> tuple[float, float]:
    """SQNR of the compiled int8 model on the first n held-out samples, from this CPU's kernels and
    from onnxruntime's AVX2 kernels (natively without AVX-512/VNNI, else under qemu -cpu Haswell)."""
    import numpy as np

    import helpers

    with np.load(eval_npz) as z:
        feeds = {k: z[k][:n] for k in z.files if k in {i.name for i in make_session(str(model)).get_inputs()}}
    names = [o.name for o in make_session(str(model)).get_outputs()]
    ref = make_session(str(model)).run([output], feeds)[0]
    here = make_session(str(compiled)).run([output], feeds)[0]
    avx2 = helpers.run_avx2([compiled], feeds, tmp_path)[0][names.index(output)]
    return helpers.sqnr_db(ref, here), helpers.sqnr_db(ref, avx2)


def _side_by_side(model, calib, eval_npz, tmp_path, targets: list[str], baselines_: tuple[str, ...], output: str):
    """qcompile's targets and onnxruntime's configurations on the same data: rows, best onnxruntime row, table."""
    rows = [_qcompile_row(model, t, calib, eval_npz, tmp_path, output) for t in targets]
    float_session = make_session(str(model))  # ENABLE_ALL, 1 thread: the reference for every baseline
    ort_rows = [_baseline_row(name, model, calib, eval_npz, tmp_path, float_session, output) for name in baselines_]
    measured = [r for r in ort_rows if r["metrics"] is not None]
    best = max(measured, key=lambda r: r["metrics"]["sqnr_db"], default=None)
    return rows, ort_rows, best, _format(rows + ort_rows, rows[0]["metrics"]["sqnr_db"])


# issue 9, acceptance 2: qcompile int8 >= the best onnxruntime mode + 3 dB, on every CPU
INT8_MARGIN_DB = 3.0
AVX2_SAMPLES = 16  # held-out samples run on the AVX2 kernels (qemu is ~30-100x slower than native)
MAX_ISA_GAP_DB = 0.3


def test_minilm_int8_and_fp8_beat_onnxruntime_quantizer(minilm, tmp_path):
    t_start = time.perf_counter()
    calib = text.write_npz(tmp_path / "calib.npz", "calib", N_CALIB)
    eval_npz = text.write_npz(tmp_path / "eval.npz", "eval", N_EVAL)
    (int8, fp8), ort_rows, best, table = _side_by_side(minilm, calib, eval_npz, tmp_path, ["int8", "fp8"],
                                                       _baseline_names(), OUTPUT)
    int8_sqnr, int8_cos = int8["metrics"]["sqnr_db"], int8["metrics"]["cosine_mean"]
    fp8_cos = fp8["metrics"]["cosine_mean"]
    here, avx2 = _int8_on_avx2(minilm, tmp_path / "qcompile-int8.onnx", eval_npz, AVX2_SAMPLES, OUTPUT, tmp_path)
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


# EfficientNet-Lite0: every onnxruntime int8 mode that quantizes its convolutions (all-op static with
# each calibrator; dynamic quantizes only the classifier Gemm: 3.6 dB) against qcompile int8.
EFFICIENTNET_BASELINES = ("ort-dynamic", "ort-static-all-minmax", "ort-static-all-percentile", "ort-static-all-entropy")


def test_efficientnet_int8_beats_onnxruntime_quantizer(tmp_path):
    model = zoo.get_model("efficientnet-lite0")
    calib, eval_npz = zoo.get_data("efficientnet-lite0", "calib", N_CALIB), zoo.get_data("efficientnet-lite0", "eval", N_EVAL)
    (int8,), ort_rows, best, table = _side_by_side(model, calib, eval_npz, tmp_path, ["int8"], EFFICIENTNET_BASELINES, "logits")
    here, avx2 = _int8_on_avx2(model, tmp_path / "qcompile-int8.onnx", eval_npz, AVX2_SAMPLES // 2, "logits", tmp_path)
    print(f"\nEfficientNet-Lite0, {N_CALIB} calibration / {N_EVAL} held-out images (logits vs float):\n{table}\n"
          f"int8 on the first {AVX2_SAMPLES // 2} images: {here:.2f} dB here, {avx2:.2f} dB on the AVX2 kernels")
    assert best is not None, table
    assert int8["metrics"]["sqnr_db"] >= best["metrics"]["sqnr_db"] + INT8_MARGIN_DB, table
    assert abs(here - avx2) <= MAX_ISA_GAP_DB, f"int8: {here:.2f} dB here, {avx2:.2f} dB on the AVX2 kernels"
