#!/usr/bin/env python3
"""Compile time and peak memory: qcompile beside onnxruntime's quantizer, side by side in one run.

    HF_HUB_OFFLINE=1 python bench/compile_speed.py                  # MiniLM int8, 256 + 256 samples, 3 runs
    python bench/compile_speed.py --target w4 --repeat 5
    python bench/compile_speed.py --model m.onnx --calib c.npz --eval e.npz

Rows (each run in a fresh Python process, in turn, so every tool sees the same machine state):
  qcompile --no-validate   the compile alone, on the calibration samples
  qcompile                 the compile with validation on the held-out samples (the default)
  ort quantize_static      onnxruntime's static QDQ quantizer, MinMax, MatMul/Gemm/Conv only, same
                           calibration samples (with its recommended pre-processing)
  ort quantize_dynamic     onnxruntime's dynamic int8 quantizer (no calibration)
Times are the tool's own call (model load to model written, interpreter start-up excluded), the
median of --repeat runs; peak RSS is the child's VmHWM. Both tools use every core (onnxruntime's
default session threads; qcompile's `compile_threads`). The CPU's model and flags are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

_QCOMPILE = """
import json, sys, time
a = json.loads(sys.argv[1])
if a.get("tree"):
    sys.path.insert(0, a["tree"])  # another checkout of qcompile (e.g. main before a change)
import qcompile
from qcompile.baselines import peak_rss_bytes
t0 = time.perf_counter()
r = qcompile.compile(a["model"], a["target"], calib=a["calib"], eval=a["eval"], validate=a["validate"], min_sqnr=-1e9)
qcompile.save_model(r.model, a["out"])
sec = time.perf_counter() - t0
stages = {p["name"]: p["seconds"] for p in r.report["passes"]}
print(json.dumps({"seconds": sec, "peak_rss_bytes": peak_rss_bytes(), "stages": stages,
                  "sqnr_db": r.report.get("verdict", {}).get("worst_output_sqnr_db")}))
"""

_ORT = """
import json, sys
from qcompile.baselines import build_isolated
a = json.loads(sys.argv[1])
r = build_isolated(a["config"], a["model"], a["calib"], a["out"])
print(json.dumps({"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "error": r["error"]}))
"""


def cpu() -> str:
    from qcompile.cpu import host_description

    d = host_description()
    return f"{d['model'] or d['machine']} ({', '.join(d['flags'])}), {len(os.sched_getaffinity(0))} cores"


def _child(code: str, args: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=args["cwd"])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"child failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:] }")
    return json.loads(lines[-1])


def run(model: str, calib: str, eval_: str, target: str, repeat: int, tree: str | None = None) -> dict:
    rows = {"qcompile --no-validate": [], "qcompile": [], "ort quantize_static (MinMax, MatMul)": [],
            "ort quantize_dynamic": []}
    if tree:
        rows[f"qcompile at {Path(tree).name}"] = []
    with tempfile.TemporaryDirectory(prefix="qcompile-speed-") as d:
        base = {"model": model, "calib": calib, "eval": eval_, "target": target, "cwd": d}
        for _ in range(repeat):  # interleaved: a slow moment of the machine hits every tool alike
            rows["qcompile --no-validate"].append(_child(_QCOMPILE, base | {"validate": False, "out": f"{d}/q.onnx"}))
            rows["qcompile"].append(_child(_QCOMPILE, base | {"validate": True, "out": f"{d}/q.onnx"}))
            rows["ort quantize_static (MinMax, MatMul)"].append(
                _child(_ORT, base | {"config": "ort-static-matmul-minmax", "out": f"{d}/s.onnx"}))
            rows["ort quantize_dynamic"].append(_child(_ORT, base | {"config": "ort-dynamic", "out": f"{d}/y.onnx"}))
            if tree:
                rows[f"qcompile at {Path(tree).name}"].append(
                    _child(_QCOMPILE, base | {"validate": True, "out": f"{d}/t.onnx", "tree": tree}))
    out = {}
    for name, runs in rows.items():
        out[name] = {"seconds": statistics.median(r["seconds"] for r in runs),
                     "peak_rss_mb": statistics.median(r["peak_rss_bytes"] for r in runs) / 1e6,
                     "runs": runs}
    return out


def markdown(res: dict, header: str) -> str:
    ref = res["ort quantize_static (MinMax, MatMul)"]["seconds"]
    lines = [header, "", "| tool | seconds (median) | x quantize_static | peak RSS MB |", "| --- | ---: | ---: | ---: |"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / ref:.2f} | {r['peak_rss_mb']:.0f} |")
    q = res["qcompile"]["runs"][-1]
    if any(k.startswith("qcompile at") for k in res):
        old = next(v for k, v in res.items() if k.startswith("qcompile at"))
        lines.append(f"qcompile / the other checkout: {res['qcompile']['seconds'] / old['seconds']:.2f}x the time, "
                     f"{res['qcompile']['peak_rss_mb'] / old['peak_rss_mb']:.2f}x the peak RSS")
    top = sorted(q["stages"].items(), key=lambda kv: -kv[1])[:6]
    lines += ["", "qcompile stages (last run): " + ", ".join(f"{k} {v:.1f} s" for k, v in top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--eval")
    ap.add_argument("--target", default="int8")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tree", help="Also time the full compile of another qcompile checkout (e.g. a git worktree of old main)")
    a = ap.parse_args()
    if a.model is None:
        from qcompile import zoo

        a.model = str(zoo.get_model("minilm"))
        a.calib = str(zoo.get_data("minilm", "calib", a.samples))
        a.eval = str(zoo.get_data("minilm", "eval", a.samples))
    res = run(str(Path(a.model).resolve()), str(Path(a.calib).resolve()), str(Path(a.eval).resolve()), a.target, a.repeat, a.tree)
    header = (f"{Path(a.model).name}, target {a.target}, {a.samples} calibration + {a.samples} held-out samples, "
              f"median of {a.repeat}; CPU: {cpu()}")
    print(markdown(res, header))
    if a.out:
        a.out.write_text(json.dumps({"header": header, "results": res}, indent=1))


if __name__ == "__main__":
    main()
