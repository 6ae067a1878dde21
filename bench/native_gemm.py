#!/usr/bin/env python3
"""Prefill speed of the native kernels per ISA build: one MatMulFp4 / MatMulF8 node at MiniLM's shapes.

    python bench/native_gemm.py                                   # every ISA build this CPU runs
    python bench/native_gemm.py --lib before-avx2=/tmp/old.so ... # add builds of other sources

Each configuration is one node y = op(x[M, K], W[K, N]) in an onnxruntime ENABLE_ALL session with
one thread (the library registered), x ~ N(0, 1), W ~ N(0, 1) quantized by qcompile's codec:
  mxfp4 / nvfp4       W4A4: the activation quantized in the kernel (act = "mxfp4" / "nvfp4")
  w:mxfp4 / w:nvfp4   weight-only E2M1 (float activations)
  fp8                 MatMulF8, E4M3FN weights with a scale per column
  float               onnxruntime's own float MatMul (MLAS sgemm) on the same shapes, for reference
Timing: for every (configuration, shape) the sessions of all libraries run alternately (round
robin, `--warmup` runs each first, then `--runs` rounds whose order reverses every round), so a
slow phase of a shared machine hits every library alike; medians in ms. The clock is the calling
thread's CPU time by default (`--clock cpu`: with one intra-op thread onnxruntime runs the kernel
on the caller's thread, and CPU time leaves out the time other processes hold the core, which on
a shared 2-core machine otherwise decides the wall-clock medians), or wall time (`--clock wall`).
Writes a markdown table to stdout and every figure to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

# MiniLM-L6's MatMuls at 128 tokens: attention projections, FFN up, FFN down.
SHAPES = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384)]
CONFIGS = ["mxfp4", "nvfp4", "w:mxfp4", "w:nvfp4", "fp8"]


def node_model(config: str, k: int, n: int, seed: int = 0):
    """x [M, K] -> the config's op -> y [M, N], as an onnx ModelProto."""
    import ml_dtypes
    import onnx_ir as ir

    from qcompile import codec, native, storage
    from qcompile.formats import FORMATS

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["M", k]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    if config == "float":
        wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
        graph.register_initializer(wv)
        node = ir.node("MatMul", [x, wv], name="mm")
        y = node.outputs[0]
        y.dtype = ir.DataType.FLOAT
        graph.append(node)
    elif config == "fp8":  # E4M3FN values with a scale per output column
        scale = (np.abs(w).max(axis=0) / 448.0).astype(np.float32)
        values = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        y = native.emit_matmul_f8(graph, x, storage.from_scalar(values, scale, FORMATS["e4m3fn"], 1, None), "mm")
    else:
        fmt = FORMATS[config.removeprefix("w:")]
        t = storage.from_block(codec.quantize_block(w, fmt, axis=0), fmt)
        act = None if config.startswith("w:") else fmt
        st = float(np.abs(rng.standard_normal(4096)).max() / (6 * 448)) if config == "nvfp4" else None
        y = native.emit_matmul_fp4(graph, x, t, "mm", act=act, act_tensor_scale=st)
    y.name = "y"
    graph.outputs.append(y)
    return ir.to_proto(ir.Model(graph, ir_version=10))


def session(proto, lib: Path | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def round_robin(sessions: dict, feed: dict, runs: int, warmup: int, clock=time.thread_time) -> dict[str, float]:
    """Median ms per session on `clock`, the sessions run in turn (order reversed every round)."""
    names = list(sessions)
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    times = {k: [] for k in names}
    for i in range(runs):
        for k in names if i % 2 == 0 else names[::-1]:
            t0 = clock()
            sessions[k].run(None, feed)
            times[k].append((clock() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", action="append", default=[], metavar="LABEL=PATH", help="an extra library build")
    ap.add_argument("--isa", action="append", help="ISA builds of these sources (default: all this CPU runs; '' for none)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench-out/native_gemm.json"))
    args = ap.parse_args()

    from qcompile import native

    flags = native.cpu_flags()
    isas = [i for i in args.isa if i] if args.isa else [isa for isa, need in native.ISA_CPU_FLAGS.items() if need <= flags]
    libs = {label: Path(path) for label, path in (s.split("=", 1) for s in args.lib)}
    libs |= {isa: native.build(isa=isa) for isa in isas}
    rows = []
    for config in args.configs.split(","):
        for m, k, n in SHAPES:
            m = args.rows
            proto = node_model(config, k, n)
            sessions = {label: session(proto, lib) for label, lib in libs.items()}
            sessions["float"] = session(node_model("float", k, n), None)
            feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
            ms = round_robin(sessions, feed, args.runs, args.warmup,
                             time.thread_time if args.clock == "cpu" else time.perf_counter)
            rows.append({"config": config, "m": m, "k": k, "n": n, "ms": ms})
            print(f"# {config} {m}x{k}x{n}: " + ", ".join(f"{a} {b:.3f}" for a, b in ms.items()), flush=True)
    result = {"schema": "qcompile.native-gemm-bench/1", "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "clock": args.clock, "libs": {k: str(v) for k, v in libs.items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    labels = [*libs, "float"]
    print(f"\nms per run ({args.clock} time, median of {args.runs}), 1 thread\n")
    print("| config | M x K x N | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for r in rows:
        print(f"| {r['config']} | {r['m']}x{r['k']}x{r['n']} | " + " | ".join(f"{r['ms'][a]:.2f}" for a in labels) + " |")


if __name__ == "__main__":
    main()
