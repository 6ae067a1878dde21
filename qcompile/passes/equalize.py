"""Cross-layer equalization (CLE; Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For a chain  y = W2 * f(W1 * x + b1)  of two layers with constant weights, where W1's output
channel i is W2's input channel i and f is positively homogeneous per channel (f(x/s) = f(x)/s
for s > 0: no activation, Relu, LeakyRelu), any s > 0 gives the same function:

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i                                    (exact)

CLE picks s_i = sqrt(r1_i / r2_i), r1_i = max|W1[i, ...]| (W1's output channel i), r2_i =
max|W2[:, i, ...]| (W2's input channel i), so both become sqrt(r1_i r2_i): a per-tensor weight
quantizer then sees channels of one range (a depthwise convolution's channels differ by 100x).
A layer that is the consumer of one chain and the producer of the next gets both; the scales are
iterated over all chains until they stop changing (at most SWEEPS times), as the paper does.

Layers: Conv (output channel axis 0; as a consumer with group 1 the input channel axis is 1, a
depthwise Conv (group = channels) scales its channel i: axis 0), MatMul with a 2-D W [K, N]
(axis 1 out, 0 in), Gemm (transB: W^T stored). Between them: nothing, Relu, LeakyRelu, a bias
Add of a per-channel constant after a MatMul, or Clip(0, c) (Relu6). Clip is not homogeneous:
Clip(x/s, 0, c) != Clip(x, 0, c)/s. The DFQ paper replaces Relu6 by Relu, which changes the
function wherever an activation exceeds c; here it becomes Min(Relu(x / s), c / s) with a
per-channel bound, which is exact (the Min keeps the Clip's output name, so the plan still names
it; onnxruntime no longer fuses that Conv's output quantizer into QLinearConv, which costs speed).

Each producer is marked (node metadata `qcompile.equalized` = its consumer), so a second run
scales nothing twice. New initializers throughout; no weight is modified in place.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.graph import attr_int as _attr
from qcompile.graph import const_array as _const
from qcompile.graph import initializer, replace_const

EQUALIZED_KEY = "qcompile.equalized"  # node metadata on an equalized producer: its consumer's name
SWEEPS = 20  # rounds over all chains; stops earlier once no scale moves by more than TOLERANCE
TOLERANCE = 1e-4  # max |log s| of a round
S_RANGE = (1e-4, 1e4)  # scales are clipped to this
FLOOR = 1e-2  # channel ranges below this share of a tensor's largest count as this share (`_log_range`)
HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclasses.dataclass(frozen=True)
class Chain:
    """producer -> [bias Add] -> [activation] -> consumer, each intermediate value read once."""

    producer: str
    consumer: str
    bias_add: str | None = None  # an Add of a per-channel constant after a MatMul producer
    activation: str | None = None  # a Relu / LeakyRelu / Clip(0, c) node


def out_axis(node: ir.Node) -> int | None:
    """The axis of node's constant weight indexing its output channels, or None."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return None
    rank = len(w.const_value.shape)
    if node.op_type == "Conv" and rank >= 3:
        return 0
    if node.op_type == "MatMul" and rank == 2:
        return 1
    if node.op_type == "Gemm" and rank == 2 and not _attr(node, "transA"):
        return 0 if _attr(node, "transB") else 1
    return None


def in_axis(node: ir.Node) -> int | None:
    """The axis of node's constant weight indexing its input channels (input 0), or None."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return None
    shape = w.const_value.shape
    if node.op_type == "Conv" and len(shape) >= 3:
        group = _attr(node, "group", 1)
        if group == 1:
            return 1
        return 0 if group == shape[0] and shape[1] == 1 else None  # depthwise; other groupings are left
    if node.op_type in ("MatMul", "Gemm") and out_axis(node) is not None:
        return 1 - out_axis(node)
    return None


def _clip_bound(node: ir.Node) -> float | None:
    """c for a Clip(x, 0, c) with constant scalar bounds (opset >= 11 inputs), else None."""
    lo, hi = (_const(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
    if lo is None or hi is None or lo.size != 1 or hi.size != 1 or float(lo) != 0.0 or not float(hi) > 0:
        return None
    return float(hi)


def _sole_reader(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    return uses[0].node if len(uses) == 1 and not v.is_graph_output() else None


def chains(graph: ir.Graph) -> list[Chain]:
    """Every producer -> consumer pair CLE can scale (see the module doc), in graph order."""
    out = []
    for p in graph:
        if p.domain != "" or p.op_type not in ("Conv", "MatMul", "Gemm") or out_axis(p) is None:
            continue
        if EQUALIZED_KEY in p.metadata_props:
            continue
        width = p.inputs[1].const_value.shape[out_axis(p)]
        node, bias_add, act = _sole_reader(p.outputs[0]), None, None
        if node is not None and node.op_type == "Add" and p.op_type == "MatMul":
            b = _const(node.inputs[1]) if node.inputs[0] is p.outputs[0] else None
            if b is None or b.shape != (width,):
                continue
            bias_add, node = node.name, _sole_reader(node.outputs[0])
        if node is not None and node.domain == "" and (node.op_type in HOMOGENEOUS or
                                                       (node.op_type == "Clip" and _clip_bound(node) is not None)):
            act, node = node.name, _sole_reader(node.outputs[0])
        if node is None or node.domain != "" or in_axis(node) is None or node.inputs[0] is None:
            continue
        if node.inputs[0].producer() is None or node.inputs[0].producer().name != (act or bias_add or p.name):
            continue
        if node.inputs[1].const_value.shape[in_axis(node)] != width or node.inputs[1] is p.inputs[1]:
            continue
        bias = _const(p.inputs[2]) if p.op_type in ("Conv", "Gemm") and len(p.inputs) > 2 else None
        if bias is not None and bias.shape != (width,):  # a broadcast Gemm bias is not per channel
            continue
        out.append(Chain(p.name, node.name, bias_add, act))
    return out


def _ranges(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1).astype(np.float64)


def _log_range(r: np.ndarray) -> np.ndarray:
    """log of channel ranges floored at FLOOR x the largest: a channel (nearly) empty on the
    weights or the calibration data is not scaled up past that (an activation channel that is
    rare on the calibration samples would otherwise overflow the tensor's range on new data)."""
    return np.log(np.maximum(r, FLOOR * max(float(r.max(initial=0.0)), 1e-30)))


def _along(s: np.ndarray, rank: int, axis: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = s.size
    return s.reshape(shape)


def channel_axis(consumer: ir.Node) -> int:
    """The channel axis of the activation `consumer` reads: 1 for a Conv (N, C, ...), else the last."""
    return 1 if consumer.op_type == "Conv" else -1


def equalization_scales(graph: ir.Graph, found: list[Chain], act_max: dict[str, np.ndarray] | None = None,
                        absorbed: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """Producer name -> s (float32, one per channel): the product of every sweep's s_i, computed on
    copies of the weights and activation maxima (the graph is not changed).

    Each sweep's s_i balances, in log space, the channel ranges of every tensor whose quantizer
    sees them: log s_i = mean(log r1_i [W1], log a_i [the activation's channel maxima, when
    given], -log r2_i [W2]), leaving out a W2 whose quantizer absorbs s_i exactly (a scale per
    channel along the scaled axis: a depthwise W2 per channel; `absorbed` names such nodes). For
    W1 and W2 alone this is DFQ's s_i = sqrt(r1_i / r2_i). A chain whose W1 is absorbed (per
    output channel) keeps s = 1: what is left to balance is the activation against W2, which is
    SmoothQuant's problem, and scaling the activation channels by their calibration maxima loses
    on new data (EfficientNet-Lite0 int8: 21.9 -> -10.7 dB; a channel rare on the calibration
    samples is scaled up and clips)."""
    nodes = {n.name: n for n in graph}
    w = {}
    for c in found:
        for name in (c.producer, c.consumer):
            w.setdefault(name, nodes[name].inputs[1].const_value.numpy().astype(np.float64))
    acts = {c.producer: np.asarray(act_max[c.consumer], np.float64) for c in found
            if act_max is not None and c.consumer in act_max}
    total = {c.producer: np.ones(w[c.producer].shape[out_axis(nodes[c.producer])]) for c in found}
    for _ in range(SWEEPS):
        moved = 0.0
        for c in found:
            pa, ca = out_axis(nodes[c.producer]), in_axis(nodes[c.consumer])
            if c.producer in absorbed:
                continue
            ranges = ([] if c.consumer in absorbed else [(-1, _ranges(w[c.consumer], ca))]) + \
                     [(1, _ranges(w[c.producer], pa))] + ([(1, acts[c.producer])] if c.producer in acts else [])
            log_s = np.mean([sign * _log_range(r) for sign, r in ranges], axis=0)
            live = np.all([r > 0 for _, r in ranges], axis=0)  # a dead channel keeps s = 1
            s = np.where(live, np.clip(np.exp(log_s), *S_RANGE), 1.0)
            w[c.producer] = w[c.producer] / _along(s, w[c.producer].ndim, pa)
            w[c.consumer] = w[c.consumer] * _along(s, w[c.consumer].ndim, ca)
            if c.producer in acts:
                acts[c.producer] = acts[c.producer] / s
            total[c.producer] *= s
            moved = max(moved, float(np.abs(np.log(s)).max(initial=0.0)))
        if moved < TOLERANCE:
            break
    return {k: v.astype(np.float32) for k, v in total.items()}


class CrossLayerEqualizationPass(ir.passes.InPlacePass):
    """Apply given scales {producer name: s} to the chains `chains` finds (see the module doc)."""

    def __init__(self, scales: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.scales = scales

    def __repr__(self) -> str:
        return f"CrossLayerEqualizationPass({len(self.scales)} chains)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        changed = 0
        for c in chains(graph):
            s = self.scales.get(c.producer)
            if s is None:
                continue
            s = np.asarray(s, dtype=np.float64)
            p, q = nodes[c.producer], nodes[c.consumer]
            pa, ca = out_axis(p), in_axis(q)
            rank_p, rank_q = len(p.inputs[1].const_value.shape), len(q.inputs[1].const_value.shape)
            replace_const(graph, p, 1, lambda a, d=_along(s, rank_p, pa): (a / d).astype(a.dtype), f"{p.inputs[1].name}_cle_{p.name}")
            node, i = (nodes[c.bias_add], 1) if c.bias_add else (p, 2)
            if len(node.inputs) > i and _const(node.inputs[i]) is not None:
                replace_const(graph, node, i, lambda a, s=s: (a / s).astype(a.dtype), f"{node.inputs[i].name}_cle_{node.name}")
            if c.activation and nodes[c.activation].op_type == "Clip":
                self._bound(graph, nodes[c.activation], s, p)
            replace_const(graph, q, 1, lambda a, d=_along(s, rank_q, ca): (a * d).astype(a.dtype), f"{q.inputs[1].name}_cle_{q.name}")
            p.metadata_props[EQUALIZED_KEY] = q.name
            changed += 1
        return ir.passes.PassResult(model, modified=changed > 0)

    @staticmethod
    def _bound(graph: ir.Graph, clip: ir.Node, s: np.ndarray, producer: ir.Node) -> None:
        """Clip(x, 0, c) -> Min(Relu(x), c / s) over the channel axis (1 for Conv's NCHW, last for MatMul)."""
        x, out = clip.inputs[0], clip.outputs[0]
        bound = (_clip_bound(clip) / s).astype(np.float32)
        if producer.op_type == "Conv":
            bound = bound.reshape(-1, *[1] * (len(producer.inputs[1].const_value.shape) - 2))
        relu = ir.node("Relu", [x], name=f"{clip.name}_cle_relu")
        relu.outputs[0].name, relu.outputs[0].dtype, relu.outputs[0].shape = f"{x.name}_cle_relu", x.dtype, x.shape
        c = initializer(graph, f"{clip.name}_cle_bound", bound)
        mn = ir.node("Min", [relu.outputs[0], c], name=f"{clip.name}_cle_min")
        graph.insert_before(clip, [relu, mn])
        name, dtype, shape = out.name, out.dtype, out.shape
        ir.convenience.replace_all_uses_with(out, mn.outputs[0])
        graph.remove(clip, safe=True)
        mn.outputs[0].name, mn.outputs[0].dtype, mn.outputs[0].shape = name, dtype, shape
