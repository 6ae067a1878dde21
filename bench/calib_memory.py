#!/usr/bin/env python3
"""Calibration peak memory vs number of samples: qcompile beside onnxruntime's quantize_static.

    python bench/calib_memory.py                       # MiniLM (qcompile.zoo), the full comparison
    python bench/calib_memory.py --repeat 3            # medians of 3 runs per row
    python bench/calib_memory.py --model models/digits_mlp.onnx --calib models/digits_calib.npz \\
        --qcompile-samples 64 512 --skip-ort           # any model + .npz (first axis = samples)

Every compile runs in its own child process; its peak RSS is the child's own ``ru_maxrss`` as
returned by ``os.wait4`` (getrusage of that one child, not the running maximum over all children),
and its wall time includes interpreter start-up and model loading. Children volunteer to the
kernel's OOM killer (oom_score_adj 1000) and are stopped, and their row marked "not measured", if
the machine's available memory falls below ``--min-free-mb``: onnxruntime's histogram
calibrators keep every calibrated activation of every sample in memory.

What varies is only the number of calibration samples: all sample counts are the first ``n`` rows
of one ``.npz`` (for MiniLM: ``qcompile.zoo.text.write_npz(path, "calib", max n)``, padded once to
its longest sentence), so every run sees batches of the same shape. qcompile runs
``--target int8 --no-validate`` with a fixed 16-sample ``--eval`` file (so no calibration sample is
held out); onnxruntime runs ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations,
batches of ``--batch-size``) with the percentile and entropy calibrators, its calibration session
patched to one thread like qcompile's. ``HF_HUB_OFFLINE=1``.

Prints a markdown table (tool, method, samples, peak RSS MB, wall s) and the peak-RSS ratio between
the largest and smallest sample count of each (tool, method); writes the same as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
EVAL_SAMPLES = 16
OPS_LABEL = {"all": "all ops", "matmul": "MatMul/Gemm/Conv"}  # onnxruntime's default op set, or qcompile's
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------- child
def ort_child(model: str, calib: str, out: str, method: str, batch_size: int, ops: str) -> None:
    """quantize_static in this process (run by the parent as a child); prints a JSON line."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization import calibrate as ort_calibrate

    def one_thread_session(self):  # CalibraterBase.create_inference_session with 1 intra-op thread
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so,
                                                  providers=self.execution_providers)

    ort_calibrate.CalibraterBase.create_inference_session = one_thread_session

    inputs = [i.name for i in onnx.load(model, load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            with np.load(calib) as z:
                self.data = {k: z[k] for k in inputs}
            n = len(next(iter(self.data.values())))
            self.starts = iter(range(0, n, batch_size))

        def get_next(self):
            s = next(self.starts, None)
            return None if s is None else {k: v[s : s + batch_size] for k, v in self.data.items()}

    t0 = time.perf_counter()
    quantize_static(
        model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method={"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
                          "minmax": CalibrationMethod.MinMax}[method],
        op_types_to_quantize=["MatMul", "Gemm", "Conv"] if ops == "matmul" else None,
    )
    print(json.dumps({"quantize_seconds": round(time.perf_counter() - t0, 3)}))


# -------------------------------------------------------------------------------------------- parent
def _volunteer_for_oom_killer() -> None:
    """In the child: if the machine runs out of memory, the kernel kills this process first."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


class LowMemory(RuntimeError):
    """The machine's available memory fell below the floor while a child ran; it was stopped."""


class ChildFailed(RuntimeError):
    """The child exited non-zero; the message is the last line of its stderr."""


def run_child(cmd: list[str], min_free_mb: float) -> dict:
    """Run cmd to completion; its own peak RSS (MB, from wait4), wall seconds and stdout.

    The child is polled (os.wait4 with WNOHANG, which leaves its rusage to us when it exits) and
    killed if the machine's available memory drops below `min_free_mb` (LowMemory), so that an
    onnxruntime calibrator that keeps every activation cannot push a shared machine into swap/OOM.
    """
    import psutil

    env = {**os.environ, **CHILD_ENV}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_volunteer_for_oom_killer)
        killed_at = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if killed_at is None and psutil.virtual_memory().available < min_free_mb * 2**20:
                try:
                    killed_at = psutil.Process(proc.pid).memory_info().rss / 2**20
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if killed_at is not None:
            raise LowMemory(f"stopped at {killed_at:.0f} MB RSS (peak {usage.ru_maxrss / 1024:.0f} MB) after {wall:.0f} s: "
                            f"less than {min_free_mb:.0f} MB of memory left on the machine")
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines() or ["(no stderr)"]
            print("\n".join(lines[-15:]), file=sys.stderr)
            raise ChildFailed(f"exit {proc.returncode} after peaking at {usage.ru_maxrss / 1024:.0f} MB: {lines[-1][:120]}")
        out.seek(0)
        stdout = out.read().decode()
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "stdout": stdout}


def qcompile_cmd(model: Path, calib: Path, eval_: Path, out: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "qcompile.cli", str(model), "--target", "int8", "--calib", str(calib),
            "--eval", str(eval_), "--no-validate", "--batch-size", str(batch_size), "-o", str(out), "--json", "-q"]


def ort_cmd(model: Path, calib: Path, out: Path, method: str, batch_size: int, ops: str) -> list[str]:
    return [sys.executable, str(HERE), "--_ort-child", str(model), str(calib), str(out), method, str(batch_size), ops]


def slice_npz(src: Path, dst: Path, n: int, keep: list[str] | None = None) -> Path:
    with np.load(src) as z:
        keys = [k for k in z.files if keep is None or k in keep]
        arrays = {k: z[k][:n] for k in keys}
    have = len(next(iter(arrays.values())))
    if have < n:
        raise SystemExit(f"{src} has {have} samples, {n} requested")
    np.savez(dst, **arrays)
    return dst


def prepare(args, work: Path) -> tuple[Path, Path, Path, dict]:
    """(model, calib with max n samples, eval, info)."""
    n_max = max(args.qcompile_samples + ([] if args.skip_ort else args.ort_samples))
    if args.model == "minilm":
        from qcompile.zoo import get_model
        from qcompile.zoo.text import write_npz

        model = get_model("minilm")
        calib = write_npz(work / "calib_all.npz", "calib", n_max, max_length=args.max_length)
        eval_ = write_npz(work / "eval.npz", "eval", EVAL_SAMPLES, max_length=args.max_length)
    else:
        if not args.calib:
            raise SystemExit("--calib is required with a model path")
        model, calib = Path(args.model), Path(args.calib)
        eval_ = Path(args.eval) if args.eval else slice_npz(calib, work / "eval.npz", EVAL_SAMPLES)
    with np.load(calib) as z:
        shapes = {k: list(z[k].shape) for k in z.files}
    return model, calib, eval_, {"model": str(model), "model_mb": round(model.stat().st_size / 2**20, 1),
                                 "calib_shapes": shapes}


def measure(args) -> dict:
    import onnx
    import onnxruntime
    import psutil

    import qcompile

    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-memory-", dir=args.workdir) as d:
        work = Path(d)
        model, calib_all, eval_, info = prepare(args, work)
        inputs = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
        files = {n: slice_npz(calib_all, work / f"calib_{n}.npz", n, inputs)
                 for n in sorted(set(args.qcompile_samples + ([] if args.skip_ort else args.ort_samples)))}
        jobs = [("qcompile", "int8 (target default)", n, qcompile_cmd(model, files[n], eval_, work / "out.onnx", args.batch_size))
                for n in args.qcompile_samples]
        if not args.skip_ort:
            jobs += [("onnxruntime", f"quantize_static {m}, {OPS_LABEL[ops]}", n,
                      ort_cmd(model, files[n], work / "out.onnx", m, args.batch_size, ops))
                     for ops in args.ort_ops for m in args.ort_methods for n in args.ort_samples]
        for tool, method, n, cmd in jobs:
            runs, aborted = [], None
            for r in range(args.repeat):
                try:
                    res = run_child(cmd, args.min_free_mb)
                except (LowMemory, ChildFailed) as e:
                    aborted = f"{'stopped' if isinstance(e, LowMemory) else 'failed'}: {e}"
                    print(f"  {tool:<12} {method:<28} n={n:<5} run {r + 1}/{args.repeat}: {e}", file=sys.stderr, flush=True)
                    break
                print(f"  {tool:<12} {method:<28} n={n:<5} run {r + 1}/{args.repeat}: "
                      f"{res['peak_rss_mb']:8.1f} MB {res['wall_s']:7.1f} s", file=sys.stderr, flush=True)
                runs.append(res)
            row = {"tool": tool, "method": method, "samples": n}
            if aborted:
                rows.append({**row, "peak_rss_mb": None, "wall_s": None, "aborted": aborted})
                continue
            row.update(peak_rss_mb=round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                       wall_s=round(statistics.median(r["wall_s"] for r in runs), 2),
                       runs=[{"peak_rss_mb": round(r["peak_rss_mb"], 1), "wall_s": round(r["wall_s"], 2)} for r in runs])
            if tool == "qcompile":
                report = json.loads(runs[-1]["stdout"])
                row["calibrated_samples"] = report["calibration"]["samples"]
                if row["calibrated_samples"] != n:
                    raise RuntimeError(f"qcompile calibrated on {row['calibrated_samples']} samples, not {n}")
                row["stage_seconds"] = {p["name"]: p["seconds"] for p in report["passes"] if p["seconds"] >= 0.5}
            rows.append(row)

    ratios = {}
    for key in dict.fromkeys((r["tool"], r["method"]) for r in rows):
        group = sorted((r for r in rows if (r["tool"], r["method"]) == key and r["peak_rss_mb"]), key=lambda r: r["samples"])
        if len(group) >= 2:
            lo, hi = group[0], group[-1]
            ratios[f"{key[0]} {key[1]}: {hi['samples']}/{lo['samples']}"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
    return {
        "benchmark": "calib_memory",
        "command": " ".join(["python", "bench/calib_memory.py", *sys.argv[1:]]),
        **info,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "rows": rows,
        "peak_rss_ratios": ratios,
        "versions": {"qcompile": qcompile.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
    }


def markdown(result: dict) -> str:
    lines = ["| tool | method | samples | peak RSS MB | wall s |", "| --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r["peak_rss_mb"] is None:
            lines.append(f"| {r['tool']} | {r['method']} | {r['samples']} | {r['aborted']} | - |")
        else:
            lines.append(f"| {r['tool']} | {r['method']} | {r['samples']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |")
    lines.append("")
    lines += [f"peak RSS ratio, {k}: {v:.3f}" for k, v in result["peak_rss_ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_ort-child"]:
        model, calib, out, method, batch_size, ops = argv[1:]
        ort_child(model, calib, out, method, int(batch_size), ops)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help='"minilm" (qcompile.zoo) or an ONNX path (default: minilm)')
    ap.add_argument("--max-length", type=int, default=128,
                    help="minilm: tokens per sentence at most (the .npz is padded to its longest; default 128)")
    ap.add_argument("--calib", help=".npz keyed by input name, at least max(samples) rows (with a model path)")
    ap.add_argument("--eval", help="fixed eval .npz for qcompile (default: the first 16 calibration rows)")
    ap.add_argument("--qcompile-samples", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--ort-samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ort-methods", nargs="+", default=["percentile", "entropy"],
                    choices=["percentile", "entropy", "minmax"])
    ap.add_argument("--ort-ops", nargs="+", choices=["all", "matmul"], default=["all"],
                    help="onnxruntime op types: its default set (all), and/or MatMul/Gemm/Conv only "
                         "like qcompile (matmul); default: all")
    ap.add_argument("--skip-ort", action="store_true", help="qcompile rows only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the table shows medians")
    ap.add_argument("--min-free-mb", type=float, default=1536,
                    help="stop a child when the machine has less memory available than this (default: 1536)")
    ap.add_argument("--workdir", help="where the temporary models and data go (default: the system temp dir)")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "calib_memory.json"), help="JSON result path")
    args = ap.parse_args(argv)

    result = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\n(json: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
