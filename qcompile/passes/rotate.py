"""Online rotation: rotate the activation a MatMul/Gemm reads, fold the inverse into its weights.

For an activation x [..., K] whose every quantized consumer c computes x @ W_c with a constant
W_c [K, N_c] (`smooth_quant.smoothable`: the same condition as for SmoothQuant's scales) and an
orthogonal R = `rotation.Rotation` (block-diagonal Hadamard, optionally with random signs D):

    x W_c = (x R) (R^T W_c)                                                    (exact)

Before:  y_c = MatMul(x, W_c)
After:   x_rot = Reshape(MatMul(Reshape(Mul(x, d), [0, .., K/b, b]), H_b/sqrt(b)), [0, .., K])
         y_c   = MatMul(x_rot, W'_c),   W'_c = R^T W_c  (new initializers; W_c is never modified
                                                          in place, another node may share it)

x R is a MatMul by the one b x b block over x viewed as [..., K/b, b] (K b multiply-adds a row;
"grouped"); the Mul by the signs d is there for kind "random" only. When x's rank is unknown the
rotation is one MatMul by the whole block-diagonal R [K, K] ("dense"). A Gemm with transB stores
W^T, and gets (R^T W)^T = W^T R. The rotated value x_rot is what the quantizer of the consumers
then sees: its outlier channels are spread over b channels each.

Each consumer is marked (node metadata `qcompile.rotated` = x's name), so a second run rotates
nothing twice; the rotation's own nodes carry `qcompile.rotation` = x's name and are never
planned. Exact in float: the outputs change only by rounding (float64 folding, one float32
MatMul more).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import drop_unused_initializers, index, initializer, replace_const
from qcompile.passes.smooth_quant import _trans_b, scorer_for, smoothable
from qcompile.plan import QuantPlan
from qcompile.rotation import Rotation, block_for

ROTATED_KEY = "qcompile.rotated"  # node metadata on a consumer whose weight absorbed R^T
ROTATION_KEY = "qcompile.rotation"  # node metadata on the nodes computing x R: x's name


def rotated_name(value: str) -> str:
    """The name of the rotated activation x R in the graph (what the plan's smoothing and the
    quantizers then name)."""
    return f"{value}_rotated"


class OnlineRotationPass(ir.passes.InPlacePass):
    """Apply given rotations {activation value: Rotation} (see the module doc). `plan` names the
    graph the pass runs on; afterwards `analyze.plan_on` names the new one."""

    def __init__(self, plan: QuantPlan, rotations: dict[str, Rotation]) -> None:
        super().__init__()
        self.plan = plan
        self.rotations = rotations

    def __repr__(self) -> str:
        return f"OnlineRotationPass({len(self.rotations)} values)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes, values = index(graph)
        changed = 0
        for value, consumers in smoothable(graph, self.plan).items():
            r, x = self.rotations.get(value), values.get(value)
            if r is None or x is None or any(ROTATED_KEY in nodes[c].metadata_props for c in consumers):
                continue
            if x.shape is not None and x.shape[-1] != r.width:
                raise ValueError(f"rotation of {value!r}: width {r.width}, but the value has {x.shape[-1]} channels")
            xr = _emit(graph, x, r)
            for c in consumers:
                node = nodes[c]
                node.replace_input_with(0, xr)
                fold = (lambda a: r.fold_rows(a.T).T) if node.op_type == "Gemm" and _trans_b(node) else r.fold_rows
                replace_const(graph, node, 1, fold, f"{node.inputs[1].name}_rot_{c}")
                node.metadata_props[ROTATED_KEY] = value
            changed += 1
        if changed:
            drop_unused_initializers(graph, recursive=False)
            graph.sort()
        return ir.passes.PassResult(model, modified=changed > 0)


def _emit(graph: ir.Graph, x: ir.Value, r: Rotation) -> ir.Value:
    """Append the nodes computing x R (see the module doc); returns x R, named `rotated_name`."""
    base = x.name
    new: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str) -> ir.Value:
        node = ir.node(op, inputs, name=f"{base}_Rotate_{suffix}")
        node.metadata_props[ROTATION_KEY] = base
        out = node.outputs[0]
        out.name, out.dtype = f"{base}_rotating_{suffix}", x.dtype
        new.append(node)
        return out

    np_dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    h = x
    d = r.signs()
    if d is not None:
        h = add("Mul", [h, initializer(graph, f"{base}_rot_signs", d.astype(np_dtype))], "signs")
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None and rank >= 1 and r.block < r.width:  # grouped: [..., K/b, b] @ H_b
        lead = [0] * (rank - 1)
        split = initializer(graph, f"{base}_rot_split", np.array(lead + [r.width // r.block, r.block], np.int64))
        merge = initializer(graph, f"{base}_rot_merge", np.array(lead + [r.width], np.int64))
        hb = initializer(graph, f"{base}_rot_block", r.block_matrix().astype(np_dtype))
        h = add("Reshape", [h, split], "split")
        h = add("MatMul", [h, hb], "matmul")
        h = add("Reshape", [h, merge], "merge")
    else:  # rank unknown (or one block): one MatMul by the whole block-diagonal matrix
        dense = np.kron(np.eye(r.width // r.block), r.block_matrix())
        h = add("MatMul", [h, initializer(graph, f"{base}_rot_matrix", dense.astype(np_dtype))], "matmul")
    h.name, h.shape = rotated_name(base), x.shape
    for node in new:
        graph.append(node)
    return h


def rotatable(graph: ir.Graph, plan: QuantPlan) -> dict[str, tuple[int, list[str]]]:
    """Activation value -> (its width K, the plan nodes reading it whose weights fold R^T): the
    values `smoothable` finds, with K read off the first consumer's weight shape (no weight bytes),
    except those a fused residual-stream rotation already rotated (`passes.residual_rotate`)."""
    from qcompile.passes.smooth_quant import _weight_kn

    from qcompile.passes.residual_rotate import FUSED_KEY

    nodes = {n.name: n for n in graph}
    out = {}
    for value, consumers in smoothable(graph, plan).items():
        if any("R1" in nodes[c].metadata_props.get(FUSED_KEY, "") for c in consumers):
            continue  # already reads a fused residual-stream rotation
        w, transposed = _weight_kn(nodes[consumers[0]])
        out[value] = (int(w.const_value.shape[1 if transposed else 0]), consumers)
    return out


ROTATION_BLOCKS = (16, 32, 64, 128)  # the Hadamard blocks `choose_rotations` tries (those dividing the width)


def rotation_candidates(width: int) -> list[Rotation]:
    """Block-diagonal Hadamard rotations of `width` channels, one per distinct block of
    ROTATION_BLOCKS (`block_for`: the largest power of two dividing the width up to each)."""
    return [Rotation(width, b) for b in sorted({block_for(width, b) for b in ROTATION_BLOCKS} - {1})]


def choose_rotations(graph: ir.Graph, plan: QuantPlan, rows: dict[str, np.ndarray],
                     threads: int = 1) -> dict[str, tuple[Rotation | None, dict[str, float]]]:
    """Per rotatable activation (`rotatable`), the rotation of least quantized output error among
    no rotation and `rotation_candidates`, measured with the target's own quantizers on sample
    rows (`transform_search.Scorer`, as the SmoothQuant search does), and each candidate's gain
    over no rotation in dB (10 log10 E(none) / E(R): what the report shows). Rotation does not
    always help (block FP4: it can spread one block's outlier into a finer-scaled neighbour), so
    a value keeps none unless a rotation measures better. Searched `threads` at a time, one BLAS
    thread each (the choice does not depend on `threads`)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    nodes = {n.name: n for n in graph}
    todo = [(v, cs) for v, cs in smoothable(graph, plan).items() if v in rows and rows[v].shape[0] >= 4]

    def search(item):
        value, consumers = item
        sc = scorer_for(nodes, plan, consumers, rows[value])
        if sc is None:
            return None, {}
        base = sc.error(sc.fit, sc.test, sc.ws)
        best, best_r, gains = base, None, {}
        for r in rotation_candidates(sc.fit.shape[1]):
            e = sc.error(r.apply(sc.fit), r.apply(sc.test), [r.fold_rows(w) for w in sc.ws])
            gains[f"hadamard@{r.block}"] = round(10 * np.log10(max(base, 1e-300) / max(e, 1e-300)), 3)
            if e < best:
                best, best_r = e, r
        return best_r, gains

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(search, todo) if threads > 1 else map(search, todo))
    return {v: f for (v, _), f in zip(todo, found)}
