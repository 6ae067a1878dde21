"""The mixed-precision ILP (issue 12, acceptance 1): optimal against brute force on every instance
small enough to enumerate (a property test), and HAWQ-V3's own ResNet-18 instances, from the
official notebook's data, give the bit configurations HAWQ published for them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.allocate import Budget, Table, brute_force, feasible, greedy, solve

HAWQ = json.loads((Path(__file__).parent / "data" / "hawq_v3_resnet18.json").read_text())
REL = 1e-9  # objectives are sums of the same float64 terms: equal up to summation order


def _hawq_table() -> Table:
    """HAWQ's objective sum_i Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2 (the notebook's x-1 form differs by
    a constant), its costs (size 0.5 / 1 x params in MB-ish units, BOPs / 64 and / 16, T4
    latencies) and its three ties."""
    tr = np.array(HAWQ["hutchinson_trace"])
    sens = np.stack([tr * np.array(HAWQ["delta_weights_4bit_square"]), tr * np.array(HAWQ["delta_weights_8bit_square"])], 1)
    params = np.array(HAWQ["parameters"]) / 1024 / 1024
    bops = np.array(HAWQ["bops"]) / 1e6
    costs = {"size": np.stack([0.5 * params, params], 1), "bops": np.stack([bops / 64, bops / 16], 1),
             "latency": np.stack([HAWQ["latency_int4"], HAWQ["latency_int8"]], 1)}
    return Table([f"x{i}" for i in range(len(tr))], ["int4", "int8"], sens, costs, {"bits": ["4", "8"]},
                 [("bits", g) for g in HAWQ["ties"]])


@pytest.mark.parametrize("instance", sorted(HAWQ["published_bits"]))
def test_hawq_v3_resnet18_instances_give_the_published_bit_configs(instance):
    """Limit = all-INT4 + frac x (all-INT8 - all-INT4), as the notebook sets it; the optimum's
    bits equal bit_config.py's for all nine (size, BOPs, latency) x (0.25, 0.5, 0.75)."""
    kind, frac = instance.split("_")
    t = _hawq_table()
    lo, hi = t.costs[kind][:, 0].sum(), t.costs[kind][:, 1].sum()
    budgets = [Budget(kind, lo + (hi - lo) * float(frac))]
    r = solve(t, budgets)
    assert r.status == "optimal" and r.gap is not None and r.gap <= 1e-6, r
    assert "".join(t.candidates[c][-1] for c in r.choice) == HAWQ["published_bits"][instance]
    assert feasible(t, budgets, r.choice) and r.totals[kind] <= budgets[0].limit + 1e-9
    if frac == "0.5":  # 2^19 allocations each: brute force once per budget kind
        bf = brute_force(t, budgets)
        assert bf.objective == pytest.approx(r.objective, rel=REL) and (bf.choice == r.choice).all()
    g = greedy(t, budgets)
    assert g.objective >= r.objective * (1 - REL)


@st.composite
def tables(draw):
    """Up to 12 layers x 3 candidates: sensitivities (some candidates not allowed), two costs with
    limits between their least and largest totals, ties on an activation-format label."""
    n_layers, n_cand = draw(st.integers(1, 12)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sens = rng.exponential(1.0, (n_layers, n_cand))
    sens[rng.random((n_layers, n_cand)) < 0.15] = np.inf
    sens[np.arange(n_layers), rng.integers(0, n_cand, n_layers)] = rng.exponential(1.0, n_layers)  # one allowed each
    costs = {k: rng.integers(1, 20, (n_layers, n_cand)).astype(float) for k in ("bits", "latency")}
    labels = {"activation": [str(x) for x in rng.integers(0, 2, n_cand)]}
    ties = []
    for _ in range(draw(st.integers(0, 3))):
        size = min(n_layers, draw(st.integers(2, 4)))
        if size >= 2:
            ties.append(("activation", sorted(rng.choice(n_layers, size, replace=False).tolist())))
    table = Table([f"l{i}" for i in range(n_layers)], [f"c{j}" for j in range(n_cand)], sens, costs, labels, ties)
    budgets = []
    for k, a in costs.items():
        a = np.where(np.isfinite(sens), a, np.nan)
        lo, hi = np.nanmin(a, axis=1).sum(), np.nanmax(a, axis=1).sum()
        budgets.append(Budget(k, lo + (hi - lo) * draw(st.floats(0.0, 1.0))))
    return table, budgets


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_ilp_equals_brute_force(instance):
    """Acceptance 1: the same optimum (or the same infeasibility) as enumerating every allocation,
    the ILP's answer is feasible and proven (gap ~0), greedy is never better."""
    table, budgets = instance
    r, bf = solve(table, budgets), brute_force(table, budgets)
    assert (r.choice is None) == (bf.choice is None), (r, bf)
    if bf.choice is None:
        assert r.status == "infeasible" and greedy(table, budgets).choice is None
        return
    assert r.status == "optimal" and feasible(table, budgets, r.choice)
    assert r.objective == pytest.approx(bf.objective, rel=REL, abs=1e-12)
    assert r.bound is not None and r.bound <= r.objective + 1e-9
    g = greedy(table, budgets)
    if g.choice is not None:
        assert feasible(table, budgets, g.choice) and g.objective >= r.objective - 1e-9


def test_table_json_round_trip_and_errors():
    t = _hawq_table()
    t.sensitivity[3, 0] = np.inf  # a candidate not allowed survives JSON as null
    back = Table.from_json(json.loads(json.dumps(t.to_json())))
    assert back.layers == t.layers and back.ties == t.ties and np.array_equal(back.sensitivity, t.sensitivity)
    assert all(np.array_equal(back.costs[k], t.costs[k]) for k in t.costs)
    budgets = [Budget("size", t.costs["size"][:, 0].sum() * 1.2)]
    assert solve(back, budgets).plan(back) == solve(t, budgets).plan(t)
    with pytest.raises(ValueError, match="shape"):
        Table(["a"], ["x", "y"], np.zeros((1, 3)), {})
    with pytest.raises(ValueError, match="no candidate allowed"):
        Table(["a"], ["x"], np.full((1, 1), np.inf), {})
    with pytest.raises(ValueError, match="tie"):
        Table(["a", "b"], ["x"], np.zeros((2, 1)), {}, {}, [("activation", [0, 1])])
    r = solve(t, [Budget("size", 0.0)])  # below all-int4: nothing fits
    assert r.status == "infeasible" and r.choice is None and greedy(t, [Budget("size", 0.0)]).choice is None


def _cli_table(tmp_path) -> Path:
    """A table by qcompile's conventions (weight_bits, latency, a float candidate, meta.params)."""
    params = np.array([1000.0, 4000.0, 2000.0])
    bits = np.array([32.0, 8.25, 4.5])
    t = Table(["a", "b", "c"], ["float", "int8", "w4"], np.array([[0, 1, 9], [0, 2, 3], [0, 5, 20]], float),
              {"weight_bits": params[:, None] * bits[None, :], "latency": np.array([[3, 1, 2], [9, 3, 4], [5, 2, 3]], float)},
              {"activation": ["float", "int8", "float"]}, [], {"weight_bits": 8e3, "latency": 1.0}, {"params": params.tolist()})
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"allocation": {"table": t.to_json()}}))
    return path


def test_allocate_cli_resolves_a_table_for_other_budgets(tmp_path):
    """`qcompile allocate` re-solves from the JSON alone: at 6 bits/weight the optimum keeps the
    most sensitive layer at int8 and puts b at w4; bad input is one line and a non-zero exit."""
    from click.testing import CliRunner

    from qcompile.cli import main

    path = _cli_table(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["allocate", "--table", str(path), "--budget-bits", "6", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    # 6 x 7000 bits: int8 everywhere needs 57750, a->w4 saves 3750, b->w4 15000, c->w4 7500
    assert out["status"] == "optimal" and out["plan"] == {"a": "w4", "b": "w4", "c": "int8"}, out
    assert out["totals"]["weight_bits"] <= 6 * 7000 + 8e3
    r = runner.invoke(main, ["allocate", "--table", str(path), "--budget-latency", "0.6", "--budget-mb", "0.01"])
    assert r.exit_code == 0 and "optimal" in r.output, r.output
    for args, msg in [(["--budget-bits", "1"], "no allocation fits"), ([], "at least one budget"),
                      (["--budget-bits", "-2"], "Invalid value")]:
        r = runner.invoke(main, ["allocate", "--table", str(path), *args])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": ["a"]}')
    r = runner.invoke(main, ["allocate", "--table", str(bad), "--budget-bits", "4"])
    assert r.exit_code == 1 and "not a candidate table" in r.output and len(r.output.strip().splitlines()) == 1
