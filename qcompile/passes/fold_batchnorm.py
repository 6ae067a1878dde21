"""Fold inference BatchNormalization into the preceding Conv.

Before:  y = BatchNormalization(Conv(x, W, b), gamma, beta, mean, var, eps)
After:   y = Conv(x, W', b'),  with per output channel c
         k_c = gamma_c / sqrt(var_c + eps),  W'_c = W_c * k_c,  b'_c = (b_c - mean_c) * k_c + beta_c

Exact up to float rounding. Skipped (logged) when the Conv output has other consumers, when any
parameter is not a constant, or when BatchNormalization is in training mode. A weight shared with
another node is cloned, never modified in place.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.graph import drop_unused_initializers, initializer

log = logging.getLogger(__name__)


class FoldBatchNormPass(ir.passes.InPlacePass):
    def __repr__(self) -> str:
        return "FoldBatchNormPass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain != "":
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            reason = _why_not(bn, conv)
            if reason:
                log.debug("not folding %s: %s", bn.name, reason)
                continue
            gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
            eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
            k = gamma / np.sqrt(var + eps)
            w = conv.inputs[1].const_value.numpy().astype(np.float64)
            cout = w.shape[0]
            b = conv.inputs[2].const_value.numpy().astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros(cout)
            new_w = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
            new_b = ((b - mean) * k + beta).astype(np.float32)
            wname = f"{conv.inputs[1].name}_bnfold_{conv.name}"
            wv = initializer(graph, wname, new_w)
            bv = initializer(graph, f"{conv.name}_bias_bnfold", new_b)
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            conv.replace_input_with(1, wv)
            conv.replace_input_with(2, bv)
            name = bn.outputs[0].name
            was_output = bn.outputs[0].is_graph_output()
            bn.outputs[0].replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
            if was_output:
                old = bn.outputs[0]
                old.name = None
                out = conv.outputs[0]
                out.name = name  # the graph output keeps its name (and its declared type)
                out.dtype = out.dtype or old.dtype
                out.shape = out.shape or old.shape
            graph.remove(bn, safe=True)
            folded += 1
        if folded:
            drop_unused_initializers(graph, recursive=False)
        return ir.passes.PassResult(model, modified=folded > 0)


def _why_not(bn: ir.Node, conv: ir.Node | None) -> str | None:
    if conv is None or conv.op_type != "Conv" or conv.domain != "":
        return "input is not produced by a Conv"
    if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
        return "training-mode outputs are used"
    if bn.attributes.get("training_mode") is not None and bn.attributes["training_mode"].as_int():
        return "training mode"
    if len(list(conv.outputs[0].uses())) != 1 or conv.outputs[0].is_graph_output():
        return "Conv output has other consumers"
    params = list(bn.inputs[1:5]) + [conv.inputs[1]] + ([conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] is not None else [])
    if any(p is None or p.const_value is None for p in params):
        return "a parameter is not constant"
    return None

