"""Pre-norm residual streams, found from the graph's structure (no list of architectures).

A stream is the chain of values

    h_0     = sum of Gather(E_i, ids_i)          (token embeddings, learned positions: constant tables)
    h_{l+1} = h_l + x_l W_l (+ b_l)              (writers: linear layers, `Linear`)

moved between shapes only by Reshapes that keep the last axis (rows stay rows), and read only
by residual Adds, Shape, and norms over the last axis (`Norm`: RMSNorm, decomposed or the opset-23
op, or LayerNormalization) whose outputs feed only linear layers with constant weights (the
readers). On such a stream an orthogonal R on the last axis commutes with everything but the
linear layers, which absorb it (`passes.residual_rotate`); a LayerNormalization must first
become an RMSNorm (`passes.layernorm_to_rmsnorm`). `find_streams` gives the reason for every
stream it refuses (a post-LN encoder: its norm output is also the next residual).

`Linear` and its folds are the one place that knows how a MatMul / Gemm stores its weight and
bias: `fold_out` applies a map along the output axis (W and b), `fold_in` along the input axis,
`add_bias` adds a constant to the output (a new Add after a bias-free MatMul).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile.graph import attr_int, initializer, replace_const
from qcompile.graph import const_array as _const


SHAPE_READERS = ("Shape", "Size")  # read a stream value's shape only, which no rotation changes


@dataclasses.dataclass
class Linear:
    """y = x W (+ b): a MatMul or a Gemm (no transA, alpha = beta = 1) with a constant 2-D W,
    stored [K, N] or, with transB, [N, K]; b is Gemm's C or the constant [N] Add right after a
    MatMul (`bias_add`)."""

    node: ir.Node
    bias_add: ir.Node | None = None

    @property
    def trans(self) -> bool:
        return self.node.op_type == "Gemm" and bool(attr_int(self.node, "transB"))

    @property
    def out(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def n_in(self) -> int:
        return _const(self.node.inputs[1]).shape[1 if self.trans else 0]

    @property
    def n_out(self) -> int:
        return _const(self.node.inputs[1]).shape[0 if self.trans else 1]

    def bias_slot(self) -> tuple[ir.Node, int] | None:
        if self.node.op_type == "Gemm":
            return (self.node, 2) if len(self.node.inputs) > 2 and self.node.inputs[2] is not None else None
        if self.bias_add is not None:
            return self.bias_add, 0 if self.bias_add.inputs[1] is self.node.outputs[0] else 1
        return None


def as_linear(node: ir.Node | None, x: ir.Value | None = None) -> Linear | None:
    """The `Linear` of `node` (reading x as input 0 when x is given), its bias Add included."""
    if node is None or node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = _const(node.inputs[1])
    if w is None or w.ndim != 2 or (x is not None and node.inputs[0] is not x):
        return None
    if node.op_type == "Gemm":
        if attr_int(node, "transA") or any(k in node.attributes and node.attributes[k].as_float() != 1.0 for k in ("alpha", "beta")):
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        lin = Linear(node)
        return lin if c is None or (_const(c) is not None and _const(c).shape[-1:] in ((lin.n_out,), (1,))) else None
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) == 1 and not y.is_graph_output() and uses[0].node.op_type == "Add" and uses[0].node.domain == "":
        add = uses[0].node
        b = _const(add.inputs[1 - uses[0].idx])
        if b is not None and b.shape == (w.shape[1],):
            return Linear(node, add)
    return Linear(node)


def fold_const(graph: ir.Graph, node: ir.Node, idx: int, fn, tag: str) -> None:
    """Input idx of node := fn(it), computed in float64 and stored in its dtype, named by tag and node."""
    replace_const(graph, node, idx, lambda a: fn(a.astype(np.float64)).astype(a.dtype), f"{node.inputs[idx].name}_{tag}_{node.name}")


def fold_out(graph: ir.Graph, lin: Linear, fn: Callable[[np.ndarray], np.ndarray], tag: str) -> None:
    """y := fn(y) for a map fn linear along the last axis: W := fn(W) (fn(W^T)^T stored
    transposed), b := fn(b)."""
    fold_const(graph, lin.node, 1, (lambda a: fn(a.T).T) if lin.trans else fn, tag)
    if (slot := lin.bias_slot()) is not None:
        fold_const(graph, *slot, fn, tag)


def fold_in(graph: ir.Graph, lin: Linear, fn: Callable[[np.ndarray], np.ndarray], tag: str) -> None:
    """W := the map fn applied along W's input axis (W [K, N] takes fn(W^T)^T): the layer then
    reads x' with x' fn^T(W) = x W."""
    fold_const(graph, lin.node, 1, fn if lin.trans else (lambda a: fn(a.T).T), tag)


def weight_kn(lin: Linear) -> np.ndarray:
    """W as [K, N] (float64)."""
    w = _const(lin.node.inputs[1]).astype(np.float64)
    return w.T if lin.trans else w


def add_bias(graph: ir.Graph, lin: Linear, delta: np.ndarray, tag: str) -> None:
    """y := y + delta [N]: into the existing bias, else a new Gemm C or a new Add after the MatMul
    (which takes over the MatMul's output name, a graph output included)."""
    slot = lin.bias_slot()
    if slot is not None:
        fold_const(graph, *slot, lambda b: b + delta.reshape(b.shape[-1:]), tag)
        return
    dtype = _const(lin.node.inputs[1]).dtype
    c = initializer(graph, f"{lin.node.name}_{tag}_bias", delta.astype(dtype))
    if lin.node.op_type == "Gemm":
        lin.node.resize_inputs(3)
        lin.node.replace_input_with(2, c)
        return
    y = lin.node.outputs[0]
    add = ir.node("Add", [y, c], name=f"{lin.node.name}_{tag}_bias")
    add.outputs[0].type, add.outputs[0].shape = y.type, y.shape
    ir.convenience.replace_all_uses_with(y, add.outputs[0], replace_graph_outputs=True)
    add.replace_input_with(0, y)
    graph.insert_after(lin.node, add)
    name, y.name = y.name, f"{y.name}_{tag}_nobias"
    add.outputs[0].name = name
    lin.bias_add = add


@dataclasses.dataclass
class Norm:
    kind: str  # "rms" or "layer"
    nodes: list[ir.Node]  # the pattern's nodes
    normed: ir.Value  # h / rms(h) (LayerNormalization: its output)
    gain: ir.Value | None  # g (a constant [D]); None when there is none
    gain_node: ir.Node | None  # the Mul by g (decomposed), the RMSNormalization / LayerNormalization op
    bias: ir.Value | None  # beta (a constant [D]): LayerNormalization's, or an Add right after the gain
    bias_node: ir.Node | None
    out: ir.Value  # what the readers read
    readers: list[Linear]
    source: ir.Value  # the stream value it normalizes


@dataclasses.dataclass
class Stream:
    width: int
    gather: ir.Node  # the first embedding Gather: the stream's key in plans and reports
    sources: list[ir.Node]  # every Gather of a constant table summed into h_0
    writers: list[Linear]
    norms: list[Norm]
    reshapes: list[ir.Node]
    root: ir.Value  # h_0

    @property
    def kinds(self) -> set[str]:
        return {n.kind for n in self.norms}


def _scalar(v: ir.Value | None, value: float | None = None) -> bool:
    a = _const(v)
    return a is not None and a.size == 1 and (value is None or float(a.reshape(())) == value)


def _last_axis(node: ir.Node, rank: int | None, default: int | None = None) -> bool:
    a = node.attributes.get("axes") or node.attributes.get("axis")
    axes = list(a.as_ints()) if a is not None and a.type == ir.AttributeType.INTS else (
        [a.as_int()] if a is not None else None)
    if axes is None and len(node.inputs) > 1 and node.op_type == "ReduceMean":
        c = _const(node.inputs[1])
        axes = None if c is None else [int(x) for x in c.ravel()]
    if axes is None and default is not None:
        axes = [default]
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _vector(v: ir.Value | None, width: int) -> bool:
    a = _const(v)
    return a is not None and a.shape == (width,)


def _after_gain(norm: Norm, width: int) -> Norm:
    """Extend a decomposed RMSNorm by the Mul of its gain and the Add of a bias, when they follow."""
    after = [u.node for u in norm.out.uses()]
    if len(after) == 1 and after[0].op_type == "Mul" and not norm.out.is_graph_output() and norm.gain is None:
        g = next((x for x in after[0].inputs if x is not norm.out), None)
        if _vector(g, width):
            norm.gain_node, norm.gain, norm.out = after[0], g, after[0].outputs[0]
            after = [u.node for u in norm.out.uses()]
    if len(after) == 1 and after[0].op_type == "Add" and not norm.out.is_graph_output() and norm.bias is None:
        b = next((x for x in after[0].inputs if x is not norm.out), None)
        if _vector(b, width):
            norm.bias_node, norm.bias, norm.out = after[0], b, after[0].outputs[0]
    return norm


def _match_norm(h: ir.Value, width: int, uses: list[ir.Node]) -> tuple[Norm | None, str]:
    """The norm over the last axis reading stream value h through `uses` (h's other readers are
    residual Adds and Reshapes), or (None, why not)."""
    rank = len(h.shape) if h.shape is not None else None
    for op, kind in (("RMSNormalization", "rms"), ("LayerNormalization", "layer")):
        ops = [n for n in uses if n.op_type == op and n.inputs[0] is h]
        if not ops:
            continue
        n = ops[0]
        if len(uses) > 1:
            return None, f"{h.name} is also read by {sorted(u.name for u in uses if u is not n)[:2]}"
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        if (not _last_axis(n, rank, default=-1) or not _vector(n.inputs[1], width)
                or (bias is not None and not _vector(bias, width)) or len(n.outputs) > 1 and any(o.uses() for o in n.outputs[1:])):
            return None, f"{n.name}: {op} not over the last axis with constant scale and bias"
        if kind == "layer" and h.type is not None and h.type.dtype != ir.DataType.FLOAT:
            return None, f"{n.name}: LayerNormalization of a {h.type.dtype.name} stream (its RMSNorm would square in {h.type.dtype.name})"
        return _after_gain(Norm(kind, [n], n.outputs[0], n.inputs[1], n, bias, n if bias is not None else None,
                                n.outputs[0], [], h), width), ""
    pows = [n for n in uses if n.op_type == "Pow" and n.inputs[0] is h and _scalar(n.inputs[1], 2.0)]
    if not pows:
        return None, f"no RMSNorm or LayerNorm reads {h.name}"
    chain, v = [pows[0]], pows[0].outputs[0]
    for op in ("ReduceMean", "Add", "Sqrt"):
        nxt = [u.node for u in v.uses()]
        if len(nxt) != 1 or nxt[0].op_type != op:
            return None, f"{h.name}: not an RMSNorm after {chain[-1].name}"
        n = nxt[0]
        if op == "ReduceMean" and not _last_axis(n, rank):
            return None, f"{n.name}: the mean of squares is not over the last axis"
        if op == "Add" and not any(_scalar(x) for x in n.inputs):
            return None, f"{n.name}: not an epsilon"
        chain.append(n)
        v = n.outputs[0]
    nxt = [u.node for u in v.uses()]
    if len(nxt) == 1 and nxt[0].op_type == "Reciprocal":
        chain.append(nxt[0])
        v = nxt[0].outputs[0]
        nxt = [u.node for u in v.uses()]
        ok = len(nxt) == 1 and nxt[0].op_type == "Mul" and set(nxt[0].inputs) == {h, v}
    else:
        ok = len(nxt) == 1 and nxt[0].op_type == "Div" and nxt[0].inputs[0] is h and nxt[0].inputs[1] is v
    if not ok:
        return None, f"{h.name}: not an RMSNorm after {chain[-1].name}"
    chain.append(nxt[0])
    if set(uses) - set(chain):
        return None, f"{h.name} is also read by {sorted(n.name for n in set(uses) - set(chain))[:2]}"
    normed = nxt[0].outputs[0]
    return _after_gain(Norm("rms", chain, normed, None, None, None, None, normed, [], h), width), ""


def _table_gather(v: ir.Value | None) -> ir.Node | None:
    """The Gather of a constant 2-D table (axis 0) producing v, through Casts that keep the type."""
    node = v.producer() if v is not None else None
    while node is not None and node.op_type == "Cast" and node.inputs[0] is not None and node.inputs[0].type == v.type:
        node = node.inputs[0].producer()
    table = _const(node.inputs[0]) if node is not None and node.op_type == "Gather" and node.domain == "" else None
    if table is None or table.ndim != 2 or attr_int(node, "axis") != 0:
        return None
    return node


def _root(g: ir.Node) -> tuple[ir.Value, list[ir.Node]]:
    """h_0 of the stream starting at embedding Gather g: g's output (after same-type Casts) summed
    with other embedding Gathers of the same width (learned positions, token types)."""
    width = _const(g.inputs[0]).shape[1]
    h, sources = g.outputs[0], [g]
    while True:
        uses = [u.node for u in h.uses() if u.node.op_type not in SHAPE_READERS]
        if len(uses) == 1 and uses[0].op_type == "Cast" and uses[0].outputs[0].type == h.type and not h.is_graph_output():
            h = uses[0].outputs[0]
            continue
        if len(uses) != 1 or uses[0].op_type != "Add" or h.is_graph_output():
            return h, sources
        other = next((x for x in uses[0].inputs if x is not h), None)
        o = _table_gather(other)
        if o is None or o in sources or _const(o.inputs[0]).shape[1] != width or len(list(other.uses())) != 1:
            return h, sources
        sources.append(o)
        h = uses[0].outputs[0]


def _keeps_rows(node: ir.Node, width: int) -> bool:
    """A Reshape whose input and output both end in `width` (statically): it moves whole rows."""
    i, o = node.inputs[0].shape, node.outputs[0].shape
    return (node.op_type == "Reshape" and node.domain == "" and i is not None and o is not None and len(i) and len(o)
            and i[-1] == width and o[-1] == width)


def find_streams(graph: ir.Graph) -> tuple[list[Stream], list[str]]:
    """Every residual stream (see the module doc), once each (a stream summed from several
    tables is found from each), and the reasons for every one refused."""
    streams, reasons = [], []
    roots = {}  # sources -> h_0, from each embedding Gather; a stream found from a subset of another's tables is that one
    for g in graph:
        if _table_gather(g.outputs[0]) is g:
            h0, sources = _root(g)
            roots.setdefault(frozenset(sources), (h0, sources))
    order = {n: i for i, n in enumerate(graph)}
    for key, (h0, sources) in roots.items():
        if any(key < k for k in roots):
            continue
        first = min(sources, key=order.__getitem__)
        g, width = first, _const(first.inputs[0]).shape[1]
        s, why = Stream(width, first, sorted(sources, key=order.__getitem__), [], [], [], h0), ""
        todo = [h0]
        while todo and not why:
            h = todo.pop()
            if h.is_graph_output():
                why = f"stream value {h.name} is a graph output"
                break
            rest = []
            for u in h.uses():
                node = u.node
                if node.op_type in SHAPE_READERS:
                    continue
                if node.op_type == "Reshape" and u.idx == 0 and _keeps_rows(node, width):
                    s.reshapes.append(node)
                    todo.append(node.outputs[0])
                    continue
                if node.op_type != "Add" or node.domain != "":
                    rest.append(node)
                    continue
                other = node.inputs[1 - u.idx]
                w = other.producer() if other is not None else None
                lin = as_linear(_matmul_of(w) if w is not None and w.op_type == "Add" else w)  # via a bias Add
                if (lin is None or lin.out is not other or lin.n_out != width or len(list(other.uses())) != 1
                        or other.is_graph_output()):
                    why = f"{node.name}: adds {h.name} to something other than a linear layer's output"
                    break
                s.writers.append(lin)
                todo.append(node.outputs[0])
            if why or not rest:
                continue
            norm, why = _match_norm(h, width, rest)
            if norm is None:
                break
            uses = [u.node for u in norm.out.uses() if u.node.op_type not in SHAPE_READERS]
            readers = [as_linear(n, norm.out) for n in uses]
            bad = [n.name for n, r in zip(uses, readers) if r is None or r.n_in != width]
            if bad or norm.out.is_graph_output():
                why = f"{norm.out.name} is read by {bad[:2] or 'a graph output'}, not only by linear layers"
                break
            norm.readers = readers
            s.norms.append(norm)
        if why:
            reasons.append(f"{g.name}: {why}")
        elif s.norms:
            streams.append(s)
    return streams, reasons


def _matmul_of(add: ir.Node) -> ir.Node | None:
    """The MatMul whose output `add` adds a constant to (a bias Add), else None."""
    if add.domain != "":
        return None
    for i, x in enumerate(add.inputs[:2]):
        p = x.producer() if x is not None else None
        if p is not None and p.op_type == "MatMul" and _const(add.inputs[1 - i]) is not None:
            return p
    return None
