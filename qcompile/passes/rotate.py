"""Online rotation: rotate the activation a MatMul/Gemm reads, fold the inverse into its weights.

For an activation x [..., K] whose every quantized consumer c computes x @ W_c with a constant
W_c [K, N_c] (`smooth_quant.smoothable`: the same condition as for SmoothQuant's scales) and an
orthogonal R = `rotation.Rotation` (block-diagonal Hadamard, optionally with random signs D):

    x W_c = (x R) (R^T W_c)                                                    (exact)

Before:  y_c = MatMul(x, W_c)
After:   x_rot = Reshape(MatMul(Reshape(Mul(x, d), [0, .., K/b, b]), B), [0, .., K])
         y_c   = MatMul(x_rot, W'_c),   W'_c = R^T W_c  (new initializers; W_c is never modified
                                                          in place, another node may share it)

x R is a MatMul by the one b x b block B over x viewed as [..., K/b, b] (K b multiply-adds a row;
"grouped"), or for a rotation in the fast form (`Rotation.factor` a, b = a c)

         x_rot = Reshape(MatMul(Transpose(MatMul(Reshape(x, [0, .., K/b, a, c]), B_c)), B_a), [0, .., K])

(K (a + c) multiply-adds a row: 128 = 16 x 8 costs 24 instead of 128; used only where no
quantizer of the consumers groups x's channels, `order_free`, since its permutation regroups
them); the Mul by the signs d is there for kind "random" only. With `native` (--lowering native)
a power-of-two Sylvester block is one op of the native library instead,

         x_rot = qcompile.native.BlockHadamard(x[, d], block=b)      (one pass, native/hadamard.h)

When x's rank is unknown the rotation is one MatMul by the whole block-diagonal R [K, K] ("dense"). A Gemm with transB stores
W^T, and gets (R^T W)^T = W^T R. The rotated value x_rot is what the quantizer of the consumers
then sees: its outlier channels are spread over b channels each.

When x is an attention's merged heads, reached from a value projection V = y W_v (+ b_v) only
through head-wise layout ops (`residual_rotate.head_paths`), R has no signs and blocks inside
a head, and no quantizer sits on the way from V to x, x R costs nothing online: W_v := W_v R,
b_v := b_v R (`_fuse_into_values`; QuaRot's R2 without a residual-stream rotation, so also on
post-LN encoders). With a quantizer on the way (attention MatMuls quantized, e.g. w4a8) it would
quantize V R instead of V: MiniLM w4a8 with `auto` lost 0.13 dB that way, so x R stays online.

Each consumer is marked (node metadata `qcompile.rotated` = x's name), so a second run rotates
nothing twice; the rotation's own nodes carry `qcompile.rotation` = x's name and are never
planned. Exact in float: the outputs change only by rounding (float64 folding, one float32
MatMul more).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import drop_unused_initializers, index, initializer, replace_const
from qcompile.passes.residual_rotate import IN_VALUES_KEY, HeadPath, head_paths
from qcompile.passes.smooth_quant import _trans_b, scorer_for, smoothable
from qcompile.plan import QuantPlan
from qcompile.rotation import Rotation, block_for, is_power_of_two

NATIVE_DOMAIN, NATIVE_VERSION = "qcompile.native", 1  # qcompile.native's custom-op domain (BlockHadamard)

ROTATED_KEY = "qcompile.rotated"  # node metadata on a consumer whose weight absorbed R^T
ROTATION_KEY = "qcompile.rotation"  # node metadata on the nodes computing x R: x's name
ROTATION_IN_VALUES_KEY = "qcompile.rotation_in_values"  # on the value projection that absorbed x R: x's name


def rotated_name(value: str) -> str:
    """The name of the rotated activation x R in the graph (what the plan's smoothing and the
    quantizers then name)."""
    return f"{value}_rotated"


class OnlineRotationPass(ir.passes.InPlacePass):
    """Apply given rotations {activation value: Rotation} (see the module doc). `plan` names the
    graph the pass runs on; afterwards `analyze.plan_on` names the new one."""

    def __init__(self, plan: QuantPlan, rotations: dict[str, Rotation], native: bool = False,
                 quantized: set[str] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.rotations = rotations
        self.native = native  # emit `native_emits` rotations as qcompile.native BlockHadamard
        self.quantized = quantized  # the values that will be quantized (default: the plan's activations)

    def __repr__(self) -> str:
        return f"OnlineRotationPass({len(self.rotations)} values)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes, values = index(graph)
        changed = 0
        heads = head_paths(graph) if self.rotations else None
        quantized = set(self.plan.activation_specs()) if self.quantized is None else self.quantized
        for value, consumers in smoothable(graph, self.plan).items():
            r, x = self.rotations.get(value), values.get(value)
            if r is None or x is None or any(ROTATED_KEY in nodes[c].metadata_props for c in consumers):
                continue
            if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) and x.shape[-1] != r.width:
                raise ValueError(f"rotation of {value!r}: width {r.width}, but the value has {x.shape[-1]} channels")
            hp = heads.get(value) if heads is not None else None
            xr = _fuse_into_values(graph, hp, x, r, quantized) if hp is not None else None
            xr = xr if xr is not None else _emit(graph, x, r, self.native and native_emits(r, x))
            for c in consumers:
                node = nodes[c]
                node.replace_input_with(0, xr)
                fold = (lambda a, r=r: r.fold_rows(a.T).T) if node.op_type == "Gemm" and _trans_b(node) else r.fold_rows  # r bound now: a file-backed weight folds lazily
                replace_const(graph, node, 1, fold, f"{node.inputs[1].name}_rot_{c}")
                node.metadata_props[ROTATED_KEY] = value
            changed += 1
        if changed:
            drop_unused_initializers(graph, recursive=False)
            graph.sort()
            if any(n.domain == NATIVE_DOMAIN for n in graph):
                graph.opset_imports.setdefault(NATIVE_DOMAIN, NATIVE_VERSION)
        return ir.passes.PassResult(model, modified=changed > 0)


def native_emits(r: Rotation, x: ir.Value | None = None) -> bool:
    """The native BlockHadamard computes r (Sylvester blocks, not the fast form) on x (float32)."""
    return not r.factor and is_power_of_two(r.block) and r.block >= 2 and (x is None or x.dtype == ir.DataType.FLOAT)


def _fuse_into_values(graph: ir.Graph, hp: HeadPath, x: ir.Value, r: Rotation, quantized: set[str]) -> ir.Value | None:
    """x R folded into the attention's value projection when x is the merged heads of `hp`
    (`residual_rotate.head_paths`) and R = I (x) B has no signs and blocks inside a head (b divides
    d_head): (I (x) B) commutes with the head-wise layout ops and with P V per head, so
    x R = the same attention over V R = y (W_v R) + b_v R. No online op; x is renamed to
    `rotated_name` (it now holds x R). None when R does not fit, or when a value on the way is in
    `quantized` (its quantizer would see V R instead of V; the choice measured the online form)."""
    w = hp.v_proj.inputs[1].const_value
    if r.signs() is not None or hp.d % r.block or w is None or w.shape[-1] % r.block:
        return None
    if quantized & ({v.name for n in (hp.v_proj, hp.bias, *hp.nodes) if n is not None for v in n.outputs} - {x.name}):
        return None
    rv = Rotation(int(w.shape[-1]), r.block, factor=r.factor)  # the same block B over V's width
    fold = lambda a: rv.apply(a.astype(np.float64)).astype(a.dtype)  # noqa: E731
    replace_const(graph, hp.v_proj, 1, fold, f"{hp.v_proj.inputs[1].name}_rot_{hp.v_proj.name}")
    if hp.bias is not None:
        i = 1 if hp.bias.inputs[0] is hp.v_proj.outputs[0] else 0
        replace_const(graph, hp.bias, i, fold, f"{hp.bias.inputs[i].name}_rot_{hp.bias.name}")
    for node in (hp.v_proj, *hp.nodes):
        node.metadata_props[IN_VALUES_KEY] = x.name
    hp.v_proj.metadata_props[ROTATION_IN_VALUES_KEY] = x.name
    x.name = rotated_name(x.name)
    return x


def _emit(graph: ir.Graph, x: ir.Value, r: Rotation, native: bool = False) -> ir.Value:
    """Append the nodes computing x R (see the module doc); returns x R, named `rotated_name`."""
    base = x.name
    new: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, **kw) -> ir.Value:
        node = ir.node(op, inputs, name=f"{base}_Rotate_{suffix}", **kw)
        node.metadata_props[ROTATION_KEY] = base
        out = node.outputs[0]
        out.name, out.dtype = f"{base}_rotating_{suffix}", x.dtype
        new.append(node)
        return out

    np_dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    h = x
    d = r.signs()
    if native:  # one pass: (x * d) (I (x) H_b / sqrt(b)) by the fast transform (native/hadamard.h)
        signs = [initializer(graph, f"{base}_rot_signs", d.astype(np.float32))] if d is not None else []
        h = add("BlockHadamard", [h, *signs], "native", domain=NATIVE_DOMAIN, attributes={"block": r.block})
        h.name, h.shape = rotated_name(base), x.shape
        graph.append(new[0])
        return h
    if d is not None:
        h = add("Mul", [h, initializer(graph, f"{base}_rot_signs", d.astype(np_dtype))], "signs")
    rank = len(x.shape) if x.shape is not None else None
    factors = r.factors()
    if rank is not None and rank >= 1 and (factors is not None or r.block < r.width):
        lead = [0] * (rank - 1)
        blocks = [r.width // r.block, r.factor, r.block // r.factor] if factors is not None else [r.width // r.block, r.block]
        h = add("Reshape", [h, initializer(graph, f"{base}_rot_split", np.array(lead + blocks, np.int64))], "split")
        if factors is None:  # grouped: [..., K/b, b] @ B
            h = add("MatMul", [h, initializer(graph, f"{base}_rot_block", r.block_matrix().astype(np_dtype))], "matmul")
        else:  # fast: [..., K/b, a, c] @ B_c, swap the last two axes, @ B_a
            h = add("MatMul", [h, initializer(graph, f"{base}_rot_inner", factors[1].astype(np_dtype))], "inner")
            h = add("Transpose", [h], "transpose")
            h.producer().attributes["perm"] = ir.AttrInt64s("perm", [*range(rank), rank + 1, rank])
            h = add("MatMul", [h, initializer(graph, f"{base}_rot_outer", factors[0].astype(np_dtype))], "outer")
        h = add("Reshape", [h, initializer(graph, f"{base}_rot_merge", np.array(lead + [r.width], np.int64))], "merge")
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


def rotation_candidates(width: int, native: bool = False, order_free: bool = True) -> list[Rotation]:
    """Block-diagonal Hadamard rotations of `width` channels, one per distinct block of
    ROTATION_BLOCKS (`block_for` of each), each as it will be emitted (`emitted_rotation`)."""
    blocks = sorted({block_for(width, b) for b in ROTATION_BLOCKS} - {1})
    return [emitted_rotation(width, b, native=native, order_free=order_free) for b in blocks]


def emitted_rotation(width: int, block: int, kind: str = "hadamard", seed: int = 0, native: bool = False,
                     order_free: bool = True) -> Rotation:
    """The rotation of that block as `OnlineRotationPass` emits it fastest: Sylvester blocks for
    the native BlockHadamard (`native`, power-of-two blocks), else `Rotation.fast` when the
    consumers' quantizers do not depend on the channel order (`order_free`: its permutation P
    regroups K-blocked weights, measured -0.3 dB on MiniLM w4a8), else one MatMul by the block."""
    r = Rotation(width, block, kind, seed)
    return r if (native and native_emits(r)) or not order_free else Rotation.fast(width, block, kind, seed)


def order_free(plan: QuantPlan, nodes: dict[str, ir.Node], consumers: list[str]) -> bool:
    """No quantizer of the consumers' input x or weights groups channels of x into blocks (per
    tensor, per channel, or blocks along another axis), so permuting x's channels with the
    weights' rows leaves every quantized product unchanged."""
    from qcompile.formats import BlockFormat
    from qcompile.plan import PerBlock

    for c in consumers:
        k_axis = 1 if nodes[c].op_type == "Gemm" and _trans_b(nodes[c]) else 0  # W's axis along x's channels
        for i in (0, 1):
            q = plan.nodes[c].inputs.get(i) if c in plan.nodes else None
            if q is None:
                continue
            g = q.spec.granularity
            blocked = isinstance(g, PerBlock) and (i == 0 or g.axis % 2 == k_axis)  # x: any block; W [K, N]: along K
            if blocked or isinstance(q.spec.fmt, BlockFormat):
                return False
    return True


def choose_rotations(graph: ir.Graph, plan: QuantPlan, rows: dict[str, np.ndarray],
                     threads: int = 1, native: bool = False) -> dict[str, tuple[Rotation | None, dict[str, float]]]:
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
        for r in rotation_candidates(sc.fit.shape[1], native, order_free(plan, nodes, consumers)):
            e = sc.error(r.apply(sc.fit), r.apply(sc.test), [r.fold_rows(w) for w in sc.ws])
            gains[f"hadamard@{r.block}"] = round(10 * np.log10(max(base, 1e-300) / max(e, 1e-300)), 3)
            if e < best:
                best, best_r = e, r
        return best_r, gains

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(search, todo) if threads > 1 else map(search, todo))
    return {v: f for (v, _), f in zip(todo, found)}
