"""Analysis: which nodes are quantizable, their weights and axes, and the default plan.

A node is quantized when its op type is quantizable (Conv, ConvTranspose, MatMul, Gemm), it is not
excluded by op type or name, and it has at least one float input. Constant float inputs are
*weights* (quantized offline, per channel or per block); the others are *activations* (quantized
per tensor with a calibrated range). Numerically fragile ops (LayerNormalization and decomposed
norms, Softmax, Sqrt/Div chains) are never quantizable, so they stay in float: Q/DQ pairs are only
inserted on the inputs of quantized nodes and propagated through range-preserving shape ops.
"""
from __future__ import annotations

import dataclasses

import fnmatch
import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.formats import BlockFormat, IntFormat, parse_format
from qcompile.plan import InputQuant, NodePlan, PairBound, PerBlock, PerChannel, PerTensor, QuantPlan, QuantSpec
from qcompile.targets import TARGETS, Target

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # compute with weights that no target quantizes (listed as kept in float)
# Ops whose output values are a subset (or rearrangement, or convex combination) of their data
# input's values: quantizing input and output with the same scale lets onnxruntime run them on
# integers and drop the Q/DQ pair in between.
SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Concat", "Identity")
FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class PlanOptions:
    """What to quantize. Patterns are fnmatch globs on node names."""

    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    keep_last: bool = False  # keep the final classifier (last quantizable node before an output) in float
    restored: tuple[str, ...] = ()  # exact node names kept in float to meet the gate (`qcompile.restore`)
    cpu: str = "portable"  # the deployment CPU class (`qcompile.cpu.Cpu`, resolved): sets the int8 pair bounds


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def weight_axes(node: ir.Node, index: int) -> tuple[int, int] | None:
    """(channel axis, reduction axis) of the weight at input `index`, or None if it has none.

    MatMul B [.., K, N]: channel N, reduce K.   Gemm B: [K, N] (or [N, K] with transB).
    Conv W [Cout, Cin/g, k..]: channel 0, reduce 1.   ConvTranspose W [Cin, Cout/g, k..]: 1, 0.
    """
    shape = node.inputs[index].shape
    rank = len(shape) if shape is not None else 2 if node.op_type == "Gemm" else 0  # Gemm operands are 2-D by definition
    if rank < 2:
        return None
    op = node.op_type
    if op == "MatMul" and index == 1:
        return rank - 1, rank - 2
    if op == "MatMul" and index == 0:
        return rank - 2, rank - 1
    if op == "Gemm" and index in (0, 1):
        trans = node.attributes.get("transA" if index == 0 else "transB")
        transposed = bool(trans.as_int()) if trans is not None else False
        if index == 0:
            return (1, 0) if transposed else (0, 1)
        return (0, 1) if transposed else (1, 0)
    if op == "Conv" and index == 1:
        return 0, 1
    if op == "ConvTranspose" and index == 1:
        return 1, 0
    return None


def data_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs of a shape op that carry data (not shapes, axes, scales or roi)."""
    if node.op_type == "Concat":
        return [v for v in node.inputs if v is not None]
    return [node.inputs[0]] if node.inputs and node.inputs[0] is not None else []


def tie_heads(value: ir.Value) -> tuple[list[ir.Node], list[ir.Value]]:
    """Walk up from an activation through shape ops.

    Returns the shape-op nodes crossed and the head values the walk stops at (produced by a
    non-shape op, a graph input, or a constant). Every value on the way takes the same scale, so
    calibration collects the heads and insertion places a Q/DQ before each shape op.
    """
    nodes: list[ir.Node] = []
    heads: list[ir.Value] = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        ins = data_inputs(p) if p is not None and p.op_type in SHAPE_OPS and p.domain == "" else []
        if ins and all(is_float(i) and not is_constant(i) for i in ins):
            nodes.append(p)
            stack.extend(ins)
        else:
            heads.append(v)
    return nodes, heads


def _excluded(node: ir.Node, options: PlanOptions) -> bool:
    if node.op_type in options.exclude_ops:
        return True
    return any(fnmatch.fnmatchcase(node.name or "", pat) for pat in options.exclude_nodes)


def _last_quantizable(graph: ir.Graph, candidates: list[ir.Node]) -> ir.Node | None:
    """The candidate from which a graph output is reachable without crossing another candidate."""
    cands = {id(n) for n in candidates}
    for node in reversed(candidates):
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            for out in n.outputs:
                if out.is_graph_output():
                    return node
                for use in out.uses():
                    c = use.node
                    if id(c) not in seen and id(c) not in cands:
                        seen.add(id(c))
                        stack.append(c)
    return None


def screen(graph: ir.Graph, options: PlanOptions, ops: tuple[str, ...] = QUANTIZABLE_OPS
           ) -> tuple[list[ir.Node], dict[str, tuple[str, str]]]:
    """Quantizable nodes (of op types `ops`) of the graph and of every If / Loop / Scan body in it,
    in graph order, honouring exclusions; and node name -> (op type, reason) for the compute nodes
    (QUANTIZABLE_OPS, RECURRENT_OPS) left in float."""
    out, skipped = [], {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain != "" or node.op_type not in QUANTIZABLE_OPS + RECURRENT_OPS:
            continue
        reason = None
        if node.op_type in RECURRENT_OPS:
            reason = f"no quantized {node.op_type} in onnxruntime's QDQ kernels"
        elif node.op_type not in ops:
            reason = f"the target quantizes {'/'.join(ops)} only"
        elif _excluded(node, options):
            reason = "excluded (--exclude-op / --exclude-node)"
        elif node.name in options.restored:
            reason = "restored to float: among the most sensitive layers (report: restored)"
        elif not any(is_float(v) for v in node.inputs[:2]):
            reason = "no float32 input"
        if reason is None:
            out.append(node)
        else:
            log.debug("skip %s: %s", node.name, reason)
            skipped[node.name] = (node.op_type, reason)
    if options.keep_last and out:
        last = _last_quantizable(graph, out)
        if last is not None:
            log.debug("skip %s: final classifier kept in float (keep_last)", last.name)
            skipped[last.name] = (last.op_type, "final layer kept in float (--keep-last)")
            out = [n for n in out if n is not last]
    return out, skipped


def candidate_nodes(graph: ir.Graph, options: PlanOptions, ops: tuple[str, ...] = QUANTIZABLE_OPS) -> list[ir.Node]:
    """The quantizable nodes of `screen`."""
    return screen(graph, options, ops)[0]


def has_compute(model: ir.Model) -> bool:
    """Whether any graph, If / Loop / Scan body or model-local function has a QUANTIZABLE_OPS or
    RECURRENT_OPS node: without one there is nothing any target quantizes (no pass creates them),
    so the compile refuses before it runs a pass."""
    ops = QUANTIZABLE_OPS + RECURRENT_OPS
    graphs = [model.graph, *model.functions.values()]
    return any(n.domain in ("", "ai.onnx") and n.op_type in ops
               for g in graphs for n in ir.traversal.RecursiveGraphIterator(g))


def kept_in_float(model: ir.Model, target: Target, options: PlanOptions, plan: QuantPlan) -> dict[str, tuple[str, str]]:
    """Compute node -> (op type, reason) for every Conv/ConvTranspose/MatMul/Gemm/LSTM/GRU/RNN the
    plan leaves in float (the report's layer table lists them)."""
    candidates, skipped = screen(model.graph, options, target.ops)
    left = "no constant weight (the target is weight-only)" if target.activations is None else "no input the target quantizes"
    skipped.update({n.name: (n.op_type, left) for n in candidates if n.name not in plan.nodes})
    return skipped


def nothing_to_quantize(target: Target, kept: dict[str, tuple[str, str]]) -> str:
    """The refusal when the plan is empty, naming why each kind of node stays float and, for op
    types the target does not handle, the targets that quantize them."""
    if not kept:
        return (f"nothing to quantize for target {target.name}: the model has no "
                f"{', '.join(QUANTIZABLE_OPS[:-1])} or {QUANTIZABLE_OPS[-1]} node")
    groups: dict[tuple[str, str], int] = {}
    for op, reason in kept.values():
        groups[(op, reason)] = groups.get((op, reason), 0) + 1
    parts = []
    for (op, reason), count in sorted(groups.items(), key=lambda kv: -kv[1]):
        others = [t.name for t in TARGETS.values() if op in t.ops and t.quantize] if op in QUANTIZABLE_OPS and op not in target.ops else []
        hint = f" ({', '.join(others[:4])} quantize {op})" if others else ""
        parts.append(f"{count} {op}: {reason}{hint}")
    return f"nothing to quantize for target {target.name}: " + "; ".join(parts)


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input and one output channel per group (onnxruntime's depthwise kernels)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    attr = node.attributes.get("group")
    group = attr.as_int() if attr is not None else 1
    return (node.op_type == "Conv" and group > 1 and w is not None and w.shape is not None
            and w.shape[1] == 1 and w.shape[0] == group)


def pair_axis(node: ir.Node, index: int) -> int | None | bool:
    """The reduction axis whose pairs the integer kernel adds for weight input `index` (see
    `plan.PairBound`): K of a 2-D MatMul/Gemm weight, axis 1 of a Conv weight; None when the
    pairing is not known (ConvTranspose, a constant first operand, batched weights); False when the
    kernel has no pairs (depthwise Conv)."""
    if node.op_type == "Conv" and index == 1:
        return False if is_depthwise(node) else 1
    axes = weight_axes(node, index)
    if index == 1 and node.op_type in ("MatMul", "Gemm") and len(node.inputs[1].shape) == 2:
        return axes[1]
    return None


def _pair_bound(node: ir.Node, index: int, target: Target, cpu: str, caps) -> PairBound | None:
    if caps is None or target.activations is None:
        return None
    wfmt, afmt = parse_format(target.weights.format), parse_format(target.activations.format)
    if not (isinstance(wfmt, IntFormat) and isinstance(afmt, IntFormat)):
        return None
    bound = caps.pair_bound(cpu, wfmt.onnx_dtype, afmt)
    axis = pair_axis(node, index)
    return None if bound is None or axis is False else PairBound(axis, bound)


def _weight_spec(node: ir.Node, index: int, target: Target, cpu: str = "portable", caps=None) -> QuantSpec | None:
    pol = target.weights
    axes = weight_axes(node, index)
    if axes is None:
        log.debug("skip weight %d of %s: no channel axis", index, node.name)
        return None
    channel, reduce = axes
    pairs = _pair_bound(node, index, target, cpu, caps)
    fmt = parse_format(pol.format)
    if isinstance(fmt, BlockFormat):  # intrinsic blocks along the reduction axis, for every op
        return QuantSpec(pol.format, PerBlock(reduce, fmt.block_size), True, pol.method)
    if pol.granularity == "block" and node.op_type in ("MatMul", "Gemm"):
        k = node.inputs[index].shape[reduce]
        if isinstance(k, int) and k >= pol.block_size:
            return QuantSpec(pol.format, PerBlock(reduce, pol.block_size), True, pol.method)
    if pol.granularity == "tensor":
        return QuantSpec(pol.format, PerTensor(), True, pol.method, pairs=pairs)
    return QuantSpec(pol.format, PerChannel(channel), True, pol.method, pairs=pairs)


def _activation_spec(target: Target, node: ir.Node | None = None, index: int = 0) -> QuantSpec:
    """Per tensor; a block format is blocked along the reduction axis of the consumer (`node` input
    `index`): K of a MatMul/Gemm operand (-1 of MatMul's A, -2 of its B), the channel axis 1 of a Conv input."""
    pol = target.activations
    fmt = parse_format(pol.format)
    if isinstance(fmt, BlockFormat) and node is not None:
        if node.op_type == "MatMul":
            axis = -1 if index == 0 else -2
        elif node.op_type == "Gemm":
            axis = weight_axes(node, index)[1]
        else:
            axis = 1
        return QuantSpec(pol.format, PerBlock(axis, fmt.block_size), True, "minmax")
    return QuantSpec(pol.format, PerTensor(), pol.symmetric, pol.method)


def _conv_output(node: ir.Node) -> ir.Value | None:
    """The value to quantize after a Conv: its output, or the output of a sole Relu/Clip consumer."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type in FUSED_ACTIVATIONS and not out.is_graph_output():
        out = uses[0].node.outputs[0]
    return None if out.is_graph_output() else out


def make_plan(model: ir.Model, target: Target, options: PlanOptions = PlanOptions(), caps=None) -> QuantPlan:
    """The default plan of `target` for `model` (activation clips are filled by calibration).

    `caps` (the backend's capability table) adds the integer-kernel pair bounds of `options.cpu` to
    int8 weights; without it weights are unconstrained."""
    nodes: dict[str, NodePlan] = {}
    for node in candidate_nodes(model.graph, options, target.ops):
        inputs: dict[int, InputQuant] = {}
        for i, v in enumerate(node.inputs[:2]):
            if not is_float(v):
                continue
            if is_constant(v):
                spec = _weight_spec(node, i, target, options.cpu, caps)
                if spec is not None:
                    inputs[i] = InputQuant(v.name, "weight", spec)
            elif target.activations is not None:
                inputs[i] = InputQuant(v.name, "activation", _activation_spec(target, node, i))
        if not inputs:
            continue
        acts = [q for q in inputs.values() if q.role == "activation"]
        output = None
        if node.op_type == "Conv" and target.quantize_conv_output and acts:
            out = _conv_output(node)
            if out is not None and is_float(out):
                output = InputQuant(out.name, "activation", _activation_spec(target))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        has_weight = any(q.role == "weight" for q in inputs.values())
        quant_bias = bool(target.quantize_bias and node.op_type in ("Conv", "Gemm") and acts and has_weight
                          and is_constant(bias))
        nodes[node.name] = NodePlan(node.op_type, inputs, output, quant_bias)
    return QuantPlan(target.name, nodes)


@dataclass
class ModelSummary:
    """What `qcompile inspect` prints."""

    ops: dict[str, int] = field(default_factory=dict)
    params: int = 0
    param_bytes: int = 0
    quantizable: list[str] = field(default_factory=list)
    opset: int = 0
    ir_version: int = 0


def summarize(model: ir.Model, options: PlanOptions = PlanOptions()) -> ModelSummary:
    s = ModelSummary(opset=model.opset_imports.get("", 0), ir_version=model.ir_version)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        s.ops[key] = s.ops.get(key, 0) + 1
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            s.params += v.const_value.size
            s.param_bytes += v.const_value.nbytes
    s.quantizable = [n.name for n in candidate_nodes(model.graph, options)]
    return s


def plan_on(graph: ir.Graph, plan: QuantPlan) -> QuantPlan:
    """`plan` naming what its nodes of the main graph read now: after a rewrite replaced their
    inputs (SmoothQuantPass: a smoothed activation, new weights), each input quantizer takes the
    current value's name. Nodes inside If / Loop / Scan bodies keep theirs (never rewritten)."""
    nodes = {n.name: n for n in graph}
    renamed = {}
    for name, np_ in plan.nodes.items():
        node = nodes.get(name)
        inputs = dict(np_.inputs)
        if node is not None:
            for i, q in np_.inputs.items():
                current = node.inputs[i] if i < len(node.inputs) else None
                if current is not None and current.name != q.value:
                    inputs[i] = dataclasses.replace(q, value=current.name)
        renamed[name] = dataclasses.replace(np_, inputs=inputs)
    return dataclasses.replace(plan, nodes=renamed)
