#!/usr/bin/env python3
"""Online rotation, side by side: output SQNR and latency of each target with and without `--rotate`.

    HF_HUB_OFFLINE=1 python bench/rotation.py                          # MiniLM int8,w4a8 x none,hadamard, 256 + 256
    python bench/rotation.py --targets mxfp4,nvfp4 --settings none,hadamard,hadamard@64,random --samples 64

Every setting compiles the same model on the same calibration sentences (`qcompile.zoo`); each
compiled model is then measured on the same held-out sentences against the float model, at
onnxruntime's DISABLE_ALL (no fusion: the CPU-independent reference, what the Q/DQ graph means)
and at ENABLE_ALL (the integer kernels this CPU runs), 1 thread. Latency: the median of --runs
timed runs of one batch of 8 sentences at ENABLE_ALL, 1 thread, every model (float included)
timed round-robin at the end, as a ratio to the target's first setting, and to float. A setting is `none`, `hadamard`, `random`, `auto`, KIND@BLOCK, each
optionally with `+smooth` (`--smooth auto`) or `+smooth=ALPHA|off`, and `/native` for
`--lowering native` (rotations as the native BlockHadamard op), e.g. `hadamard+smooth/native`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sqnr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.ravel() for a in ref]).astype(np.float64)
    g = np.concatenate([a.ravel() for a in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r**2) / max(np.sum((r - g) ** 2), 1e-300)))


def outputs(model, batches: list[dict], level: str) -> list[np.ndarray]:
    from qcompile.backends.onnxruntime.session import make_session

    sess = make_session(model, level=level, threads=1)
    name = sess.get_outputs()[0].name
    return [sess.run([name], b)[0] for b in batches]


def latencies(models: list, batch: dict, runs: int) -> list[float]:
    """Median seconds of one run of each model, timed round-robin (run i of every model before run
    i + 1 of any), so a drift of the machine's speed during the bench hits all of them alike."""
    from qcompile.backends.onnxruntime.session import make_session

    sessions = [make_session(m, level="all", threads=1) for m in models]
    for s in sessions:
        s.run(None, batch)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for s, t in zip(sessions, times):
            t0 = time.perf_counter()
            s.run(None, batch)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--targets", default="int8,w4a8")
    ap.add_argument("--settings", default="none,hadamard")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import onnx_ir as ir

    import qcompile
    from qcompile import zoo
    from qcompile.cpu import host_description
    from qcompile.data import InputInfo
    from qcompile.stages import as_dataset

    model = str(zoo.get_model(a.model))
    calib, eval_ = str(zoo.get_data(a.model, "calib", a.samples)), str(zoo.get_data(a.model, "eval", a.samples))
    float_model = ir.load(model)
    batches = list(as_dataset(eval_, InputInfo.of_model(float_model)).batches(8))
    ref = {lvl: outputs(float_model, batches, lvl) for lvl in ("disable", "all")}
    d = host_description()
    print(f"{a.model}, {a.samples} calibration + {a.samples} held-out samples; CPU: {d['model']} ({', '.join(d['flags'])})")
    rows, models = [], [float_model]
    for target in a.targets.split(","):
        for setting in a.settings.split(","):
            spec, _, lowering = setting.partition("/")
            rot, _, smooth = spec.partition("+")
            kind, _, block = rot.partition("@")
            smooth = (smooth.partition("=")[2] or "auto") if smooth else None
            r = qcompile.compile(model, target, calib=calib, eval=eval_, validate=False, rotate=kind,
                                 rotate_block=int(block) if block else None, smooth=smooth, lowering=lowering or "auto")
            q = {lvl: sqnr_db(ref[lvl], outputs(r.model, batches, lvl)) for lvl in ("disable", "all")}
            rows.append({"target": target, "setting": setting, "rotate": kind,
                         "blocks": sorted({v["block"] for v in r.plan.rotations.values()}),
                         "smoothed": len(r.plan.smoothing), "sqnr_disable": q["disable"], "sqnr_all": q["all"]})
            models.append(r.model)
    t_float, *times = latencies(models, batches[0], a.runs)
    print("| target | setting | blocks | smoothed | SQNR dB DISABLE_ALL | SQNR dB ENABLE_ALL | gain (DISABLE_ALL) | latency x first | latency x float |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    first = {}
    for row, t in zip(rows, times):
        base = first.setdefault(row["target"], (row, t))
        row.update(gain_disable=row["sqnr_disable"] - base[0]["sqnr_disable"], latency_vs_unrotated=t / base[1],
                   latency_vs_float=t / t_float)
        print(f"| {row['target']} | {row['setting']} | {','.join(map(str, row['blocks'])) or '-'} | {row['smoothed']} | "
              f"{row['sqnr_disable']:.2f} | {row['sqnr_all']:.2f} | {row['gain_disable']:+.2f} | "
              f"{row['latency_vs_unrotated']:.3f} | {row['latency_vs_float']:.3f} |")
    if a.out:
        a.out.write_text(json.dumps({"cpu": d, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
