"""Fused rotations of pre-norm residual streams (QuaRot R1, R2): no online cost, found from the graph.

R1. On a residual stream (`qcompile.streams`: h_0 = sum of Gather(E_i, ids), h_{l+1} = h_l +
x_l W_l (+ b_l), read only by residual Adds and by RMSNorms whose outputs feed only linear
layers) and for an orthogonal R (`rotation.Rotation`, by default a Walsh-Hadamard over the whole
width):

    rms(h R) = rms(h)                     (RMSNorm's mean of squares is over the rotated axis)
    (RMSNorm(h) diag(g) + beta) W + b = RMSNorm(h R) (R^T diag(g) W) + (beta W + b)

so the stream can carry h R throughout: every table becomes E_i R, every writer W_l R and
b_l R, every reader takes R^T diag(g) W with the norm's gain g folded in (the gain's Mul is
removed; an RMSNormalization op gets ones) and a bias Add after the norm into its bias; the head
reads the final norm through R^T. The float function is unchanged; the activations the readers'
quantizers see are rotated without a single online op. RMSNorm is matched as
Mul(h, 1/Sqrt(ReduceMean(h^2, -1) + eps)) (decomposed, as exporters write it; also with Div) or
RMSNormalization (opset 23); a LayerNorm stream is converted first
(`passes.layernorm_to_rmsnorm`), this pass leaves it.

R2. Per attention block, the values V = y W_v reach the output projection o_proj only through
head-wise layout ops (Reshape to [..., heads, d_head], Transposes that keep the last axis,
MatMul(P, V), Expand / Unsqueeze for grouped heads, Reshape back): (I (x) H_d) commutes with all of
them, so W_v := W_v (I (x) H_d) and W_o := (I (x) H_d)^T W_o.

Refused, with the reason in `find_streams`'s reasons (and the report): a stream read by anything
else (a post-LN encoder's next residual, a graph output, a non-linear reader), a norm output
read by anything but MatMul/Gemm with constant weights. Then online rotation (`passes.rotate`)
covers what it can. Readers of a rotated norm are marked (`qcompile.fused_rotation` = "R1"), so
online rotation leaves them and a second run changes nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.graph import const_array as _const
from qcompile.rotation import Rotation
from qcompile.streams import SHAPE_READERS, Stream, add_bias, find_streams, fold_const, fold_in, fold_out, weight_kn

FUSED_KEY = "qcompile.fused_rotation"  # node metadata: "R1" on a rotated norm's readers, "R2" on V/O
IN_VALUES_KEY = "qcompile.in_values"  # on v_proj and the head ops when a rotation of the merged heads x went into W_v: x


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
        streams = [s for s in streams if s.gather.name in self.rotations and s.kinds == {"rms"}
                   and not any(FUSED_KEY in r.node.metadata_props for n in s.norms for r in n.readers)]
        for s in streams:
            r = self.rotations[s.gather.name]
            if r.width != s.width:
                raise ValueError(f"rotation of width {r.width} for the {s.width}-wide stream of {s.gather.name}")
            m = r.matrix()
            for src in s.sources:
                fold_const(graph, src, 0, lambda e, m=m: e @ m, "r1")
            for w in s.writers:
                fold_out(graph, w, lambda a, m=m: a @ m, "r1")
            for norm in s.norms:
                g = _const(norm.gain).astype(np.float64) if norm.gain is not None else np.ones(s.width)
                beta = _const(norm.bias).astype(np.float64) if norm.bias is not None else None
                for rd in norm.readers:
                    delta = beta @ weight_kn(rd) if beta is not None else None
                    fold_in(graph, rd, lambda a, m=m, g=g: (a * g) @ m, "r1")
                    if delta is not None and np.any(delta):
                        add_bias(graph, rd, delta, "r1")
                    rd.node.metadata_props[FUSED_KEY] = "R1"
                for op in (norm.bias_node, norm.gain_node):  # the Add of beta, then the Mul of g: now in the readers
                    if op is not None and op.op_type in ("Add", "Mul"):
                        ir.convenience.replace_all_uses_with(op.outputs[0], next(x for x in op.inputs if _const(x) is None))
                        graph.remove(op, safe=True)
                if norm.gain_node is not None and norm.gain_node.op_type == "RMSNormalization":  # its scale becomes ones
                    fold_const(graph, norm.gain_node, 1, np.ones_like, "r1")
            readers = sorted(rd.node.name for n in s.norms for rd in n.readers)
            writers = sorted(w.node.name for w in s.writers)
            entry = {"transform": "fused-rotation", "kind": "R1", "rotation": r.to_json(), "stream": s.gather.name,
                     "nodes": sorted({*(n.name for n in s.sources), *writers, *readers}), "readers": readers,
                     "writers": writers, "sources": [n.name for n in s.sources]}
            if s.gather.name in self.heads:
                entry["R2"] = self._heads(graph, s)
            self.applied.append(entry)
        return ir.passes.PassResult(model, modified=bool(streams))

    def _heads(self, graph, s: Stream) -> list[dict]:
        """R2 on every V path of the stream's attention blocks: W_v (I (x) H_d), (I (x) H_d)^T W_o."""
        out = []
        writers = {w.node.name for w in s.writers}
        for norm in s.norms:
            for v_proj in (rd.node for rd in norm.readers):
                hp = _head_path(v_proj, lambda n: n.name in writers)
                if hp is None:
                    continue
                o_proj, d = hp.o_proj, hp.d
                width_v = v_proj.inputs[1].const_value.shape[1]
                width_o = o_proj.inputs[1].const_value.shape[0]
                if v_proj.op_type != "MatMul" or width_v % d or width_o % d or d & (d - 1):
                    continue
                hv, ho = Rotation(width_v, d).matrix(), Rotation(width_o, d).matrix()
                fold_const(graph, v_proj, 1, lambda a, hv=hv: a @ hv, "r2")
                if hp.bias is not None:
                    fold_const(graph, hp.bias, 1 if hp.bias.inputs[0] is v_proj.outputs[0] else 0, lambda b, hv=hv: b @ hv, "r2")
                fold_const(graph, o_proj, 1, lambda a, ho=ho: ho.T @ a, "r2")
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
    Reshape's), each value used once (Shape aside); else None."""
    v, d, node, bias, path = v_proj.outputs[0], None, None, None, []
    w = _const(v_proj.inputs[1])
    width_v = w.shape[-1] if w is not None else None
    for _ in range(16):
        uses = [u for u in v.uses() if u.node.op_type not in SHAPE_READERS]
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
        if node.op_type == "Reshape" and d is not None and last != d:
            nxt = [u.node for u in out.uses() if u.node.op_type not in SHAPE_READERS]
            # the merge back to [..., heads * d] (its width may be symbolic: o_proj's K fixes it); the next node must be o_proj
            ok = len(nxt) == 1 and nxt[0].op_type == "MatMul" and is_o_proj(nxt[0]) and nxt[0].inputs[0] is out
            return HeadPath(v_proj, bias, nxt[0], d, path) if ok else None
        if not isinstance(last, int):
            return None
        if node.op_type == "Reshape":
            d = last if d is None else d
        elif last != d:
            return None
        v = out
    return None
