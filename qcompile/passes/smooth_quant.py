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

When x comes from LayerNormalization (or a Mul by a constant per-channel gain, as in decomposed
RMSNorm) and every consumer of x is smoothed, 1/s is folded into that gain (and bias) instead of
inserting a Mul. Per-channel maxima come from a calibration pass (`channel_absmax`). The plan is
rewritten to name the smoothed activation and weights, with the activation's clip cleared so it
is calibrated after smoothing. Exact in float: the float output changes only by rounding.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompile.plan import InputQuant, QuantPlan

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
OUTLIER_QUANTILES = (0.5, 0.9, 0.97, 0.99)


def smoothing_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = a_j^alpha / w_j^(1-alpha)."""
    a, w = amax.astype(np.float64), wmax.astype(np.float64)
    s = np.where((a > 0) & (w > 0), a**alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def outlier_scales(amax: np.ndarray, quantile: float) -> np.ndarray:
    """s_j = max(1, a_j / t), t = the `quantile` of the channel maxima: only outlier channels shrink."""
    t = float(np.quantile(amax, quantile))
    return np.clip(np.where(t > 0, np.maximum(1.0, amax / max(t, 1e-12)), 1.0), 1.0, 1e5).astype(np.float32)


def candidate_scales(amax: np.ndarray, wmax: np.ndarray) -> list[np.ndarray]:
    return [smoothing_scales(amax, wmax, a) for a in ALPHAS] + [outlier_scales(amax, q) for q in OUTLIER_QUANTILES]


def choose_scales(graph: ir.Graph, plan: QuantPlan, amax: dict[str, np.ndarray],
                  rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per activation, the best candidate scales, or nothing when none beats plain quantization."""
    from qcompile.calibrate import Histogram, choose_clip, fake_quant, qparams_from_clip
    from qcompile.weights import quantize_weight

    nodes = {n.name: n for n in graph}
    out = {}
    for value, consumers in smoothable(graph, plan).items():
        if value not in amax or value not in rows:
            continue
        x = rows[value].astype(np.float32)
        ws = [_weight_rows(nodes[c]) for c in consumers]
        if any(w.shape[0] != x.shape[1] for w in ws):
            continue
        aspec = plan.nodes[consumers[0]].inputs[0].spec
        wspecs = [plan.nodes[c].inputs[1].spec for c in consumers]
        refs = [x @ w for w in ws]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)

        def error(s: np.ndarray | None) -> float:
            xs = x if s is None else x / s
            h = Histogram()
            h.update(xs)
            sc, zp = qparams_from_clip(*choose_clip(h, aspec.format, aspec.symmetric, aspec.method), aspec.fmt, aspec.symmetric)
            xq = fake_quant(xs, sc, zp, aspec.fmt).astype(np.float32)
            err = 0.0
            for w, ref, node, spec in zip(ws, refs, consumers, wspecs):
                ws_ = w if s is None else w * s[:, None]
                gemm_t = nodes[node].op_type == "Gemm" and _trans_b(nodes[node])
                q = quantize_weight(ws_.T if gemm_t else ws_, spec).dequantize()
                err += float(np.sum((ref - xq @ (q.T if gemm_t else q)) ** 2))
            return err

        best, best_s = error(None), None
        for s in candidate_scales(amax[value], wmax):
            e = error(s)
            if e < best:
                best, best_s = e, s
        log.debug("smoothing %s: %s", value, "off" if best_s is None else "on")
        if best_s is not None:
            out[value] = best_s
    return out


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
        plan = QuantPlan(self.plan.target, {k: dataclasses.replace(v, inputs=dict(v.inputs)) for k, v in self.plan.nodes.items()})
        changed = 0
        for value, consumers in smoothable(graph, self.plan).items():
            s = self.scales.get(value)
            x = values.get(value)
            if s is None or x is None:
                continue
            smoothed = self._fold_into_gain(graph, x, consumers, s) or self._insert_mul(graph, x, consumers, s, nodes)
            for c in consumers:
                node = nodes[c]
                w = node.inputs[1]
                arr = w.const_value.numpy()
                new = (arr * s[None, :]) if node.op_type == "Gemm" and _trans_b(node) else (arr * s[:, None])
                nv = ir.Value(name=f"{w.name}_smooth_{c}", const_value=ir.tensor(new.astype(np.float32), name=f"{w.name}_smooth_{c}"))
                nv.dtype, nv.shape = ir.DataType.FLOAT, ir.Shape(new.shape)
                graph.register_initializer(nv)
                node.replace_input_with(1, nv)
                p = plan.nodes[c]
                p.inputs[0] = InputQuant(smoothed.name, "activation", dataclasses.replace(p.inputs[0].spec, clip=None))
                p.inputs[1] = InputQuant(nv.name, "weight", p.inputs[1].spec)
            changed += 1
        if changed:
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

    def _fold_into_gain(self, graph, x: ir.Value, consumers: list[str], s: np.ndarray) -> ir.Value | None:
        """Scale the gain (and bias) of a LayerNormalization / per-channel Mul producing x."""
        p = x.producer()
        if p is None or x.is_graph_output() or {u.node.name for u in x.uses()} != set(consumers):
            return None
        if p.op_type == "LayerNormalization":
            idx = [1, 2]
        elif p.op_type == "Mul":
            idx = [i for i in (0, 1) if p.inputs[i] is not None and p.inputs[i].const_value is not None][:1]
        else:
            return None
        params = [p.inputs[i] for i in idx if i < len(p.inputs) and p.inputs[i] is not None]
        if not params or any(v.const_value is None or v.const_value.numpy().shape[-1:] != s.shape for v in params):
            return None
        for i in idx:
            v = p.inputs[i] if i < len(p.inputs) else None
            if v is None:
                continue
            new = (v.const_value.numpy() / s).astype(np.float32)
            nv = ir.Value(name=f"{v.name}_smooth", const_value=ir.tensor(new, name=f"{v.name}_smooth"))
            nv.dtype, nv.shape = ir.DataType.FLOAT, ir.Shape(new.shape)
            graph.register_initializer(nv)
            p.replace_input_with(i, nv)
        return x


def channel_stats(values_stream, names: list[str], max_rows: int = 1024) -> tuple[dict, dict]:
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
