#!/usr/bin/env python3
"""A > 2 GB model end to end: compile peak RSS and the outputs' load-time cost.

    python bench/big_model.py                        # 8 x 8192x8192 fp32 MatMuls (2.15 GB), w4 and int8
    python bench/big_model.py --dim 4096 --layers 4  # a smaller run (256 MB)
    python bench/big_model.py --keep DIR             # keep the generated model and the outputs in DIR
    python bench/big_model.py --parallel             # the compiles run concurrently (wall times overlap)

1. Generates y = x @ W_0 @ ... @ W_{L-1} (x [N, dim] float32, W_i random normal / sqrt(dim), seed
   0) with every weight in one external data file, written one layer at a time (the generator
   never holds more than one weight).
2. Compiles it with the CLI (`qcompile compile MODEL -t T -o OUT --json`, validation on, data
   synthesized: 64 calibration + 64 held-out samples) for each target, each in its own child
   process, which reports its own peak RSS (VmHWM, read just before it exits).
3. Loads every output (and the float model) in a fresh process (`qcompile.bench.load_isolated`:
   onnxruntime ENABLE_ALL, 1 thread): session creation time and peak RSS, then one run on one
   sample.
4. Checks the input files are byte-identical afterwards (sha256 before and after).

Prints the ratios the issue asks for -- compile peak RSS / float weight bytes (goal <= 1.5) and
session peak RSS / output file bytes (goal <= 1.5 plus activations; here the activations are a few
[1, dim] vectors) -- with the CPU's flags, and writes everything as JSON (`--out`). The session RSS
ratio is given both as is (VmHWM / file bytes) and above the interpreter's own RSS before the
session ((VmHWM - VmHWM before) / file bytes). Mind the machine's memory: run it once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx import helper as h  # noqa: E402

CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
COMPILE_CHILD = """
import sys
from qcompile.baselines import peak_rss_bytes
from qcompile.cli import main
try:
    main(args=sys.argv[1:], prog_name="qcompile")
finally:
    sys.stderr.write(f"\\nbig-model: peak_rss_bytes={peak_rss_bytes()}\\n")
"""


def generate(directory: Path, dim: int, layers: int, seed: int = 0) -> Path:
    """The float model (model.onnx + model.onnx.data), one weight generated and written at a time."""
    rng = np.random.default_rng(seed)
    data = directory / "model.onnx.data"
    inits, nodes, x = [], [], "x"
    with open(data, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((dim, dim), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(dim))
            offset = f.tell()
            w.tofile(f)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            nodes.append(h.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
            x = f"y{i}"
            del w
    graph = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                         [h.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dim])], inits)
    path = directory / "model.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10), path)
    return path


def sha256(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            d.update(chunk)
    return d.hexdigest()


def files_of(model: Path) -> list[Path]:
    return [p for p in (model, model.with_name(model.name + ".data")) if p.exists()]


def start_compile(model: Path, target: str, out: Path) -> tuple[subprocess.Popen, float]:
    args = [str(model), "--target", target, "-o", str(out), "--json", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", COMPILE_CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **CHILD_ENV})
    return proc, time.perf_counter()


def finish_compile(target: str, out: Path, proc: subprocess.Popen, t0: float) -> dict:
    stdout, stderr = proc.communicate()
    rec = {"target": target, "seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
    rss = re.findall(r"big-model: peak_rss_bytes=(\d+)", stderr)
    rec["peak_rss_bytes"] = int(rss[-1]) if rss else None
    if proc.returncode != 0:
        rec["error"] = (stderr.strip().splitlines() or [""])[-1][:300]
        return rec
    report = json.loads(stdout)
    rec["passes"] = {p["name"]: p["seconds"] for p in report["passes"]}
    rec["sqnr_db"] = {k: v["sqnr_db"] for k, v in report.get("outputs", {}).items()}
    rec["accuracy_level"] = (report.get("accuracy_level") or {}).get("level")
    rec["file_bytes"] = sum(p.stat().st_size for p in files_of(out))
    rec["external_data"] = out.with_name(out.name + ".data").exists()
    return rec


def at_level0(path: Path) -> Path:
    """A copy of the graph file at `path` with every MatMulNBits at accuracy_level 0, sharing its data file."""
    m = onnx.load(str(path), load_external_data=False)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    out = path.with_name(path.stem + ".level0.onnx")
    onnx.save(m, str(out))
    return out


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    return " ".join(f for f in keep if f in flags) or "none of " + " ".join(keep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["w4", "int8"])
    ap.add_argument("--keep", type=Path, help="directory to keep the models in (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("big_model.json"))
    ap.add_argument("--skip-float-load", action="store_true", help="do not load the float model")
    ap.add_argument("--parallel", action="store_true", help="run the compiles concurrently (wall times then overlap)")
    a = ap.parse_args()

    from qcompile.bench import load_isolated
    from qcompile.cpu import host_description

    work = a.keep or Path(tempfile.mkdtemp(prefix="qcompile-big-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"dim": a.dim, "layers": a.layers, "cpu": host_description(), "cpu_flags": cpu_flags(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
               "rows": []}
    try:
        t0 = time.perf_counter()
        model = generate(work, a.dim, a.layers)
        weight_bytes = a.layers * a.dim * a.dim * 4
        results.update(generate_seconds=round(time.perf_counter() - t0, 1), weight_bytes=weight_bytes,
                       float_file_bytes=sum(p.stat().st_size for p in files_of(model)))
        print(f"generated {model} ({weight_bytes / 1e9:.2f} GB of weights) in {results['generate_seconds']} s",
              file=sys.stderr)
        feed = work / "feed.npz"
        np.savez(feed, x=np.random.default_rng(1).standard_normal((1, a.dim), dtype=np.float32))
        before = {p.name: sha256(p) for p in files_of(model)}
        if not a.skip_float_load:
            results["float_load"] = load_isolated(model, feed)
        outs = {t: work / f"model.{t}.onnx" for t in a.targets}
        running = {}
        for target in a.targets:  # --parallel: all compiles at once (peak RSS is per process either way)
            print(f"compiling {target} ...", file=sys.stderr)
            running[target] = start_compile(model, target, outs[target])
            if not a.parallel:
                running[target] = finish_compile(target, outs[target], *running[target])
        for target in a.targets:
            rec = running[target] if isinstance(running[target], dict) else finish_compile(target, outs[target], *running[target])
            rec["compile_rss_over_weights"] = round(rec["peak_rss_bytes"] / weight_bytes, 3) if rec["peak_rss_bytes"] else None
            if "error" not in rec:
                print(f"loading {target} ...", file=sys.stderr)
                load = load_isolated(outs[target], feed)
                rec["load"] = load
                if "error" not in load:
                    rec["session_rss_over_file_total"] = round(load["session_peak_rss_bytes"] / load["file_bytes"], 3)
            results["rows"].append(rec)
            print(json.dumps(rec), file=sys.stderr)
            if rec.get("accuracy_level") == 4:  # the same file at level 0: what MatMulNBits' level-4 packing costs
                level0 = at_level0(outs[target])
                results["rows"].append({"target": f"{target} (same file, accuracy_level 0)", "load": load_isolated(level0, feed)})
        results["input_unchanged"] = before == {p.name: sha256(p) for p in files_of(model)}
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0 if all("error" not in r for r in results["rows"]) and results.get("input_unchanged") else 1


def _load_cells(ld: dict) -> str:
    """session s | session peak RSS GB | / file | (peak - before) / file | first run s"""
    if not ld:
        return "- | - | - | - | -"
    if "error" in ld:
        return f"load failed: {ld['error']} | - | - | - | -"
    return (f"{ld['session_seconds']:.2f} | {ld['session_peak_rss_bytes'] / 1e9:.2f} | "
            f"{ld['session_peak_rss_bytes'] / ld['file_bytes']:.2f} | {ld['session_rss_over_file']:.2f} | "
            f"{ld['first_run_seconds']:.2f}")


def markdown(r: dict) -> str:
    gb = 1e9
    lines = [f"{r['layers']} x {r['dim']}x{r['dim']} fp32 MatMuls, {r['weight_bytes'] / gb:.2f} GB of weights "
             f"(external data); CPU: {r['cpu']} [{r['cpu_flags']}], {r['machine']}; 1 onnxruntime thread",
             "",
             "| model | compile s | compile peak RSS GB | / weights | file GB | session s | session peak RSS GB | "
             "/ file | (peak - before) / file | first run s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fl = r.get("float_load")
    if fl:
        lines.append(f"| float | - | - | - | {fl.get('file_bytes', 0) / gb:.2f} | {_load_cells(fl)} |")
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['target']} | {row['seconds']} | failed: {row['error']} |")
        elif "seconds" not in row:  # a load-only row
            lines.append(f"| {row['target']} | - | - | - | {row['load'].get('file_bytes', 0) / gb:.3f} | {_load_cells(row['load'])} |")
        else:
            lines.append(f"| {row['target']} | {row['seconds']:.0f} | {row['peak_rss_bytes'] / gb:.2f} | "
                         f"{row['compile_rss_over_weights']:.2f} | {row['file_bytes'] / gb:.3f} | {_load_cells(row.get('load') or {})} |")
    lines += ["", f"input files unchanged: {r.get('input_unchanged')}; outputs written with external data: "
              + ", ".join(f"{x['target']}={x.get('external_data')}" for x in r["rows"] if "seconds" in x)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
