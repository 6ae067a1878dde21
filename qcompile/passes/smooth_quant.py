"""SmoothQuant: move activation outliers into the weights before quantizing both.

For an activation X [..., K] read by MatMul/Gemm consumers with constant weights W_c [K, N_c]:

    s_j = max|X_j|^alpha / max_c max_n |W_c[j, n]|^(1 - alpha)       (j = 1..K, clipped to [1e-5, 1e5])
    X W_c = (X diag(1/s)) (diag(s) W_c)                              (exact)

s is chosen per activation (`choose_scales`) among candidates: SmoothQuant's rule for each alpha
in ALPHAS, *outlier-only* scales s_j = max(1, max|X_j| / t) that shrink just the channels above
the t = OUTLIER_QUANTILES quantiles of the channel maxima (weights of the other rows untouched),
and "no smoothing". Each is scored by the quantized output error sum_c ||X W_c - Q(X/s) Q(s W_c)||^2 on a subset of
calibration rows, with the target's own activation and weight quantizers; the best wins. Fixed
alpha=0.5 is what the paper uses; on BERT-like encoders it hurts layers after GELU (whose
negative tail blows up when divided by small s_j), so the search matters.

Before:  y_c = MatMul(x, W_c)
After:   y_c = MatMul(Mul(x, 1/s), W'_c),  W'_c = diag(s) W_c  (a new initializer; W_c is never
         modified in place, another node may share it)

When x is used only by the smoothed consumers, 1/s is folded into its producers instead of
inserting a Mul: through Relu and bias Adds into a LayerNormalization gain, a per-channel Mul
(decomposed RMSNorm), or the output columns of a MatMul/Gemm (`_plan_fold`). This keeps Relu
right before the quantizer, so onnxruntime still folds it into an integer kernel. Per-channel maxima come from a calibration pass (`channel_stats`).
Every smoothed consumer is marked (node metadata `qcompile.smoothed`), so a second run smooths
nothing twice, and so are the nodes computing x/s (`qcompile.smoothing`: the Mul or the producers); the plan is re-read from the graph afterwards (`analyze.plan_on`), since the
consumers now read the smoothed activation and weights. Exact in float: the float output changes only by rounding.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile import external
from qcompile.graph import drop_unused_initializers, index, initializer, replace_const
from qcompile.plan import QuantPlan
from qcompile.transform_search import Scorer, search_columns

log = logging.getLogger(__name__)
SMOOTHED_KEY = "qcompile.smoothed"  # node metadata on a consumer whose weight absorbed s
SMOOTHING_KEY = "qcompile.smoothing"  # node metadata on the nodes computing x / s (a Mul, or producers that folded it)


def _weight_kn(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(W, transposed) when `node` computes x @ W with a constant 2-D W read as [K, N] (a Gemm with
    transB stores W^T), or None if not smoothable. Reads no weight bytes."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if node.op_type == "MatMul":
        return w, False
    if node.op_type == "Gemm" and not _attr_int(node, "transA"):
        return w, bool(_attr_int(node, "transB"))
    return None


def _weight_rows(node: ir.Node) -> np.ndarray | None:
    """W as [K, N] (rows indexed by the activation's channel), or None if not smoothable."""
    kn = _weight_kn(node)
    if kn is None:
        return None
    arr = kn[0].const_value.numpy()
    return arr.T if kn[1] else arr


def _attr_int(node: ir.Node, name: str) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else 0


def smoothable(graph: ir.Graph, plan: QuantPlan) -> dict[str, list[str]]:
    """Activation value -> the plan nodes reading it at input 0 whose weights can absorb s.

    A value qualifies only if *every* quantized consumer is such a node (a shared scale must
    fold into all of them).
    """
    nodes = {n.name: n for n in graph}
    readers: dict[str, list[tuple[str, int]]] = {}
    for name, np_ in plan.nodes.items():
        for i, q in np_.inputs.items():
            if q.role == "activation":
                readers.setdefault(q.value, []).append((name, i))
    out = {}
    for value, rs in readers.items():
        ok = all(i == 0 and name in nodes and 1 in plan.nodes[name].inputs and _weight_kn(nodes[name]) is not None
                 for name, i in rs)
        if ok:
            out[value] = [name for name, _ in rs]
    return out


ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.75)
OUTLIER_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.97, 0.99, 0.995)


def smoothing_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = a_j^alpha / w_j^(1-alpha)."""
    a, w = amax.astype(np.float64), wmax.astype(np.float64)
    s = np.where((a > 0) & (w > 0), a**alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def outlier_scales(amax: np.ndarray, quantile: float) -> np.ndarray:
    """s_j = max(1, a_j / t), t = the `quantile` of the channel maxima: only outlier channels shrink."""
    t = float(np.quantile(amax, quantile))
    return np.clip(np.where(t > 0, np.maximum(1.0, amax / max(t, 1e-12)), 1.0), 1.0, 1e5).astype(np.float32)


def candidate_rules(wmax: np.ndarray) -> list:
    """Candidate rules amax -> s: SmoothQuant per alpha, then outlier-only per quantile."""
    return [lambda a, al=al: smoothing_scales(a, wmax, al) for al in ALPHAS] + [
        lambda a, q=q: outlier_scales(a, q) for q in OUTLIER_QUANTILES
    ]


def channel_weight_maxima(graph: ir.Graph, plan: QuantPlan) -> dict[str, np.ndarray]:
    """Per smoothable activation, max over its consumers' weights of |W[j, :]| per channel j (the
    w_j of SmoothQuant's rule)."""
    nodes = {n.name: n for n in graph}
    out = {}
    for value, consumers in smoothable(graph, plan).items():
        ws = [_weight_rows(nodes[c]) for c in consumers]
        if len({w.shape[0] for w in ws}) == 1:
            out[value] = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    return out


def choose_scales(graph: ir.Graph, plan: QuantPlan, amax: dict[str, np.ndarray],
                  rows: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """Per activation, the best candidate scales, or nothing when none beats plain quantization.

    The sample rows are split: candidate scales and the activation clip are fitted on the even
    rows and scored on others (`_best_rule`), so a rule that only fits the sample's own extremes (iid
    data has no outlier channels) does not win; the chosen rule is then applied to the maxima
    `amax`. The activations are searched independently, `threads` at a time (numpy and its BLAS
    release the GIL; BLAS runs one thread per search, so a search's arithmetic, hence its choice,
    does not depend on `threads`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    nodes = {n.name: n for n in graph}
    todo = [(v, cs) for v, cs in smoothable(graph, plan).items()
            if v in amax and v in rows and rows[v].shape[0] >= 4]
    search = lambda vc: _best_rule(nodes, plan, vc[1], rows[vc[0]])
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads)) as pool:
        rules = list(pool.map(search, todo) if threads > 1 else map(search, todo))
    out = {}
    for (value, consumers), rule in zip(todo, rules):
        for c in consumers:  # the search read each float weight once: return its mapped pages
            external.drop_pages(nodes[c].inputs[1].const_value)
        log.debug("smoothing %s: %s", value, "off" if rule is None else "on")
        if rule is not None:
            out[value] = rule(amax[value])
    return out


def scorer_for(nodes: dict[str, ir.Node], plan: QuantPlan, consumers: list[str], rows: np.ndarray) -> Scorer | None:
    """The `transform_search.Scorer` of an activation read by `consumers` (None when a weight's
    width is not the rows')."""
    ws = [search_columns(_weight_rows(nodes[c])) for c in consumers]
    if any(w.shape[0] != rows.shape[1] for w in ws):
        return None
    return Scorer(rows, ws, plan.nodes[consumers[0]].inputs[0].spec, [plan.nodes[c].inputs[1].spec for c in consumers],
                  [nodes[c].op_type == "Gemm" and _trans_b(nodes[c]) for c in consumers])


def _best_rule(nodes: dict[str, ir.Node], plan: QuantPlan, consumers: list[str], rows: np.ndarray) -> Callable | None:
    """The candidate rule (`candidate_rules`) with the least quantized output error (`Scorer`:
    scored on a quarter of `rows`, scales and clip fitted on the even rows); None when no rule
    beats no smoothing."""
    sc = scorer_for(nodes, plan, consumers, rows)
    if sc is None:
        return None
    error = lambda s: sc.error(sc.fit / s, sc.test / s, [w * s[:, None] for w in sc.ws])  # noqa: E731
    wmax = np.max([np.abs(w).max(axis=1) for w in sc.ws], axis=0)
    fit_amax = np.abs(sc.fit).max(axis=0)
    best, best_rule = error(np.ones(sc.fit.shape[1], np.float32)), None
    for rule in candidate_rules(wmax):
        e = error(rule(fit_amax))
        if e < best:
            best, best_rule = e, rule
    return best_rule


def _trans_b(node: ir.Node) -> bool:
    return node.attributes.get("transB") is not None and bool(node.attributes["transB"].as_int())


class SmoothQuantPass(ir.passes.InPlacePass):
    """Apply given per-channel smoothing scales {activation value: s} (see the module doc).
    `plan` names the graph the pass runs on; afterwards `analyze.plan_on` names the new one."""

    def __init__(self, plan: QuantPlan, scales: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.plan = plan
        self.scales = scales

    def __repr__(self) -> str:
        return f"SmoothQuantPass({len(self.scales)} values)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes, values = index(graph)
        changed = 0
        for value, consumers in smoothable(graph, self.plan).items():
            s = self.scales.get(value)
            x = values.get(value)
            if s is None or x is None or any(SMOOTHED_KEY in nodes[c].metadata_props for c in consumers):
                continue
            # divide x by s: inside its producers when possible, else with a Mul
            if self._fold_backward(graph, x, consumers, s) is None:
                self._insert_mul(graph, x, consumers, s, nodes)
            for c in consumers:
                node = nodes[c]
                rows = s[None, :] if node.op_type == "Gemm" and _trans_b(node) else s[:, None]
                replace_const(graph, node, 1, lambda a, rows=rows: a * rows, f"{node.inputs[1].name}_smooth_{c}")
                node.metadata_props[SMOOTHED_KEY] = value
            changed += 1
        if changed:
            drop_unused_initializers(graph, recursive=False)
        return ir.passes.PassResult(model, modified=changed > 0)

    def _insert_mul(self, graph, x: ir.Value, consumers: list[str], s: np.ndarray, nodes) -> ir.Value:
        inv = initializer(graph, f"{x.name}_smooth_inv", (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [x, inv], name=f"{x.name}_SmoothQuant", metadata_props={SMOOTHING_KEY: x.name})
        mul.outputs[0].name = f"{x.name}_smooth"
        mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
        graph.append(mul)
        for c in consumers:
            nodes[c].replace_input_with(0, mul.outputs[0])
        graph.sort()
        return mul.outputs[0]

    def _fold_backward(self, graph, x: ir.Value, consumers: list[str], s: np.ndarray) -> ir.Value | None:
        """Divide channel j of x by s_j inside its producers instead of inserting a Mul.

        Walks up while each value is used only on the way: Relu(z)/s = Relu(z/s) (s > 0),
        (y + b)/s = y/s + b/s; and stops at a producer whose per-channel constants absorb 1/s:
        LayerNormalization (gain, bias), Mul by a per-channel constant, MatMul/Gemm with constant
        weights (output columns, and Gemm's bias). All edits create new initializers; nothing is
        changed unless the whole walk succeeds.
        """
        if x.is_graph_output() or {u.node.name for u in x.uses()} != set(consumers):
            return None
        edits = _plan_fold(x, s)
        if edits is None:
            return None
        for node, idx, fn in edits:
            replace_const(graph, node, idx, fn, f"{node.inputs[idx].name}_smooth_{node.name}")
            node.metadata_props[SMOOTHING_KEY] = x.name
        return x


def _per_channel(v: ir.Value | None, k: int) -> bool:
    """v is a constant of k values along its last axis (a per-channel gain, bias or scale)."""
    if v is None or v.const_value is None:
        return False
    shape = tuple(v.const_value.shape)
    return int(np.prod(shape)) == k and shape[-1:] == (k,)


def _plan_fold(x: ir.Value, s: np.ndarray) -> list[tuple[ir.Node, int, Callable]] | None:
    """The constant edits (node, input, old -> new) that divide channel j of x by s_j (see
    `_fold_backward`), or None. Reads shapes only."""
    k = s.size
    per_channel, columns, rows = (lambda a: a / s), (lambda a: a / s[None, :]), (lambda a: a / s[:, None])
    edits: list[tuple[ir.Node, int, Callable]] = []
    v = x
    while True:
        p = v.producer()
        if p is None or p.domain != "":
            return None
        op = p.op_type
        if op == "Relu":
            v = p.inputs[0]
            if v is None or len(v.uses()) != 1 or v.is_graph_output():
                return None
            continue
        if op == "LayerNormalization":
            gains = [i for i in (1, 2) if i < len(p.inputs) and _per_channel(p.inputs[i], k)]
            if 1 not in gains:
                return None
            return edits + [(p, i, per_channel) for i in gains]
        if op in ("Mul", "Add"):
            ci = next((i for i in (0, 1) if _per_channel(p.inputs[i], k)), None)
            if ci is None:
                return None
            edits.append((p, ci, per_channel))
            if op == "Mul":
                return edits
            v = p.inputs[1 - ci]
            if v is None or v.const_value is not None or len(v.uses()) != 1 or v.is_graph_output():
                return None
            continue
        w = p.inputs[1] if op in ("MatMul", "Gemm") and len(p.inputs) > 1 else None
        if w is None or w.const_value is None:
            return None
        shape = tuple(w.const_value.shape)
        if op == "MatMul":
            return edits + [(p, 1, columns)] if len(shape) == 2 and shape[1] == k else None
        trans = _trans_b(p)
        if len(shape) != 2 or (shape[0] if trans else shape[1]) != k:
            return None
        edits.append((p, 1, rows if trans else columns))
        c = p.inputs[2] if len(p.inputs) > 2 else None
        if c is not None:
            if not _per_channel(c, k):
                return None
            edits.append((p, 2, per_channel))
        return edits


def channel_stats(values_stream, names: list[str], max_rows: int) -> tuple[dict, dict]:
    """Over a stream of {name: array}: max |x| per last-axis channel (all batches), and the first
    `max_rows` rows of each value (for scoring alphas). Memory is bounded by max_rows."""
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list] = {n: [] for n in names}
    count = dict.fromkeys(names, 0)
    for _, values in values_stream:
        for n in names:
            x = values[n].reshape(-1, values[n].shape[-1])
            a = np.abs(x).max(axis=0)
            amax[n] = a if n not in amax else np.maximum(amax[n], a)
            if count[n] < max_rows:
                rows[n].append(x[: max_rows - count[n]])
                count[n] += rows[n][-1].shape[0]
    return amax, {n: np.concatenate(r) for n, r in rows.items() if r}
