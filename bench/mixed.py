#!/usr/bin/env python3
"""Mixed precision side by side (issue 12, acceptance 3): `--target auto` (the ILP) and the
AIMET-style greedy allocator at the size of a uniform target, against every uniform candidate
target that fits the same budget, on the same calibration and held-out data.

    HF_HUB_OFFLINE=1 python bench/mixed.py                                   # MiniLM, budgets of w4 and mxfp4
    HF_HUB_OFFLINE=1 python bench/mixed.py --models efficientnet-lite0 --samples 64

The budget of a uniform target is its stored weight bits per weight by the candidate table's
count (`qcompile.mixed.stored_bits`: w4 5.0, mxfp4 4.25 ...). Output SQNR is the compile's own
validation figure (onnxruntime ENABLE_ALL, 1 thread). The sensitivity sweep runs once per model
(cached in $QCOMPILE_CACHE/sensitivity); the allocations are re-solved from it.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np

    import qcompile
    from qcompile import zoo
    from qcompile.allocate import WEIGHT_BITS, Table
    from qcompile.cpu import host_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--budgets", default="w4,mxfp4", help="uniform targets whose size sets a budget")
    ap.add_argument("--samples", type=int, default=256, help="calibration and held-out samples each")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = str(zoo.get_model(name))
        calib, eval_ = str(zoo.get_data(name, "calib", args.samples)), str(zoo.get_data(name, "eval", args.samples))

        def run(target, **kw):
            r = qcompile.compile(model, target, calib=calib, eval=eval_, min_sqnr=-100, max_float=0, **kw)
            return r, r.report["verdict"]["worst_output_sqnr_db"]

        first, _ = run("auto", budget_bits=16.0)  # measures the table once (any budget: the table does not depend on it)
        table = Table.from_json(first.report["allocation"]["table"])
        params = sum(table.meta["params"])
        wb, ok = table.costs[WEIGHT_BITS], table.allowed  # a uniform target leaves the layers it cannot take in float
        bpw = {c: np.where(ok[:, j], wb[:, j], wb[:, 0]).sum() / params for j, c in enumerate(table.candidates)}
        top = max(bpw[b] for b in args.budgets.split(","))
        uniform = {c: run(c)[1] for c in bpw if c != "float" and bpw[c] <= top + 1e-9}  # those that fit some budget
        for b in args.budgets.split(","):
            bits = bpw[b]
            fits = {c: s for c, s in uniform.items() if bpw[c] <= bits + 1e-9}
            auto_r, auto = run("auto", budget_bits=bits)
            _, greedy = run("auto", budget_bits=bits, allocator="greedy")
            best = max(fits, key=fits.get)
            rows.append({"model": name, "budget": f"{b} ({bits:.2f} bits/weight)", "auto": auto, "greedy": greedy,
                         "best_uniform": best, "best_uniform_sqnr": fits[best], "uniform_fitting": fits,
                         "auto_over_best_uniform": auto - fits[best], "auto_over_w4": auto - uniform.get("w4", np.nan),
                         "bits_per_weight": {c: round(float(v), 3) for c, v in bpw.items()},
                         "plan_counts": {c: list(auto_r.report["allocation"]["solution"]["plan"].values()).count(c)
                                         for c in table.candidates}})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows": rows, "cpu": host_description()}, indent=1))


if __name__ == "__main__":
    main()
