#!/usr/bin/env python3
"""Write the golden files of `tests/test_golden.py`: for MiniLM and EfficientNet-Lite0 (qcompile.zoo)
x int8, fp8, w4, mxfp4, nvfp4, a16w8, the plan (JSON) and the compiled model's outputs on held-out
samples, plus the CPU class they were made on.

    HF_HUB_OFFLINE=1 python tests/golden/make.py            # every case
    HF_HUB_OFFLINE=1 python tests/golden/make.py minilm:w4  # one

The files are made once, from main as it stood before a refactor (issue 10: from 04318fb), and
never regenerated to make the test pass: a change of results must be an intended improvement, named
in its commit, and then the affected files are rewritten with that commit.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

MODELS = {"minilm": (32, 16), "efficientnet-lite0": (16, 8)}  # (calibration, held-out) samples
TARGETS = ("int8", "fp8", "w4", "mxfp4", "nvfp4", "a16w8")
CASES = [f"{m}:{t}" for m in MODELS for t in TARGETS]
# Every golden compile validates (accuracy_level "auto" is decided by validation) but never gates
# or restores: the golden is the first compile's result, whatever its SQNR.
COMPILE_ARGS = {"min_sqnr": -1000.0, "max_float": 0.0}


def data_digest(case: str) -> str:
    """sha256 of the case's calibration and held-out arrays: the golden files hold for these only."""
    import hashlib

    import numpy as np

    from qcompile import zoo

    model = case.split(":")[0]
    n_calib, n_eval = MODELS[model]
    h = hashlib.sha256()
    for path in (zoo.get_data(model, "calib", n_calib), zoo.get_data(model, "eval", n_eval)):
        with np.load(path) as d:
            for k in sorted(d.files):
                h.update(k.encode() + str(d[k].shape).encode() + np.ascontiguousarray(d[k]).tobytes())
    return h.hexdigest()


def compile_case(case: str):
    """(plan JSON, {output: array} on the held-out samples) of one case, compiled now."""
    import numpy as np
    from helpers import session

    import qcompile
    from qcompile import zoo

    model, target = case.split(":")
    n_calib, n_eval = MODELS[model]
    path = zoo.get_model(model)
    calib, held = zoo.get_data(model, "calib", n_calib), zoo.get_data(model, "eval", n_eval)
    res = qcompile.compile(str(path), target, calib=str(calib), eval=str(held), **COMPILE_ARGS)
    sess = session(qcompile.pipeline.ir.to_proto(res.model))
    feed = dict(np.load(held))
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()})))
    return res.plan.to_json(), outs, res.report


def main(cases: list[str]) -> None:
    import numpy as np

    from qcompile.cpu import host_cpu

    for case in cases:
        plan, outs, report = compile_case(case)
        stem = HERE / case.replace(":", "-")
        with gzip.open(f"{stem}.plan.json.gz", "wt") as f:
            f.write(json.dumps(plan, indent=1, sort_keys=True) + "\n")
        np.savez_compressed(f"{stem}.outputs.npz", **outs)
        meta = {"cpu": host_cpu().value, "accuracy_level": report.get("accuracy_level", {}).get("level"),
                "sqnr_db": report["verdict"]["worst_output_sqnr_db"], "data_sha256": data_digest(case)}
        Path(f"{stem}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(case, meta, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or CASES)
