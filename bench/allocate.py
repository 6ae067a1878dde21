#!/usr/bin/env python3
"""Solve time of the mixed-precision ILP (issue 12, acceptance 2: 1000 layers x 8 candidates, two
budgets, proven optimal in <= 1 s), and how far the AIMET-style greedy lands from the optimum.

    python bench/allocate.py                       # 1000 x 8, budgets on weight bits and latency
    python bench/allocate.py --layers 300 --candidates 6 --repeats 5

The instance is synthetic but shaped like a real table: per layer a parameter count (log-uniform
1e4-1e7), candidates with 2-16 bits per weight plus scales, sensitivity ~ params x 4^-bits x a
per-layer factor (log-normal), latency falling with bits with noise; ties on an activation label
over random layer pairs. Budgets: the average bits per weight at 40% of the way from the
cheapest to the largest allocation, the latency at 60%. Prints the solver status, objective,
bound, gap, the median solve time of --repeats runs, the greedy objective and the CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from qcompile.allocate import Budget, Table, greedy, solve
from qcompile.cpu import host_description


def instance(n_layers: int, n_cand: int, seed: int = 0) -> tuple[Table, list[Budget]]:
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.choice([2, 3, 4, 4.5, 5, 6, 8, 8.25, 16], n_cand, replace=n_cand > 9))
    params = np.exp(rng.uniform(np.log(1e4), np.log(1e7), n_layers))
    factor = rng.lognormal(0.0, 1.0, n_layers)
    sens = params[:, None] * factor[:, None] * 4.0 ** -bits[None, :] * rng.uniform(0.8, 1.2, (n_layers, n_cand))
    weight_bits = params[:, None] * bits[None, :]
    latency = params[:, None] * (0.3 + bits[None, :] / 16) * rng.uniform(0.9, 1.1, (n_layers, n_cand))
    labels = {"activation": ["int8" if b <= 8 else "float" for b in bits]}
    pairs = rng.choice(n_layers, (n_layers // 20, 2), replace=False) if n_layers >= 40 else np.empty((0, 2), int)
    table = Table([f"layer{i}" for i in range(n_layers)], [f"c{j}" for j in range(n_cand)], sens,
                  {"weight_bits": weight_bits, "latency": latency}, labels, [("activation", sorted(map(int, p))) for p in pairs])
    budgets = []
    for name, frac in (("weight_bits", 0.4), ("latency", 0.6)):
        lo, hi = table.costs[name].min(axis=1).sum(), table.costs[name].max(axis=1).sum()
        budgets.append(Budget(name, lo + frac * (hi - lo)))
    return table, budgets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    table, budgets = instance(args.layers, args.candidates, args.seed)
    runs = [solve(table, budgets) for _ in range(args.repeats)]
    r = runs[0]
    g = greedy(table, budgets)
    print(json.dumps({
        "instance": f"{args.layers} layers x {args.candidates} candidates, {len(table.ties)} ties, budgets "
                    + ", ".join(b.cost for b in budgets),
        "status": r.status, "objective": r.objective, "bound": r.bound, "gap": r.gap,
        "solve_seconds_median": statistics.median(x.seconds for x in runs),
        "greedy_objective": g.objective, "greedy_over_optimum": None if g.objective is None else g.objective / r.objective,
        "greedy_seconds": g.seconds, "cpu": host_description()}, indent=1))


if __name__ == "__main__":
    main()
