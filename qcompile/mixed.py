"""Mixed precision (target "auto"): the measured candidate table of a model, and the plan the
ILP of `qcompile.allocate` picks from it.

1. Candidates: each candidate target's default plan of the graph (`analyze.make_plan`), plus
   float. Layer i may take candidate c where c's plan quantizes i.
2. Calibrated together: one pass over the calibration data fills every candidate's histograms
   (a value's histogram serves every format; the clip search is per format), and the input
   means bias correction needs (the stage in `qcompile.stages`).
3. Sensitivity s[i, c]: the output noise / signal (the worst output's; `restore.Simulator`) with
   only layer i quantized as c, its bias corrected as the compile would, against the float
   model on calibration samples (never the held-out data validation uses); float: 0.
4. Cost "weight_bits"[i, c]: the stored bits of i's weight under c's spec (elements, scales and
   zero points: `stored_bits`); float: the weight's own dtype. fixed["weight_bits"] is every
   other stored tensor, so --budget-mb bounds the whole model.
5. Ties: the layers whose candidates quantize the same activation value share its activation
   spec (`activation_label`: format, symmetry, method): one quantizer per value.
6. `merge`: each layer's node plan from its chosen candidate's plan.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile.allocate import FLOAT, WEIGHT_BITS, Table
from qcompile.formats import BlockFormat
from qcompile.plan import NodePlan, PerBlock, PerChannel, QuantPlan, QuantSpec

SCALE_BITS = 32  # a scalar format's scales are stored in float32 (MatMulNBits, DequantizeLinear of a float model)


def stored_bits(spec: QuantSpec, shape: tuple[int, ...]) -> float:
    """Bits a weight of `shape` takes stored under `spec`: its elements, one float32 scale per
    tensor / channel / block (a block format's own scale codes and tensor scale instead), a zero
    point of the element's width per scale when asymmetric."""
    n = math.prod(shape)
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        return n * fmt.bits_per_element + (32 if fmt.tensor_scale is not None else 0)
    g = spec.granularity
    scales = shape[g.axis] if isinstance(g, PerChannel) else math.ceil(n / g.size) if isinstance(g, PerBlock) else 1
    return n * fmt.bits + scales * (SCALE_BITS + (0 if spec.symmetric else fmt.bits))


def activation_label(node: NodePlan | None) -> str:
    """The activation quantizers of a node plan as one label ("float" when none): layers reading
    one value must agree on it."""
    if node is None:
        return FLOAT
    acts = [q.spec for q in [*node.inputs.values(), *([node.output] if node.output else [])] if q.role == "activation"]
    return ",".join(sorted({f"{s.format}/{'sym' if s.symmetric else 'asym'}/{s.method.value}" for s in acts})) or FLOAT


def build_table(graph: ir.Graph, plans: dict[str, QuantPlan], sensitivity: dict[tuple[str, str], float],
                other_bits: float, meta: dict) -> Table:
    """The candidate table (see the module doc) of the layers any candidate plans, candidates
    float first, then `plans` in order; `sensitivity` maps (layer, candidate) -> s."""
    names = [FLOAT, *plans]
    layers = sorted({n for p in plans.values() for n in p.nodes})
    nodes = {n.name: n for n in graph}
    sens = np.full((len(layers), len(names)), np.inf)
    bits = np.zeros_like(sens)
    params = []
    for i, layer in enumerate(layers):
        node = nodes[layer]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        w = w if w is not None and w.const_value is not None else None
        shape = tuple(w.const_value.shape) if w is not None else ()
        params.append(math.prod(shape) if w is not None else 0)
        float_bits = params[-1] * w.const_value.dtype.itemsize * 8 if w is not None else 0
        sens[i, 0], bits[i, 0] = 0.0, float_bits
        for j, c in enumerate(plans, start=1):
            np_ = plans[c].nodes.get(layer)
            if np_ is None:
                continue
            sens[i, j] = sensitivity[(layer, c)]
            wq = np_.inputs.get(1)
            bits[i, j] = stored_bits(wq.spec, shape) if wq is not None and wq.role == "weight" and w is not None else float_bits
    # a candidate's activation policy is the same on every layer it plans: one label per candidate
    cand_label = [FLOAT] + [next((activation_label(p.nodes[n]) for n in p.nodes), FLOAT) for p in plans.values()]
    readers: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for p in plans.values():
            np_ = p.nodes.get(layer)
            for q in ([*np_.inputs.values(), *([np_.output] if np_.output else [])] if np_ else []):
                if q.role == "activation" and i not in readers.setdefault(q.value, []):
                    readers[q.value].append(i)
    ties = [("activation", sorted(g)) for g in readers.values() if len(g) > 1]
    meta = {**meta, "params": params}
    return Table(layers, names, sens, {WEIGHT_BITS: bits}, {"activation": cand_label}, ties, {WEIGHT_BITS: other_bits}, meta)


def merge(plans: dict[str, QuantPlan], table: Table, choice) -> QuantPlan:
    """The plan with each layer's node plan from its chosen candidate (float: left out)."""
    nodes = {}
    for i, c in enumerate(choice):
        name = table.candidates[c]
        if name != FLOAT:
            nodes[table.layers[i]] = plans[name].nodes[table.layers[i]]
    return QuantPlan("auto", nodes)
