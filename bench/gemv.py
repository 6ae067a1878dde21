#!/usr/bin/env python3
"""Decode speed on the GEMV chain: float beside qcompile's low-bit lowerings, in one run.

    HF_HUB_OFFLINE=1 python bench/gemv.py                    # zoo gemv-chain: 12 x [1x4096].[4096x4096]
    python bench/gemv.py --layers 2 --dim 1024 --runs 5      # a small chain built on the fly (quick check)

Each configuration (target x lowering x MatMulNBits accuracy level) compiles the chain with
`qcompile.compile` (its own validation off: every row measures output SQNR against the float model
on 4 held-out vectors; the `auto` level needs the validation run, with no floor, and the row
records the level it chose). Then the float and the compiled model run at batch 1 in onnxruntime
ENABLE_ALL sessions with one thread, alternately (`qcompile.bench.latency`: `--warmup` runs each,
then `--runs` pairs whose order flips every pair); medians. speedup = median float ms / median compiled ms.

Roofline. At batch 1 a GEMV reads every weight byte once per run, so bytes / bandwidth bounds its
time from below. bandwidth = the best of 5 single-threaded read streams over a 1 GiB float32 array
(a BLAS dot product of the array with itself, one thread), or the float chain's own effective
bandwidth (float bytes / fastest float median) when that is higher: what one core can pull from memory. bytes = what the
kernels read per run, from the model onnxruntime actually runs (its optimized graph: the float
weights; MatMulNBits' folded 4-bit planes, scales and zero points; MatMulFp4's packed codes and
scale bytes). % roofline = (bytes / bandwidth) / measured time.

Writes a markdown table to stdout and every figure to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the bandwidth probe below must use one core too

import numpy as np  # noqa: E402

# (label, target, lowering, MatMulNBits accuracy_level)
CONFIGS = [
    ("w4 (int4, 1 plane), level 0", "w4", "integer", 0),
    ("w4 (int4, 1 plane), level 4", "w4", "integer", 4),
    ("mxfp4, MatMulNBits 2 planes, level 0", "mxfp4", "integer", 0),
    ("mxfp4, MatMulNBits 2 planes, level 4", "mxfp4", "integer", 4),
    ("mxfp4, native MatMulFp4", "mxfp4", "native", 0),
    ("nvfp4, MatMulNBits 2 planes, level 0", "nvfp4", "integer", 0),
    ("nvfp4, MatMulNBits 2 planes, level 4", "nvfp4", "integer", 4),
    ("nvfp4, native MatMulFp4", "nvfp4", "native", 0),
    # weight-only (activations stay float): the weight path alone
    ("w:mxfp4, native MatMulFp4", "w:mxfp4", "native", 0),
    ("w:nvfp4, native MatMulFp4", "w:nvfp4", "native", 0),
    ("w:mxfp4, MatMulNBits 2 planes, level 4", "w:mxfp4", "integer", 4),
    # FP8 (E4M3 weights and activations): onnxruntime dequantizes the weights every run
    ("fp8, DequantizeLinear + MatMul", "fp8", "auto", 0),
    ("fp8, native MatMulF8", "fp8", "native", 0),
    ("w4 (int4, 1 plane), auto level (the default)", "w4", "auto", "auto"),
]
KERNEL_OPS = ("MatMul", "MatMulNBits", "MatMulFp4", "MatMulF8", "Gemm", "FusedMatMul", "DequantizeLinear")


def bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best single-threaded read bandwidth (GB/s): a BLAS dot of a float32 array with itself."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.dot(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    from qcompile.backends.onnxruntime.session import session_options

    so = session_options("all", threads=1, optimized_path=str(optimized) if optimized else None)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_bytes(optimized: Path) -> int:
    """Bytes of the constant inputs of the weight-reading kernels of an optimized model."""
    import onnx

    m = onnx.load(str(optimized))
    sizes = {t.name: len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer}
    reads = [i for n in m.graph.node if n.op_type in KERNEL_OPS  # a DequantizeLinear reads its codes (input 0)
             for i in (n.input if n.op_type == "DequantizeLinear" else n.input[1:])]
    return sum(sizes.get(i, 0) for i in reads)


def chain(args, work: Path) -> tuple[Path, Path, Path]:
    """The float model and calib/eval .npz: the zoo's chain, or a small one built in `work`."""
    from qcompile import zoo
    from qcompile.zoo import gemv

    if (args.layers, args.dim) == (gemv.LAYERS, gemv.DIM):
        return Path(zoo.get_model("gemv-chain")), Path(zoo.get_data("gemv-chain", "calib", 16)), \
            Path(zoo.get_data("gemv-chain", "eval", 4))
    path = work / "chain.onnx"
    gemv.build(path, args.layers, args.dim)
    return (path, gemv.write_npz(work / "calib.npz", "calib", 16, dim=args.dim),
            gemv.write_npz(work / "eval.npz", "eval", 4, dim=args.dim))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", help="comma list of config indices (default: all)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/gemv.json"))
    args = ap.parse_args()

    import qcompile
    from qcompile import native
    from qcompile.bench import latency
    from qcompile.passes.insert_qdq import sqnr_db

    bw = bandwidth_gbs()
    configs = CONFIGS if not args.configs else [CONFIGS[int(i)] for i in args.configs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model, calib, ev = chain(args, work)
        x = dict(np.load(ev))
        feed = {k: v[:1] for k, v in x.items()}
        float_sess = session(model)
        ref = float_sess.run(None, x)[0]
        float_bytes = args.layers * args.dim * args.dim * 4
        for label, target, lowering, level in configs:
            row = {"config": label, "target": target, "lowering": lowering, "accuracy_level": level}
            if lowering == "native":
                try:
                    native.build()
                except native.NativeUnavailable as e:
                    rows.append(row | {"error": str(e)})
                    continue
            t0 = time.perf_counter()
            r = qcompile.compile(model, target, calib=calib, eval=ev, validate=level == "auto", min_sqnr=-math.inf,
                                 lowering=lowering, accuracy_level=level)
            if level == "auto":
                row["accuracy_level"] = chosen = r.report["accuracy_level"]["level"]
                row["accuracy_level_reason"] = r.report["accuracy_level"]["reason"]
                row["config"] = f"{label}: level {chosen}"
            out = work / "q.onnx"
            file_bytes = qcompile.save_model(r.model, out)
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            del r
            q = session(out, optimized=work / "q.opt.onnx")
            row["bytes_read"] = kernel_bytes(work / "q.opt.onnx")
            row["sqnr_db"] = round(sqnr_db(ref, q.run(None, x)[0]), 2)
            lat = latency(float_sess, q, feed, args.runs, args.warmup)
            f_ms, q_ms = lat["float_ms"]["median"], lat["quant_ms"]["median"]
            row |= {"float_ms": round(f_ms, 3), "ms": round(q_ms, 3), "speedup": round(f_ms / q_ms, 2),
                    "file_mb": round(file_bytes / 1e6, 1)}
            rows.append(row)
            print(f"# {label}: {row['speedup']}x", flush=True)
    measured = [r for r in rows if "ms" in r]
    bw = max([bw] + [float_bytes / (r["float_ms"] * 1e-3) / 1e9 for r in measured])
    for r in measured:
        r["roofline_pct"] = round(100 * r["bytes_read"] / (bw * 1e9) / (r["ms"] * 1e-3), 1)
        r["float_roofline_pct"] = round(100 * float_bytes / (bw * 1e9) / (r["float_ms"] * 1e-3), 1)
    result = {"schema": "qcompile.gemv-bench/1", "layers": args.layers, "dim": args.dim, "runs": args.runs,
              "bandwidth_gbs": round(bw, 2), "float_bytes_read": float_bytes, "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nGEMV chain {args.layers} x [1x{args.dim}].[{args.dim}x{args.dim}], batch 1, onnxruntime 1 thread; "
          f"read bandwidth {bw:.1f} GB/s\n")
    print("| configuration | ms / run | float ms | speedup | MB read / run | % roofline (float) | SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | not run: {r['error']} | | | | | |")
            continue
        print(f"| {r['config']} | {r['ms']:.2f} | {r['float_ms']:.2f} | {r['speedup']:.2f}x | {r['bytes_read'] / 1e6:.0f} | "
              f"{r['roofline_pct']:.0f}% ({r['float_roofline_pct']:.0f}%) | {r['sqnr_db']:.1f} |")


if __name__ == "__main__":
    main()
