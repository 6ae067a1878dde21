"""Fused rotations of pre-norm residual streams (QuaRot R1, R2): no online cost, found from the graph.

R1. A residual stream is the chain of values h_0 = Gather(E, ids), h_{l+1} = h_l + x_l W_l, read
only by residual Adds and by RMSNorms whose outputs feed only linear layers. For an orthogonal R
(`rotation.Rotation`, by default a Walsh-Hadamard over the whole width):

    rms(h R) = rms(h)                     (RMSNorm's mean of squares is over the rotated axis)
    RMSNorm(h) diag(g) W = RMSNorm(h R) (R^T diag(g) W)

so the stream can carry h R throughout: the embedding table becomes E R, every writer W_l becomes
W_l R, every reader takes R^T diag(g) W with the norm's gain g folded in (the gain's Mul is
removed; an RMSNormalization op gets ones), and the head reads the final norm through R^T. The
float function is unchanged; the activations the readers' quantizers see are rotated without a
single online op. RMSNorm is matched as Mul(h, 1/Sqrt(ReduceMean(h^2, -1) + eps)) (decomposed,
as exporters write it; also with Div) or RMSNormalization (opset 23).

R2. Per attention block, the values V = y W_v reach the output projection o_proj only through
head-wise layout ops (Reshape to [..., heads, d_head], Transposes that keep the last axis,
MatMul(P, V), Expand / Unsqueeze for grouped heads, Reshape back): (I (x) H_d) commutes with all of
them, so W_v := W_v (I (x) H_d) and W_o := (I (x) H_d)^T W_o.

Refused, with the reason in `reasons` (and the report): a stream read by anything else (a
post-LN encoder's LayerNormalization, a graph output, a non-linear reader), a norm output read by
anything but MatMul/Gemm with constant weights, a LayerNormalization (its mean subtraction is not
folded here), a shared weight. Then online rotation (`passes.rotate`) covers what it can.
Readers of a rotated norm are marked (`qcompile.fused_rotation` = "R1"), so online rotation
leaves them and a second run changes nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.graph import const_array as _const
from qcompile.graph import replace_const
from qcompile.rotation import Rotation

FUSED_KEY = "qcompile.fused_rotation"  # node metadata: "R1" on a rotated norm's readers, "R2" on V/O
IN_VALUES_KEY = "qcompile.in_values"  # on v_proj and the head ops when a rotation of the merged heads x went into W_v: x


@dataclasses.dataclass
class Norm:
    nodes: list[ir.Node]  # the pattern's nodes
    normed: ir.Value  # h / rms(h)
    gain: ir.Value | None  # g (a constant [D]); None when there is none
    gain_node: ir.Node | None  # the Mul by g (decomposed) or the RMSNormalization op
    out: ir.Value  # what the readers read
    readers: list[ir.Node]


@dataclasses.dataclass
class Stream:
    width: int
    gather: ir.Node
    writers: list[ir.Node]
    norms: list[Norm]


def _scalar(v: ir.Value | None, value: float | None = None) -> bool:
    a = _const(v)
    return a is not None and a.size == 1 and (value is None or float(a.reshape(())) == value)


def _linear_reader(node: ir.Node, v: ir.Value, width: int) -> bool:
    """node computes v @ W with a constant W [width, N] (MatMul, or Gemm without transA)."""
    w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.domain != "" or node.inputs[0] is not v or w is None or w.ndim != 2:
        return False
    if node.op_type == "MatMul":
        return w.shape[0] == width
    if node.op_type == "Gemm":
        a = {k: x.as_int() for k, x in node.attributes.items() if k in ("transA", "transB")}
        return not a.get("transA", 0) and w.shape[1 if a.get("transB", 0) else 0] == width
    return False


def _last_axis(node: ir.Node, rank: int | None) -> bool:
    a = node.attributes.get("axes") or node.attributes.get("axis")
    axes = list(a.as_ints()) if a is not None and a.type == ir.AttributeType.INTS else (
        [a.as_int()] if a is not None else None)
    if axes is None and len(node.inputs) > 1:
        c = _const(node.inputs[1])
        axes = None if c is None else [int(x) for x in c.ravel()]
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _match_norm(h: ir.Value, width: int) -> tuple[Norm | None, str]:
    """The RMSNorm reading stream value h (its other readers are residual Adds), or (None, why not)."""
    uses = [u.node for u in h.uses() if u.node.op_type != "Add"]
    rank = len(h.shape) if h.shape is not None else None
    rms = [n for n in uses if n.op_type == "RMSNormalization" and n.inputs[0] is h]
    if rms:
        n = rms[0]
        axis = n.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, (rank or 0) - 1) or _const(n.inputs[1]) is None:
            return None, f"{n.name}: RMSNormalization not over the last axis with a constant scale"
        return Norm([n], n.outputs[0], n.inputs[1], n, n.outputs[0], []), ""
    pows = [n for n in uses if n.op_type == "Pow" and n.inputs[0] is h and _scalar(n.inputs[1], 2.0)]
    if not pows:
        ln = [n for n in uses if n.op_type == "LayerNormalization"]
        if ln:
            return None, f"{ln[0].name}: LayerNormalization (its mean subtraction is not folded; a post-LN stream)"
        return None, f"no RMSNorm reads {h.name}"
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
    normed = nxt[0].outputs[0]
    if set(uses) - set(chain):
        return None, f"{h.name} is also read by {sorted(n.name for n in set(uses) - set(chain))[:2]}"
    gain_node, gain, out = None, None, normed
    after = [u.node for u in normed.uses()]
    if len(after) == 1 and after[0].op_type == "Mul" and not normed.is_graph_output():
        g = next((x for x in after[0].inputs if x is not normed), None)
        if _const(g) is not None and _const(g).shape == (width,):
            gain_node, gain, out = after[0], g, after[0].outputs[0]
    return Norm(chain, normed, gain, gain_node, out, []), ""


def find_streams(graph: ir.Graph) -> tuple[list[Stream], list[str]]:
    """Every residual stream R1 can rotate, and the reasons for every one it cannot."""
    streams, reasons = [], []
    for g in graph:
        table = _const(g.inputs[0]) if g.op_type == "Gather" and g.domain == "" else None
        if table is None or table.ndim != 2 or (g.attributes.get("axis") and g.attributes["axis"].as_int() != 0):
            continue
        width, why = table.shape[1], ""
        s = Stream(width, g, [], [])
        todo = [g.outputs[0]]
        while todo and not why:
            h = todo.pop()
            if h.is_graph_output():
                why = f"stream value {h.name} is a graph output"
                break
            adds = [u.node for u in h.uses() if u.node.op_type == "Add"]
            for add in adds:
                other = next((x for x in add.inputs if x is not h), None)
                w = other.producer() if other is not None else None
                if (w is None or w.op_type != "MatMul" or _const(w.inputs[1]) is None or _const(w.inputs[1]).ndim != 2
                        or len(list(other.uses())) != 1 or other.is_graph_output()):
                    why = f"{add.name}: adds {h.name} to something other than a linear layer's output"
                    break
                s.writers.append(w)
                todo.append(add.outputs[0])
            if why:
                break
            rest = [u.node for u in h.uses() if u.node.op_type != "Add"]
            if rest:
                norm, why = _match_norm(h, width)
                if norm is None:
                    break
                readers = [u.node for u in norm.out.uses()]
                bad = [n.name for n in readers if not _linear_reader(n, norm.out, width)]
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


def _fold(graph, node: ir.Node, idx: int, fn, tag: str) -> None:
    replace_const(graph, node, idx, lambda a: fn(a.astype(np.float64)).astype(a.dtype), f"{node.inputs[idx].name}_{tag}_{node.name}")


class FusedResidualRotationPass(ir.passes.InPlacePass):
    """R1 with the given R of each stream `find_streams` finds ({its embedding Gather's name: R}),
    and R2 for the streams named in `heads`; see the module doc. `applied` lists, per run, what
    each rotation touched (the report's entries)."""

    def __init__(self, rotations: dict[str, Rotation], heads: set[str] = frozenset()) -> None:
        super().__init__()
        self.rotations = rotations
        self.heads = heads
        self.applied: list[dict] = []

    def __repr__(self) -> str:
        return "FusedResidualRotationPass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.applied = []
        streams, _ = find_streams(graph)
        streams = [s for s in streams if s.gather.name in self.rotations
                   and not any(FUSED_KEY in r.metadata_props for n in s.norms for r in n.readers)]
        for s in streams:
            r = self.rotations[s.gather.name]
            if r.width != s.width:
                raise ValueError(f"rotation of width {r.width} for the {s.width}-wide stream of {s.gather.name}")
            m = r.matrix()
            _fold(graph, s.gather, 0, lambda e, m=m: e @ m, "r1")
            for w in s.writers:
                _fold(graph, w, 1, lambda a, m=m: a @ m, "r1")
            for norm in s.norms:
                g = _const(norm.gain).astype(np.float64) if norm.gain is not None else np.ones(s.width)
                for rd in norm.readers:
                    trans = rd.op_type == "Gemm" and rd.attributes.get("transB") is not None and rd.attributes["transB"].as_int()
                    fold = (lambda a, m=m, g=g: (m.T @ (g[:, None] * a.T)).T) if trans else (lambda a, m=m, g=g: m.T @ (g[:, None] * a))
                    _fold(graph, rd, 1, fold, "r1")
                    rd.metadata_props[FUSED_KEY] = "R1"
                if norm.gain_node is not None and norm.gain_node.op_type == "Mul":
                    ir.convenience.replace_all_uses_with(norm.gain_node.outputs[0], norm.normed)
                    graph.remove(norm.gain_node, safe=True)
                elif norm.gain_node is not None:  # RMSNormalization: the scale becomes ones
                    _fold(graph, norm.gain_node, 1, np.ones_like, "r1")
            readers, writers = sorted(rd.name for n in s.norms for rd in n.readers), sorted(w.name for w in s.writers)
            entry = {"transform": "fused-rotation", "kind": "R1", "rotation": r.to_json(), "stream": s.gather.name,
                     "nodes": sorted({s.gather.name, *writers, *readers}), "readers": readers, "writers": writers}
            if s.gather.name in self.heads:
                entry["R2"] = self._heads(graph, s)
            self.applied.append(entry)
        return ir.passes.PassResult(model, modified=bool(streams))

    def _heads(self, graph, s: Stream) -> list[dict]:
        """R2 on every V path of the stream's attention blocks: W_v (I (x) H_d), (I (x) H_d)^T W_o."""
        out = []
        writers = {w.name for w in s.writers}
        for norm in s.norms:
            for v_proj in norm.readers:
                hp = _head_path(v_proj, lambda n: n.name in writers)
                if hp is None:
                    continue
                o_proj, d = hp.o_proj, hp.d
                width_v = v_proj.inputs[1].const_value.shape[1]
                width_o = o_proj.inputs[1].const_value.shape[0]
                if v_proj.op_type != "MatMul" or width_v % d or width_o % d or d & (d - 1):
                    continue
                hv, ho = Rotation(width_v, d).matrix(), Rotation(width_o, d).matrix()
                _fold(graph, v_proj, 1, lambda a, hv=hv: a @ hv, "r2")
                if hp.bias is not None:
                    _fold(graph, hp.bias, 1 if hp.bias.inputs[0] is v_proj.outputs[0] else 0, lambda b, hv=hv: b @ hv, "r2")
                _fold(graph, o_proj, 1, lambda a, ho=ho: ho.T @ a, "r2")
                v_proj.metadata_props[FUSED_KEY] = "R1,R2"
                o_proj.metadata_props[FUSED_KEY] = "R2"
                out.append({"v": v_proj.name, "o": o_proj.name, "head_dim": d})
        return out


HEAD_OPS = ("Reshape", "Transpose", "MatMul", "Expand", "Unsqueeze")


@dataclasses.dataclass
class HeadPath:
    """V = y W_v (+ b_v) reaching o_proj only through head-wise layout ops whose last axis is d."""

    v_proj: ir.Node
    bias: ir.Node | None  # the Add of a constant b_v [width_v] right after v_proj, if any
    o_proj: ir.Node
    d: int
    nodes: list[ir.Node]  # the layout ops between them


def head_paths(graph: ir.Graph) -> dict[str, HeadPath]:
    """o_proj's input value name -> its `HeadPath`, for every MatMul with a constant weight whose
    output reaches another such MatMul only through head-wise ops (`_head_path`)."""
    out = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and _const(node.inputs[1]) is not None:
            hp = _head_path(node, lambda n: n.op_type == "MatMul" and _const(n.inputs[1]) is not None)
            if hp is not None:
                out[hp.o_proj.inputs[0].name] = hp
    return out


def _head_path(v_proj: ir.Node, is_o_proj) -> HeadPath | None:
    """The `HeadPath` from v_proj to the node `is_o_proj` accepts (reading the merged heads as its
    input 0), through a bias Add, then only head-wise ops whose last axis is d_head (the first
    Reshape's), each value used once; else None."""
    v, d, node, bias, path = v_proj.outputs[0], None, None, None, []
    w = _const(v_proj.inputs[1])
    width_v = w.shape[-1] if w is not None else None
    for _ in range(16):
        uses = [u for u in v.uses()]
        if len(uses) != 1 or v.is_graph_output():
            return None
        node, idx = uses[0].node, uses[0].idx
        if node.op_type == "MatMul" and idx == 0 and is_o_proj(node):
            return HeadPath(v_proj, bias, node, d, path) if d is not None else None
        if (node.op_type == "Add" and d is None and bias is None and not path
                and (b := _const(node.inputs[1 - idx])) is not None and b.shape == (width_v,)):
            bias, v = node, node.outputs[0]
            continue
        if node.op_type not in HEAD_OPS or node.domain != "":
            return None
        path.append(node)
        out = node.outputs[0]
        last = out.shape[-1] if out.shape is not None and len(out.shape) else None
        if node.op_type == "MatMul" and (idx != 1 or _const(node.inputs[0]) is not None):
            return None
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            if perm is None or perm.as_ints()[-1] != len(perm.as_ints()) - 1:
                return None
        if node.op_type == "Unsqueeze" and (out.shape is None or _const(node.inputs[1]) is None
                                            or any(int(a) in (-1, len(out.shape) - 1) for a in _const(node.inputs[1]).ravel())):
            return None
        if not isinstance(last, int):
            return None
        if node.op_type == "Reshape":
            if d is None:
                d = last
            elif last != d:  # the merge back to [..., heads * d]: the next node must be o_proj
                nxt = [u.node for u in out.uses()]
                ok = len(nxt) == 1 and nxt[0].op_type == "MatMul" and is_o_proj(nxt[0]) and nxt[0].inputs[0] is out
                return HeadPath(v_proj, bias, nxt[0], d, path) if ok else None
        elif last != d:
            return None
        v = out
    return None
