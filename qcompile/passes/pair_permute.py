"""Renumber the reduction channels of int8 layers so no int16 pair of the integer kernels saturates.

The u8 x s8 kernels of x86 CPUs without VNNI add the products of reduction pairs (2i, 2i+1) in
int16 (`plan.PairBound`, capabilities.py). A pair can saturate only when both weights of a column
are large and of the same sign. The channels of an activation X that flows only through per-channel
ops, from producers that write them to consumers that reduce over them, can be renumbered by any
permutation pi without changing the function:

    producers  Conv / MatMul / Gemm with constant weights:  output channels (weight columns, bias)  <- pi
    inside     elementwise ops (Relu, Clip, Erf, Mul, Add, ...), per-channel constants  <- pi,
               BatchNormalization parameters, depthwise Conv weights and bias, spatial pooling
    consumers  Conv / MatMul / Gemm with constant weights:  input channels (weight rows)  <- pi

`pi` pairs channels i, j whose (planned) weight codes never form a saturating pair in any column
of any consumer: a matching in the graph of compatible channels, found greedily (most-constrained
channel first) with one round of repair by swaps. The weight-side fallback (growing the scale of a
channel whose pairs still break the bound, `weights.py`) then has little or nothing left to do.

Before:  y = MatMul(Gelu(MatMul(x, W1) + b1), W2)
After:   y = MatMul(Gelu(MatMul(x, W1[:, pi]) + b1[pi]), W2[pi, :])        (exact in float)

Chains with any other reader or writer (Reshape, Transpose, a residual Add with another branch,
Concat, LayerNormalization, a graph output, a shared weight) are left as they are. Each permuted
consumer is marked in its metadata (`qcompile.pairs`: saturating pairs before -> after).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompile import external
from qcompile.analyze import is_depthwise
from qcompile.graph import attr_int as _attr
from qcompile.graph import const_array as _const
from qcompile.plan import PairBound, QuantPlan
from qcompile.weights import pair_channel_axis, quantize_weight

log = logging.getLogger(__name__)
META = "qcompile.pairs"

# Elementwise ops whose every non-constant input carries the chain's channels.
ELEMENTWISE = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
               "Gelu", "Softplus", "Softsign", "Neg", "Abs", "Identity", "Dropout", "Clip", "Mul", "Add", "Sub",
               "Div", "Pow", "Sqrt", "Exp", "Mish", "PRelu", "Max", "Min", "Round", "Floor", "Ceil", "Sign"}
# Ops that keep the channel axis 1 of an NCHW tensor and mix only within a channel.
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample"}
LINEAR = ("Conv", "MatMul", "Gemm")


@dataclasses.dataclass
class Chain:
    """Values that share one channel numbering, and the edits a permutation needs."""

    axis: int  # channel axis: 1 (NCHW, Conv land) or -1 (MatMul land)
    values: set = dataclasses.field(default_factory=set)  # ir.Value ids
    producers: list = dataclasses.field(default_factory=list)  # (node, weight index, axis of the channels)
    consts: list = dataclasses.field(default_factory=list)  # (node, input index, axis of the channels)
    consumers: list = dataclasses.field(default_factory=list)  # (node, weight rows axis)


def _channel_dim(shape: tuple, rank: int, axis: int, c: int) -> int | None | bool:
    """For a constant of `shape` broadcast against a rank-`rank` value: the dim of the constant that
    meets the channel axis (None when it broadcasts, 1), or False when it cannot be permuted."""
    pos = (axis % rank) - (rank - len(shape))  # right-aligned broadcasting
    if pos < 0:
        return None
    if shape[pos] == 1:
        return None
    return pos if shape[pos] == c else False


def _const_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    return tuple(v.const_value.shape) if v is not None and v.const_value is not None else None


def _producer_axis(node: ir.Node, c: int) -> tuple[int, int] | None:
    """(weight index, weight axis of the output channels) of a linear producer writing c channels."""
    w = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None or node.domain != "":
        return None
    if node.op_type == "MatMul" and len(w) == 2 and w[1] == c:
        return 1, 1
    if node.op_type == "Gemm" and len(w) == 2 and not _attr(node, "transA"):
        ax = 0 if _attr(node, "transB") else 1
        return (1, ax) if w[ax] == c else None
    if node.op_type == "Conv" and w[0] == c and _attr(node, "group", 1) == 1:
        return 1, 0
    return None


def _consumer_axis(node: ir.Node, index: int, c: int) -> int | None:
    """Weight axis of the input channels of a linear consumer reading c channels at input `index`."""
    w = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if index != 0 or w is None or node.domain != "":
        return None
    if node.op_type == "MatMul" and len(w) == 2 and w[0] == c:
        return 0
    if node.op_type == "Gemm" and len(w) == 2 and not _attr(node, "transA"):
        ax = 1 if _attr(node, "transB") else 0
        return ax if w[ax] == c else None
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1 and w[1] == c:
        return 1
    return None


def find_chain(x: ir.Value, axis: int, c: int) -> Chain | None:
    """The closed set of values sharing x's channel numbering, or None if it leaks (module doc)."""
    chain = Chain(axis)
    stack, seen_nodes, producers, consumers = [x], set(), set(), set()

    def visit(node: ir.Node) -> bool:
        """Add node's role to the chain; False when the node breaks it."""
        if id(node) in seen_nodes:
            return True
        seen_nodes.add(id(node))
        if node.domain != "":
            return False
        if node.op_type in ELEMENTWISE or (node.op_type == "BatchNormalization" and axis == 1) or \
                (node.op_type in SPATIAL and axis == 1) or (is_depthwise(node) and axis == 1):
            if node.op_type in SPATIAL and node.op_type in ("Resize", "Upsample"):
                pass  # scales/sizes inputs are constants; data is input 0
            data = [0] if node.op_type in SPATIAL or node.op_type == "Conv" else range(len(node.inputs))
            if node.op_type == "BatchNormalization":
                data = [0]
            for i, v in enumerate(node.inputs):
                if v is None:
                    continue
                if i in data and v.const_value is None:
                    stack.append(v)
                    continue
                if node.op_type == "Conv":  # depthwise weights [C, 1, k..] and bias [C]
                    chain.consts.append((node, i, 0))
                    continue
                if node.op_type in SPATIAL:
                    continue  # shape/scale parameters
                a = _const(v)
                if a is None:
                    return False  # a non-constant parameter (e.g. the other branch of an Add) -> leak
                if node.op_type == "BatchNormalization":
                    chain.consts.append((node, i, 0))
                    continue
                rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
                if rank is None:
                    return False
                dim = _channel_dim(a.shape, rank, axis, c)
                if dim is False:
                    return False
                if dim is not None:
                    chain.consts.append((node, i, dim))
            if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                return False
            stack.append(node.outputs[0])
            return True
        return False

    while stack:
        v = stack.pop()
        if id(v) in chain.values:
            continue
        if v.is_graph_output() or v.is_graph_input() or v.shape is None or len(v.shape) < 2:
            return None
        if v.shape[axis] != c:
            return None
        chain.values.add(id(v))
        p = v.producer()
        if p is None:
            return None
        pa = _producer_axis(p, c) if p.op_type in LINEAR else None
        if pa is not None:
            if id(p) not in producers:
                producers.add(id(p))
                chain.producers.append((p, *pa))
                bias = p.inputs[2] if len(p.inputs) > 2 else None
                if bias is not None:
                    b = _const(bias)
                    if b is None or (b.size != 1 and b.shape[-1 if p.op_type == "Gemm" else 0] != c):
                        return None
                    if b.size != 1:
                        chain.consts.append((p, 2, b.ndim - 1 if p.op_type == "Gemm" else 0))
        elif not visit(p):
            return None
        for use in v.uses():
            n = use.node
            ca = _consumer_axis(n, use.idx, c) if n.op_type in LINEAR and not is_depthwise(n) else None
            if ca is not None:
                if id(n) not in consumers:
                    consumers.add(id(n))
                    chain.consumers.append((n, ca))
            elif not visit(n):
                return None
    return chain if chain.producers and chain.consumers else None


def _conflicts(rows: list[np.ndarray], bound: int) -> np.ndarray:
    """C x C: channels i, j would form a saturating pair in some column of some consumer, i.e.
    max_col (a_i + a_j) > bound for a = max(sign * codes, 0), either sign. One of the two codes is
    then above bound / 2, so each column is visited only for its channels above it (vectorized
    over the other channel)."""
    c = rows[0].shape[0]
    bad = np.zeros((c, c), dtype=bool)
    for r in rows:  # r: [C, columns] codes
        for sign in (1, -1):
            a = np.maximum(sign * r, 0)
            large = a > bound // 2
            for col in np.nonzero(large.any(axis=0))[0]:
                v = a[:, col]
                i = np.nonzero(large[:, col])[0]
                bad[i] |= v[None, :] + v[i, None] > bound
    bad |= bad.T
    np.fill_diagonal(bad, False)
    return bad


SAMPLE_CHANNELS = 16
CONFLICT_BUDGET = 2e9  # element operations of `_conflicts` computed without asking `_hopeless` first


def _conflict_cost(rows: list[np.ndarray], bound: int) -> float:
    """Element operations of `_conflicts`: channels x (codes above bound / 2), per sign."""
    return float(sum(r.shape[0] * np.count_nonzero(np.abs(r) > bound // 2) for r in rows))


def _hopeless(rows: list[np.ndarray], bound: int) -> bool:
    """Whether none of SAMPLE_CHANNELS evenly spaced channels has a single compatible partner: the
    channels then (almost) all conflict with each other, the matching can pair almost nothing, and
    `_conflicts` (columns x channels^2 at worst: dense random weights, where every pair of an
    8192-channel layer saturates somewhere) is not worth its cost. Asked only past CONFLICT_BUDGET:
    a sample can miss the few channels that do pair (EfficientNet-Lite0's project convolutions,
    93 -> 88 saturating pairs, are computed exactly)."""
    c = rows[0].shape[0]
    sample = np.unique(np.linspace(0, c - 1, min(SAMPLE_CHANNELS, c)).astype(np.int64))
    ok = np.ones((sample.size, c), dtype=bool)
    for r in rows:
        for sign in (1, -1):
            a = np.maximum(sign * r, 0)
            for k, i in enumerate(sample):
                ok[k] &= ~(a + a[i][None, :] > bound).any(axis=1)
    ok[np.arange(sample.size), sample] = False
    return not ok.any()


def _every_pair_saturates(rows: list[np.ndarray], bound: int) -> bool:
    """Some column has every channel's code above bound / 2 with one sign: every pair of it
    saturates in any order, so no permutation can help there. Checked before `_conflicts`, whose
    cost is columns x channels^2 when most codes are large (a constant weight: onnx's light/
    models fill every weight with one value, and a 9216 x 4096 Gemm took hours)."""
    half = bound // 2
    return any(((r > half).all(axis=0) | (r < -half).all(axis=0)).any() for r in rows)


def pairing(bad: np.ndarray) -> np.ndarray:
    """An order of the channels whose pairs (2i, 2i+1) avoid `bad` where it can (module doc)."""
    c = bad.shape[0]
    degree = bad.sum(axis=1)
    free = np.ones(c, dtype=bool)
    pairs: list[list[int]] = []
    unmatched: list[int] = []
    single = int(np.argmax(degree)) if c % 2 else None  # odd: the hardest channel pairs with padding
    if single is not None:
        free[single] = False
    for i in np.argsort(-degree, kind="stable"):
        if not free[i]:
            continue
        free[i] = False
        ok = np.nonzero(free & ~bad[i])[0]
        if ok.size:
            j = int(ok[np.argmax(degree[ok])])
            free[j] = False
            pairs.append([int(i), j])
        else:
            unmatched.append(int(i))
    # repair: an unmatched u takes a partner j from a pair (j, k) whose k fits another unmatched v
    while len(unmatched) >= 2:
        u = unmatched.pop()
        for p in pairs:
            j, k = p
            for a, b in ((j, k), (k, j)):
                if not bad[u, a]:
                    v = next((v for v in unmatched if not bad[v, b]), None)
                    if v is not None:
                        unmatched.remove(v)
                        p[:] = [u, a]
                        pairs.append([v, b])
                        break
            else:
                continue
            break
        else:
            unmatched.insert(0, u)
            break
    order = [i for p in pairs for i in p] + unmatched + ([single] if single is not None else [])
    return np.asarray(order, dtype=np.int64)


def _violations(rows: list[np.ndarray], order: np.ndarray, bound: int) -> int:
    n = 0
    for r in rows:
        r = r[order]
        if r.shape[0] % 2:
            r = r[:-1]
        a, b = r[0::2], r[1::2]
        n += int(np.sum((a * b > 0) & (np.abs(a + b) > bound)))
    return n


class PairPermutationPass(ir.passes.InPlacePass):
    """Permute channel chains feeding pair-bounded int8 weights (see the module doc)."""

    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def __repr__(self) -> str:
        return "PairPermutationPass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        done: set[int] = set()
        changed = False
        for name, np_ in self.plan.nodes.items():
            node, wq = nodes.get(name), np_.inputs.get(1)
            if node is None or wq is None or wq.spec.pairs is None or wq.spec.pairs.axis is None or id(node) in done:
                continue
            if META in node.metadata_props:
                continue  # permuted before (second run)
            x = node.inputs[0]
            axis = 1 if node.op_type == "Conv" else -1
            if x is None or x.shape is None or not isinstance(x.shape[axis], int):
                continue
            chain = find_chain(x, axis, x.shape[axis])
            if chain is None:
                continue
            done.update(id(n) for n, _ in chain.consumers)
            changed |= self._permute(chain, nodes)
        return ir.passes.PassResult(model, modified=changed)

    def _rows(self, node: ir.Node, rows_axis: int) -> tuple[np.ndarray, PairBound] | None:
        """The consumer's planned codes as [channels, columns] (taps folded into columns)."""
        np_ = self.plan.nodes.get(node.name)
        wq = np_.inputs.get(1) if np_ is not None else None
        if wq is None or wq.role != "weight" or wq.spec.pairs is None or wq.spec.pairs.axis is None:
            return None
        tensor = node.inputs[1].const_value
        spec = dataclasses.replace(wq.spec, pairs=None)
        q = quantize_weight(tensor.numpy(), spec).codes.astype(np.int16)  # |a + b|, a * b of int8 codes fit int16
        external.drop_pages(tensor)  # a memory-mapped weight: its pages are not needed until InsertQDQPass
        return np.moveaxis(q, rows_axis, 0).reshape(q.shape[rows_axis], -1), wq.spec.pairs

    def _permute(self, chain: Chain, nodes) -> bool:
        """Pair the chain's channels for its pair-bounded consumers (float or unbounded consumers
        only follow the permutation); False when nothing improves."""
        rows, bounds, bounded = [], set(), []
        for node, ax in chain.consumers:
            if node.op_type == "Conv" and len(node.inputs[1].const_value.shape) > 3 and node.inputs[1].shape[1] % 2:
                return False  # odd channel count with taps: pairs run across taps, not channels
            r = self._rows(node, ax)
            if r is not None:
                rows.append(r[0])
                bounds.add(r[1].bound)
                bounded.append(node)
        if not rows:
            return False
        bound = min(bounds)
        natural = np.arange(rows[0].shape[0])
        before = _violations(rows, natural, bound)
        if before == 0:
            return False
        if _every_pair_saturates(rows, bound):
            log.debug("pair permutation skipped: a column saturates every pair whatever the order")
            return False
        if _conflict_cost(rows, bound) > CONFLICT_BUDGET and _hopeless(rows, bound):
            log.debug("pair permutation skipped: no sampled channel has a compatible partner")
            return False
        order = pairing(_conflicts(rows, bound))
        after = _violations(rows, order, bound)
        if after >= before:
            return False
        edits = [(n, i, ax) for n, i, ax in chain.producers] + chain.consts + [(n, 1, ax) for n, ax in chain.consumers]
        if any(len(n.inputs[i].uses()) > 1 or n.inputs[i].is_graph_input() for n, i, _ in edits):
            log.debug("pair permutation skipped: a weight or constant of the chain is shared")
            return False
        for n, i, ax in edits:  # file-backed weights stay so (`external.derived`)
            v = n.inputs[i]
            v.const_value = external.derived(v.const_value, lambda a, ax=ax: np.take(a, order, axis=ax), v.name)
        for n in bounded:
            n.metadata_props[META] = f"permuted: {before} -> {after} saturating pairs"
        log.debug("pair permutation of %d channels: %d -> %d saturating pairs (%s)", len(order), before, after,
                  ", ".join(n.name for n in bounded))
        return True


__all__ = ["PairPermutationPass", "find_chain", "pairing", "pair_channel_axis"]
