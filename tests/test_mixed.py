"""Target "auto" end to end on the bundled digits MLP (issue 12): the measured candidate table, the
ILP's choice within the budget, compiled and validated; never worse than a uniform target of the
same size; the plan replays and `qcompile allocate` re-solves it; bad budgets are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import qcompile
from qcompile.allocate import WEIGHT_BITS, Table
from qcompile.cli import main
from qcompile.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
MLP, CALIB, EVAL = (str(ROOT / "models" / f) for f in ("digits_mlp.onnx", "digits_calib.npz", "digits_eval.npz"))
UNIFORM = ("int8", "fp8", "a16w8", "w4", "w:int4/128", "fp6", "w4a8", "mxfp4", "nvfp4")


def _sqnr(r) -> float:
    return r.report["verdict"]["worst_output_sqnr_db"]


@pytest.fixture(scope="module")
def uniform():
    """Each candidate compiled alone: its SQNR and its stored bits per weight by the table's count."""
    return {t: _sqnr(qcompile.compile(MLP, t, calib=CALIB, eval=EVAL, min_sqnr=-100)) for t in UNIFORM}


@pytest.mark.parametrize("bits", [4.5, 6.0, 8.5])
def test_auto_fits_its_budget_and_is_not_worse_than_a_uniform_target_of_that_size(bits, uniform):
    r = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=bits)
    a = r.report["allocation"]
    table, sol = Table.from_json(a["table"]), a["solution"]
    params = sum(table.meta["params"])
    assert sol["status"] == "optimal" and sol["gap"] <= 1e-6
    assert sol["totals"][WEIGHT_BITS] <= bits * params + table.fixed[WEIGHT_BITS] + 1e-6
    assert set(r.plan.nodes) == {n for n, c in sol["plan"].items() if c != "float"}, "the chosen plan is compiled"
    assert r.report["verdict"]["passed"] and r.plan.allocation["solution"]["plan"] == sol["plan"]
    # every candidate was measured on every layer it can run on (float: 0)
    assert np.isfinite(table.sensitivity).all() and (table.sensitivity[:, 0] == 0).all()
    col = {c: j for j, c in enumerate(table.candidates)}
    fits = [t for t in UNIFORM if table.costs[WEIGHT_BITS][:, col[t]].sum() <= bits * params + 1e-6]
    assert fits, "some uniform target fits every budget tried"
    best = max(uniform[t] for t in fits)
    print(f"auto @ {bits} bits/weight: {_sqnr(r):.2f} dB, {sol['plan']}; best uniform that fits {best:.2f}")
    assert _sqnr(r) >= best - 0.1, (sol["plan"], {t: uniform[t] for t in fits})


def test_auto_plan_replays_and_allocate_resolves_it(tmp_path):
    r = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=6.0)
    path = tmp_path / "plan.json"
    r.plan.save(path)
    again = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, plan=str(path), budget_bits=6.0)
    assert set(again.plan.nodes) == set(r.plan.nodes) and _sqnr(again) == pytest.approx(_sqnr(r), abs=1e-3)
    assert "allocation" not in [e["name"] for e in again.report["passes"]], "a replay measures nothing"
    out = CliRunner().invoke(main, ["allocate", "--table", str(path), "--budget-bits", "6", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["plan"] == r.report["allocation"]["solution"]["plan"]


def test_auto_budget_errors(tmp_path):
    with pytest.raises(InputError, match="needs a budget"):
        qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL)
    with pytest.raises(InputError, match="for --target auto"):
        qcompile.compile(MLP, "int8", calib=CALIB, eval=EVAL, budget_bits=4)
    with pytest.raises(InputError, match="candidate 'int9'"):
        qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=4, candidates="int8;int9")
    with pytest.raises(InputError, match="at least"):
        qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=1.0, candidates="int8;w4")
    out = CliRunner().invoke(main, [MLP, "--target", "auto", "--calib", CALIB, "--eval", EVAL, "-o", str(tmp_path / "o.onnx")])
    assert out.exit_code == 1 and "needs a budget" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "o.onnx").exists()


def test_sweep_executors_agree_and_a_sweep_resumes(tmp_path, monkeypatch):
    """Acceptance 4: the process pool and a local Ray (2 CPUs; the state put once in its object
    store) give the serial sweep's candidate table exactly; a cached sweep (a file per candidate)
    with entries missing runs only those."""
    import os

    from qcompile import sweep

    monkeypatch.setattr(sweep, "SERIAL_SECONDS", 0.0)  # a pool even for this small sweep
    executors = ["serial", "process", "ray"]
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs the ray extra")
        executors.remove("ray")
    tables = {}
    for ex in executors:
        monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / ex))  # no cache shared between executors
        r = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=6.0, executor=ex)
        t = r.report["allocation"]["table"]
        tables[ex] = (t["layers"], t["candidates"], t["sensitivity"], t["costs"])
    if "ray" in executors:
        ray.shutdown()
    assert all(tables[ex] == tables["serial"] for ex in executors), "every executor measures the same"

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "serial"))
    files = sorted((tmp_path / "serial" / "sensitivity").glob("*.json"))
    assert len(files) == len(tables["serial"][1]) - 1, "a file per measured candidate (float is not)"
    cached = files[0]
    entries = json.loads(cached.read_text())
    dropped = sorted(entries)[:2]
    cached.write_text(json.dumps({k: v for k, v in entries.items() if k not in dropped}))
    calls = []
    real = sweep._run_task
    monkeypatch.setattr(sweep, "_run_task", lambda *a: calls.append(a[3]) or real(*a))
    r = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_bits=6.0, executor="serial")
    t = r.report["allocation"]["table"]
    assert (t["layers"], t["candidates"], t["sensitivity"], t["costs"]) == tables["serial"]
    assert sorted(n for layers in calls for n in layers) == dropped


def test_latency_budget_uses_a_measured_reusable_table(tmp_path, monkeypatch):
    """--budget-latency: every (layer, candidate) timed as a one-layer model (float included), the
    table stored as JSON and reused by the next compile (nothing measured again); the ILP keeps
    the sum within the ratio of float's. (Whether the compiled model is then not slower than float
    is a wall-clock claim: bench/mixed.py measures it.)"""
    from qcompile import latency

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    r = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_latency=1.0, candidates="int8;w4;fp8")
    a = r.report["allocation"]
    table = Table.from_json(a["table"])
    lat = table.costs["latency"]
    assert table.candidates == ["float", "int8", "w4", "fp8"] and (lat[:, 0] > 0).all() and (lat > 0).all()
    (budget,) = a["budgets"]
    assert budget["cost"] == "latency" and a["solution"]["totals"]["latency"] <= budget["limit"] * (1 + 1e-9)
    assert budget["limit"] == pytest.approx(lat[:, 0].sum() + table.fixed["latency"])
    stored = json.loads(latency.table_path().read_text())
    assert len(stored) == 3 * 4, "3 layers x 4 candidates, each measured once"
    mtime = latency.table_path().stat().st_mtime_ns
    again = qcompile.compile(MLP, "auto", calib=CALIB, eval=EVAL, budget_latency=1.0, candidates="int8;w4;fp8")
    assert latency.table_path().stat().st_mtime_ns == mtime, "the second compile measured nothing"
    assert np.array_equal(Table.from_json(again.report["allocation"]["table"]).costs["latency"], lat)
