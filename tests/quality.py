"""Side-by-side quality runs shared by the real-model tests: qcompile targets and onnxruntime's own
quantizer (`qcompile.baselines`) built in fresh processes on the same calibration data, measured by the
same `compare` (onnxruntime ENABLE_ALL, 1 thread) on the same held-out data, and the compiled int8
model re-run on onnxruntime's AVX2 kernels (`helpers.run_avx2`).
"""
from __future__ import annotations

import json
import subprocess
import sys

from qcompile import baselines
from qcompile.backends.onnxruntime.session import make_session

N_CALIB = 256
N_EVAL = 256
# issue 9, acceptance 2: qcompile int8 >= the best onnxruntime mode + 3 dB, on every CPU, and the
# compiled model's SQNR on the AVX2 kernels within 0.3 dB of this CPU's
INT8_MARGIN_DB = 3.0
MAX_ISA_GAP_DB = 0.3
AVX2_SAMPLES = 16  # held-out samples run on the AVX2 kernels (qemu is ~30-100x slower than native)
# Histogram calibrators merge 32 samples at a time (onnxruntime's CalibStridedMinMax), see
# test_minilm_quality.py.
CALIB_STRIDE = 32
BUILD_TIMEOUT_S = 900
_SQNR: dict = {}  # (data, target, settings) -> worst output SQNR (`output_sqnr`)


def output_sqnr(data: tuple[str, str, str], target: str, **kw) -> float:
    """The compile's own validation figure (worst output SQNR, dB) of (model, calib, eval) `data`
    compiled for `target` with `kw`, cached for the session: tests of one module share compiles."""
    import qcompile

    key = (data, target, tuple(sorted(kw.items())))
    if key not in _SQNR:
        model, calib, eval_ = data
        r = qcompile.compile(model, target, calib=calib, eval=eval_, min_sqnr=-100, **kw)
        _SQNR[key] = r.report["verdict"]["worst_output_sqnr_db"]
    return _SQNR[key]


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


def qcompile_row(model, target: str, calib, eval_npz, out_dir, output: str) -> dict:
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


def baseline_row(name: str, model, calib, eval_npz, out_dir, float_session, output: str) -> dict:
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


def format_rows(rows: list[dict], int8_sqnr: float, excluded: dict[str, str]) -> str:
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
    for name, why in excluded.items():
        if not any(r["config"] == name for r in rows):
            lines.append(f"{name:<30} {'not run in CI':>44}  {why}")
    return "\n".join(lines)


def int8_on_avx2(model, compiled, eval_npz, n: int, output: str, tmp_path) -> tuple[float, float]:
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


def side_by_side(model, calib, eval_npz, tmp_path, targets: list[str], baselines_: tuple[str, ...], output: str,
                 excluded: dict[str, str] | None = None):
    """qcompile's targets and onnxruntime's configurations on the same data: rows, best onnxruntime row, table."""
    rows = [qcompile_row(model, t, calib, eval_npz, tmp_path, output) for t in targets]
    float_session = make_session(str(model))  # ENABLE_ALL, 1 thread: the reference for every baseline
    ort_rows = [baseline_row(name, model, calib, eval_npz, tmp_path, float_session, output) for name in baselines_]
    measured = [r for r in ort_rows if r["metrics"] is not None]
    best = max(measured, key=lambda r: r["metrics"]["sqnr_db"], default=None)
    return rows, ort_rows, best, format_rows(rows + ort_rows, rows[0]["metrics"]["sqnr_db"], excluded or {})
