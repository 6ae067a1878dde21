"""Fold the weights a model makes with ConstantOfShape into initializers.

Before:  W = ConstantOfShape(shape)  [shape a constant, value c]    y = Conv(x, W, ...)
After:   W = initializer full(shape, c)                              y = Conv(x, W, ...)

Exact. onnx's light/ test models (weights stripped to keep the files small) and exporters that
zero-initialize parameters make weights this way; onnxscript's constant folder keeps
ConstantOfShape on purpose (model size), which leaves those weights non-constant: the analysis
then sees activation x activation products, calibrates the weights as activations (a cost
proportional to their size) and `w4` finds no weight. Only a float ConstantOfShape whose every
consumer takes it as a parameter is folded: input >= 1 of Conv / ConvTranspose / MatMul / Gemm
(stored quantized afterwards, so the output model does not grow) or of BatchNormalization (folded
into the Conv next). A ConstantOfShape feeding anything else (a mask, a state) stays.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

PARAMETER_USES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "BatchNormalization")


def _parameter_only(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and not value.is_graph_output() and all(
        u.node.domain in ("", "ai.onnx") and u.node.op_type in PARAMETER_USES and u.idx >= 1 for u in uses)


class FoldConstantOfShapePass(ir.passes.InPlacePass):
    def __repr__(self) -> str:
        return "FoldConstantOfShapePass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
                continue
            shape, out = node.inputs[0], node.outputs[0]
            value = node.attributes.get("value")
            fill = value.as_tensor().numpy().reshape(-1) if value is not None else np.zeros(1, np.float32)
            if shape is None or shape.const_value is None or fill.dtype.kind != "f" or not _parameter_only(out):
                log.debug("not folding %s: shape not constant, not float, or not only a parameter", node.name)
                continue
            dims = [int(d) for d in shape.const_value.numpy().reshape(-1)]
            name = out.name
            init = ir.Value(shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.from_numpy(fill.dtype)),
                            const_value=ir.tensor(np.full(dims, fill[0], dtype=fill.dtype), name=name))
            out.replace_all_uses_with(init)
            graph.remove(node, safe=True)
            init.name = name
            graph.register_initializer(init)
            if shape.is_initializer() and not shape.uses() and not shape.is_graph_input():
                graph.initializers.pop(shape.name)
            folded += 1
        if folded:
            log.debug("folded %d ConstantOfShape weights", folded)
        return ir.passes.PassResult(model, modified=folded > 0)
