"""Mixed-precision allocation: one candidate per layer, the least total sensitivity under budgets.

The candidate table (`Table`) holds, for layers i and candidates c (a quantization choice: weight
format and granularity, activation format; "float"), the measured sensitivity s[i, c] (+inf where
c cannot run on i), any number of additive costs cost_k[i, c] (stored weight bits, BOPs, measured
latency) and per-candidate labels (e.g. the activation format), and the graph's ties. The
allocation is the integer linear program (HAWQ-V3's, with any number of candidates and budgets):

    minimize    sum_ic s[i, c] x[i, c]                       x[i, c] in {0, 1}, only where s < inf
    subject to  sum_c x[i, c] = 1                            one candidate per layer
                sum_ic cost_k[i, c] x[i, c] <= B_k           every budget k
                sum_{c: a(c) = v} x[i, c] = sum_{c: a(c) = v} x[j, c]
                                                             every tie (a, {i, j, ...}) and label v:
                                                             tied layers share attribute a

solved to optimality by HiGHS (`scipy.optimize.milp`): `solve` reports the status, the objective,
HiGHS's dual bound, the gap between them and the solve time. `greedy` is the baseline tools ship
(AIMET-style: start from the cheapest candidates and promote the move with the largest
sensitivity drop per unit of the first budget's cost while everything fits) and `brute_force`
the check on small instances. A table is plain JSON (`Table.to_json`), so an allocation for another
budget re-solves without re-measuring (`qcompile allocate`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

BRUTE_FORCE_MAX = 2_000_000  # combinations `brute_force` enumerates at most


@dataclass
class Table:
    layers: list[str]
    candidates: list[str]
    sensitivity: np.ndarray  # [L, C]; +inf where the candidate is not allowed on the layer
    costs: dict[str, np.ndarray]  # cost name -> [L, C], additive over layers
    labels: dict[str, list[str]] = field(default_factory=dict)  # attribute -> one label per candidate
    ties: list[tuple[str, list[int]]] = field(default_factory=list)  # (attribute, layers that share it)
    fixed: dict[str, float] = field(default_factory=dict)  # cost name -> cost outside the layers
    meta: dict = field(default_factory=dict)  # how it was measured (data, loss, proxies), free form

    def __post_init__(self) -> None:
        self.sensitivity = np.asarray(self.sensitivity, dtype=np.float64)
        self.costs = {k: np.asarray(v, dtype=np.float64) for k, v in self.costs.items()}
        shape = (len(self.layers), len(self.candidates))
        for name, a in [("sensitivity", self.sensitivity), *self.costs.items()]:
            if a.shape != shape:
                raise ValueError(f"candidate table: {name} has shape {a.shape}, expected {shape}")
        for attr, labels in self.labels.items():
            if len(labels) != shape[1]:
                raise ValueError(f"candidate table: {len(labels)} labels of {attr!r} for {shape[1]} candidates")
        for attr, group in self.ties:
            if attr not in self.labels or any(not 0 <= i < shape[0] for i in group):
                raise ValueError(f"candidate table: tie on {attr!r} over {group} does not fit the table")
        if not self.allowed.any(axis=1).all():
            bad = [self.layers[i] for i in np.flatnonzero(~self.allowed.any(axis=1))]
            raise ValueError(f"candidate table: no candidate allowed for {bad[:3]}")

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.sensitivity)

    def total(self, cost: str, choice: np.ndarray) -> float:
        return float(self.costs[cost][np.arange(len(self.layers)), choice].sum() + self.fixed.get(cost, 0.0))

    def to_json(self) -> dict:
        def arr(a):
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        return {"layers": list(self.layers), "candidates": list(self.candidates), "sensitivity": arr(self.sensitivity),
                "costs": {k: arr(v) for k, v in self.costs.items()}, "labels": {k: list(v) for k, v in self.labels.items()},
                "ties": [[a, list(g)] for a, g in self.ties], "fixed": dict(self.fixed), "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Table:
        def arr(rows):
            return np.array([[np.inf if v is None else v for v in row] for row in rows], dtype=np.float64)

        return cls(list(d["layers"]), list(d["candidates"]), arr(d["sensitivity"]), {k: arr(v) for k, v in d["costs"].items()},
                   {k: list(v) for k, v in d.get("labels", {}).items()}, [(a, list(g)) for a, g in d.get("ties", [])],
                   dict(d.get("fixed", {})), dict(d.get("meta", {})))


@dataclass(frozen=True)
class Budget:
    """sum of `cost` over the layers (plus the table's fixed part) <= `limit`."""

    cost: str
    limit: float


WEIGHT_BITS, LATENCY, FLOAT = "weight_bits", "latency", "float"  # the table's conventional cost and candidate names


def budgets_from(table: Table, bits: float | None = None, mb: float | None = None,
                 latency: float | None = None) -> list[Budget]:
    """The CLI's budgets on a table measured by qcompile: `bits` average bits per weight of the
    layers (cost "weight_bits": stored bits of a layer's weights and scales; the layers' element
    counts in meta["params"]), `mb` the stored weights of the whole model in MB of 10^6 bytes
    (fixed["weight_bits"] is what lies outside the layers), `latency` a ratio of the float
    model's (cost "latency", candidate "float", fixed["latency"] the rest of the graph)."""
    out = []
    need = {WEIGHT_BITS} if bits is not None or mb is not None else set()
    need |= {LATENCY} if latency is not None else set()
    missing = sorted(need - set(table.costs))
    if missing:
        raise ValueError(f"candidate table has no {' or '.join(missing)} cost for the budget asked")
    if bits is not None:
        params = table.meta.get("params")
        if params is None or len(params) != len(table.layers):
            raise ValueError("candidate table: --budget-bits needs meta.params (weight elements per layer)")
        out.append(Budget(WEIGHT_BITS, bits * float(np.sum(params)) + table.fixed.get(WEIGHT_BITS, 0.0)))
    if mb is not None:
        out.append(Budget(WEIGHT_BITS, mb * 8e6))
    if latency is not None:
        if FLOAT not in table.candidates:
            raise ValueError("candidate table: --budget-latency needs the float candidate's latency")
        ref = table.costs[LATENCY][:, table.candidates.index(FLOAT)].sum() + table.fixed.get(LATENCY, 0.0)
        out.append(Budget(LATENCY, latency * ref))
    return out


@dataclass
class Solution:
    method: str  # "ilp", "greedy" or "brute-force"
    status: str  # "optimal", "feasible" (a time limit hit with a solution), "infeasible", ...
    choice: np.ndarray | None  # candidate index per layer
    objective: float | None
    bound: float | None = None  # the solver's proof: no allocation within budget has less sensitivity
    gap: float | None = None  # (objective - bound) / |objective|
    seconds: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)

    def plan(self, table: Table) -> dict[str, str]:
        """layer -> chosen candidate name."""
        return {} if self.choice is None else {table.layers[i]: table.candidates[c] for i, c in enumerate(self.choice)}

    def to_json(self, table: Table) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "choice"}
        d["plan"] = self.plan(table)
        return d


def _finish(table: Table, budgets: list[Budget], method: str, choice, t0: float, **kw) -> Solution:
    if choice is None:
        return Solution(method, kw.pop("status", "infeasible"), None, None, seconds=time.perf_counter() - t0, **kw)
    choice = np.asarray(choice, dtype=np.int64)
    obj = float(table.sensitivity[np.arange(len(choice)), choice].sum())
    totals = {b.cost: table.total(b.cost, choice) for b in budgets}
    return Solution(method, kw.pop("status", "feasible"), choice, obj, totals=totals, seconds=time.perf_counter() - t0, **kw)


def _tie_rows(table: Table):
    """(layer i, layer j, candidate mask of label v) for every tie and label: the equalities."""
    for attr, group in table.ties:
        labels = np.array(table.labels[attr])
        for j in group[1:]:
            for v in np.unique(labels):
                yield group[0], j, labels == v


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 to /dev/null: scipy's HiGHS build prints debug lines from C++ on large
    tables, and stdout carries the CLI's result."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def solve(table: Table, budgets: list[Budget], time_limit: float = 60.0, gap: float = 1e-6) -> Solution:
    """The ILP of the module doc, solved by HiGHS; status "optimal" when proven to within a
    relative `gap` (HiGHS's default 1e-4 stops early on large tables)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    n_layers, n_cand = table.sensitivity.shape
    rows, cols = np.nonzero(table.allowed)  # one variable per allowed (layer, candidate)
    var = -np.ones((n_layers, n_cand), dtype=np.int64)
    var[rows, cols] = np.arange(rows.size)
    n = rows.size
    cons = [LinearConstraint(coo_matrix((np.ones(n), (rows, np.arange(n))), shape=(n_layers, n)), 1, 1)]
    if budgets:
        a = np.stack([table.costs[b.cost][rows, cols] for b in budgets])
        ub = np.array([b.limit - table.fixed.get(b.cost, 0.0) for b in budgets])
        cons.append(LinearConstraint(a, -np.inf, ub))
    tr, tc, tv = [], [], []
    for k, (i, j, mask) in enumerate(_tie_rows(table)):
        for layer, sign in ((i, 1.0), (j, -1.0)):
            v = var[layer][mask]
            v = v[v >= 0]
            tr += [k] * v.size
            tc += v.tolist()
            tv += [sign] * v.size
    if tr:
        cons.append(LinearConstraint(coo_matrix((tv, (tr, tc)), shape=(max(tr) + 1, n)), 0, 0))
    with _quiet_stdout():
        res = milp(table.sensitivity[rows, cols], constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "presolve": True, "mip_rel_gap": gap})
    if res.x is None:
        return _finish(table, budgets, "ilp", None, t0, status="infeasible" if res.status == 2 else f"failed: {res.message}")
    x = res.x.round().astype(bool)
    choice = cols[x][np.argsort(rows[x])]
    status = "optimal" if res.status == 0 else "feasible"
    bound = getattr(res, "mip_dual_bound", None)
    gap = getattr(res, "mip_gap", None)
    return _finish(table, budgets, "ilp", choice, t0, status=status,
                   bound=None if bound is None else float(bound), gap=None if gap is None else float(gap))


def _units(table: Table) -> list[list[int]]:
    """Layers that move together in `greedy`: each tie's layers (merged when ties overlap), else
    alone; in order of their first layer."""
    import networkx as nx

    uf = nx.utils.UnionFind(range(len(table.layers)))
    for _, group in table.ties:
        uf.union(*group)
    return sorted((sorted(u) for u in uf.to_sets()), key=lambda u: u[0])


def feasible(table: Table, budgets: list[Budget], choice: np.ndarray) -> bool:
    """Allowed, within every budget, and every tie holds."""
    idx = np.arange(len(choice))
    if not table.allowed[idx, choice].all():
        return False
    if any(table.total(b.cost, choice) > b.limit * (1 + 1e-9) + 1e-9 for b in budgets):
        return False
    return all(table.labels[a][choice[group[0]]] == table.labels[a][choice[j]] for a, group in table.ties for j in group[1:])


def greedy(table: Table, budgets: list[Budget]) -> Solution:
    """AIMET-style: every unit (a layer, or tied layers moving together: one candidate for all, so
    their ties hold) starts at its cheapest candidate under the first budget's cost; then, while a
    move fits every budget, apply the one with the largest sensitivity drop per unit of added
    cost (drops that add no cost first)."""
    t0 = time.perf_counter()
    units = _units(table)
    n_cand = len(table.candidates)

    def per_unit(a):  # [U, C]: summed over each unit's layers
        return np.stack([a[u].sum(axis=0) for u in units])

    sens = per_unit(np.where(table.allowed, table.sensitivity, 0.0))
    ok = np.stack([table.allowed[u].all(axis=0) for u in units])
    costs = [per_unit(table.costs[b.cost]) for b in budgets]
    limits = np.array([b.limit - table.fixed.get(b.cost, 0.0) for b in budgets])
    primary = costs[0] if costs else np.zeros_like(sens)
    if not ok.any(axis=1).all():
        return _finish(table, budgets, "greedy", None, t0)
    cur = np.argmin(np.where(ok, primary + 1e-12 * sens, np.inf), axis=1)
    rows = np.arange(len(units))
    totals = np.array([c[rows, cur].sum() for c in costs])
    if (totals > limits * (1 + 1e-9) + 1e-9).any():
        return _finish(table, budgets, "greedy", None, t0)
    for _ in range(len(units) * n_cand):
        drop = sens[rows, cur][:, None] - sens
        fits = ok & (drop > 0)
        for k, c in enumerate(costs):
            fits &= totals[k] + c - c[rows, cur][:, None] <= limits[k] * (1 + 1e-9) + 1e-9
        if not fits.any():
            break
        added = primary - primary[rows, cur][:, None]
        rate = np.where(fits, np.where(added > 0, drop / np.maximum(added, 1e-300), np.inf), -np.inf)
        u, c = np.unravel_index(np.argmax(rate), rate.shape)
        totals += np.array([k[u, c] - k[u, cur[u]] for k in costs]) if costs else 0.0
        cur[u] = c
    choice = np.zeros(len(table.layers), dtype=np.int64)
    for u, c in zip(units, cur):
        choice[u] = c
    return _finish(table, budgets, "greedy", choice, t0)


def brute_force(table: Table, budgets: list[Budget], chunk: int = 1 << 16) -> Solution:
    """Every allocation enumerated (at most BRUTE_FORCE_MAX; allocation k's choice for layer i is
    digit i of k in the mixed radix of the layers' option counts): the exact optimum of a small
    instance."""
    t0 = time.perf_counter()
    options = [np.flatnonzero(row) for row in table.allowed]
    radix = np.array([len(o) for o in options], dtype=np.int64)
    count = int(np.prod(radix.astype(np.float64)))
    if count > BRUTE_FORCE_MAX:
        raise ValueError(f"brute force over {count} allocations (at most {BRUTE_FORCE_MAX})")
    place = np.concatenate([[1], np.cumprod(radix[:-1])])
    idx = np.arange(len(options))
    table_of = np.full((len(options), radix.max()), -1, dtype=np.int64)
    for i, o in enumerate(options):
        table_of[i, :len(o)] = o
    codes = {a: np.unique(np.array(v), return_inverse=True)[1] for a, v in table.labels.items()}
    best, best_obj = None, np.inf
    for start in range(0, count, chunk):
        k = np.arange(start, min(start + chunk, count), dtype=np.int64)
        block = table_of[idx, (k[:, None] // place) % radix]  # [chunk, L] candidate indices
        obj = table.sensitivity[idx, block].sum(axis=1)
        ok = np.ones(len(block), dtype=bool)
        for b in budgets:
            total = table.costs[b.cost][idx, block].sum(axis=1) + table.fixed.get(b.cost, 0.0)
            ok &= total <= b.limit * (1 + 1e-9) + 1e-9
        for a, group in table.ties:
            lab = codes[a][block[:, group]]
            ok &= (lab == lab[:, :1]).all(axis=1)
        if ok.any():
            j = np.flatnonzero(ok)[np.argmin(obj[ok])]
            if obj[j] < best_obj:
                best, best_obj = block[j].copy(), obj[j]
    return _finish(table, budgets, "brute-force", best, t0, status="optimal" if best is not None else "infeasible")
