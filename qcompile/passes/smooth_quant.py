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
right before the quantizer, so onnxruntime still folds it into an integer kernel. Per-channel maxima come from a calibration pass (`channel_absmax`). The plan is
rewritten to name the smoothed activation and weights (`new_plan`); calibration runs after it. Exact in float: the float output changes only by rounding.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompile import external
from qcompile.plan import QuantPlan

log = logging.getLogger(__name__)


def _weight_rows(node: ir.Node) -> np.ndarray | None:
    """W as [K, N] (rows indexed by the activation's channel), or None if not smoothable."""
    if node.op_type == "MatMul":
        w = node.inputs[1]
        if w is None or w.const_value is None or len(w.shape) != 2:
            return None
        return w.const_value.numpy()
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].as_int():
            return None
        w = node.inputs[1]
        if w is None or w.const_value is None:
            return None
        arr = w.const_value.numpy()
        trans = attrs.get("transB") is not None and attrs["transB"].as_int()
        return arr.T if trans else arr
    return None


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
        ok = all(i == 0 and name in nodes and 1 in plan.nodes[name].inputs and _weight_rows(nodes[name]) is not None
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


def choose_scales(graph: ir.Graph, plan: QuantPlan, amax: dict[str, np.ndarray],
                  rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per activation, the best candidate scales, or nothing when none beats plain quantization.

    The sample rows are split in two: candidate scales and the activation clip are fitted on
    one half and scored on the other, so a rule that only fits the sample's own extremes (iid
    data has no outlier channels) does not win; the chosen rule is then applied to the maxima of
    the whole calibration set.
    """
    from qcompile.calibrate import Histogram, choose_clip, fake_quant, qparams_from_clip
    from qcompile.weights import quantize

    nodes = {n.name: n for n in graph}
    out = {}
    for value, consumers in smoothable(graph, plan).items():
        if value not in amax or value not in rows or rows[value].shape[0] < 4:
            continue
        fit, test = rows[value][0::2].astype(np.float32), rows[value][1::2].astype(np.float32)
        ws = [_search_columns(_weight_rows(nodes[c])) for c in consumers]
        if any(w.shape[0] != fit.shape[1] for w in ws):
            continue
        aspec = plan.nodes[consumers[0]].inputs[0].spec
        wspecs = [plan.nodes[c].inputs[1].spec for c in consumers]
        refs = [test @ w for w in ws]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        fit_amax = np.abs(fit).max(axis=0)

        def error(s: np.ndarray | None) -> float:
            s = np.ones(fit.shape[1], np.float32) if s is None else s
            h = Histogram()
            h.update(fit / s)
            sc, zp = qparams_from_clip(*choose_clip(h, aspec.format, aspec.symmetric, aspec.method), aspec.fmt, aspec.symmetric)
            xq = fake_quant(test / s, sc, zp, aspec.fmt).astype(np.float32)
            err = 0.0
            for w, ref, node, spec in zip(ws, refs, consumers, wspecs):
                gemm_t = nodes[node].op_type == "Gemm" and _trans_b(nodes[node])
                ws_ = w * s[:, None]
                q = quantize(ws_.T if gemm_t else ws_, spec).dequantize()
                err += float(np.sum((ref - xq @ (q.T if gemm_t else q)) ** 2))
            return err

        best, best_rule = error(None), None
        for rule in candidate_rules(wmax):
            e = error(rule(fit_amax))
            if e < best:
                best, best_rule = e, rule
        for c in consumers:  # the search read each float weight once: return its mapped pages
            external.drop_pages(nodes[c].inputs[1].const_value)
        log.debug("smoothing %s: %s", value, "off" if best_rule is None else "on")
        if best_rule is not None:
            out[value] = best_rule(amax[value])
    return out


SEARCH_ELEMENTS = 1 << 24  # weights larger than this are searched on a subset of their output columns


def _search_columns(w: np.ndarray) -> np.ndarray:
    """W [K, N] itself, or SEARCH_ELEMENTS // K evenly spaced columns of it when W is larger.

    A column's quantized values depend only on that column for per-output-channel and
    K-blocked weights, so the search's error on the kept columns is their exact error: the sum
    over all N columns estimated from an even sample, at a bounded cost per candidate (13
    candidates each quantize the whole searched weight). Weights up to SEARCH_ELEMENTS (16.8M,
    e.g. 4096 x 4096) are searched whole, as before.
    """
    k, n = w.shape
    if k * n <= SEARCH_ELEMENTS:
        return w
    keep = max(1, SEARCH_ELEMENTS // k)
    return np.ascontiguousarray(w[:, np.linspace(0, n - 1, keep).round().astype(np.int64)])


def _trans_b(node: ir.Node) -> bool:
    return node.attributes.get("transB") is not None and bool(node.attributes["transB"].as_int())


class SmoothQuantPass(ir.passes.InPlacePass):
    """Apply given per-channel smoothing scales {activation value: s} (see the module doc)."""

    def __init__(self, plan: QuantPlan, scales: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.plan = plan
        self.scales = scales
        self.new_plan = plan

    def __repr__(self) -> str:
        return f"SmoothQuantPass({len(self.scales)} values)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        values = {o.name: o for n in graph for o in n.outputs} | {v.name: v for v in graph.inputs}
        plan = QuantPlan(self.plan.target, {k: dataclasses.replace(v, inputs=dict(v.inputs)) for k, v in self.plan.nodes.items()},
                         self.plan.smoothing)
        changed = 0
        for value, consumers in smoothable(graph, self.plan).items():
            s = self.scales.get(value)
            x = values.get(value)
            if s is None or x is None:
                continue
            # divide x by s: inside its producers when possible, else with a Mul (the plan's
            # names are re-read from the graph below)
            if self._fold_backward(graph, x, consumers, s) is None:
                self._insert_mul(graph, x, consumers, s, nodes)
            for c in consumers:
                node = nodes[c]
                w = node.inputs[1]
                arr = w.const_value.numpy()
                new = (arr * s[None, :]) if node.op_type == "Gemm" and _trans_b(node) else (arr * s[:, None])
                nv = ir.Value(name=f"{w.name}_smooth_{c}", const_value=ir.tensor(new.astype(np.float32), name=f"{w.name}_smooth_{c}"))
                nv.dtype, nv.shape = ir.DataType.FLOAT, ir.Shape(new.shape)
                graph.register_initializer(nv)
                node.replace_input_with(1, nv)
            changed += 1
        if changed:
            # Folding may have replaced weights of other planned nodes too: re-read every name.
            for name, np_ in plan.nodes.items():
                for i, q in np_.inputs.items():
                    if name not in nodes:  # inside an If / Loop / Scan body: never smoothed
                        continue
                    current = nodes[name].inputs[i]
                    if current is not None and current.name != q.value:
                        np_.inputs[i] = dataclasses.replace(q, value=current.name)
            for name, v in list(graph.initializers.items()):
                if not v.uses() and not v.is_graph_output():
                    del graph.initializers[name]
        self.new_plan = plan
        return ir.passes.PassResult(model, modified=changed > 0)

    def _insert_mul(self, graph, x: ir.Value, consumers: list[str], s: np.ndarray, nodes) -> ir.Value:
        inv = ir.Value(name=f"{x.name}_smooth_inv", const_value=ir.tensor((1.0 / s).astype(np.float32), name=f"{x.name}_smooth_inv"))
        inv.dtype, inv.shape = ir.DataType.FLOAT, ir.Shape([s.size])
        graph.register_initializer(inv)
        mul = ir.node("Mul", [x, inv], name=f"{x.name}_SmoothQuant")
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
        for node, idx, arr in edits:
            old = node.inputs[idx]
            name = f"{old.name}_smooth_{node.name}"
            nv = ir.Value(name=name, const_value=ir.tensor(arr.astype(np.float32), name=name))
            nv.dtype, nv.shape = ir.DataType.FLOAT, ir.Shape(arr.shape)
            graph.register_initializer(nv)
            node.replace_input_with(idx, nv)
        return x


def _per_channel(v: ir.Value | None, k: int) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    a = v.const_value.numpy()
    return a if a.size == k and a.shape[-1:] == (k,) else None


def _plan_fold(x: ir.Value, s: np.ndarray) -> list[tuple[ir.Node, int, np.ndarray]] | None:
    """The constant edits that divide channel j of x by s_j (see `_fold_backward`), or None."""
    k = s.size
    edits: list[tuple[ir.Node, int, np.ndarray]] = []
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
            gains = [(i, _per_channel(p.inputs[i] if i < len(p.inputs) else None, k)) for i in (1, 2)]
            if gains[0][1] is None:
                return None
            return edits + [(p, i, g / s) for i, g in gains if g is not None]
        if op in ("Mul", "Add"):
            ci = next((i for i in (0, 1) if _per_channel(p.inputs[i], k) is not None), None)
            if ci is None:
                return None
            edits.append((p, ci, _per_channel(p.inputs[ci], k) / s))
            if op == "Mul":
                return edits
            v = p.inputs[1 - ci]
            if v is None or v.const_value is not None or len(v.uses()) != 1 or v.is_graph_output():
                return None
            continue
        if op == "MatMul" and p.inputs[1] is not None and p.inputs[1].const_value is not None:
            w = p.inputs[1].const_value.numpy()
            if w.ndim != 2 or w.shape[1] != k:
                return None
            return edits + [(p, 1, w / s[None, :])]
        if op == "Gemm" and p.inputs[1] is not None and p.inputs[1].const_value is not None:
            w = p.inputs[1].const_value.numpy()
            trans = _trans_b(p)
            if (w.shape[0] if trans else w.shape[1]) != k:
                return None
            edits.append((p, 1, w / s[:, None] if trans else w / s[None, :]))
            c = p.inputs[2] if len(p.inputs) > 2 else None
            if c is not None:
                cc = _per_channel(c, k)
                if cc is None:
                    return None
                edits.append((p, 2, cc / s))
            return edits
        return None


def channel_stats(values_stream, names: list[str], max_rows: int = 2048) -> tuple[dict, dict]:
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
