"""Normalize a model before analysis.

1. Opset: upgrade the default domain to `min_opset` when it is older (`ConvertOpsetPass`: onnx's
   C++ version converter; the pipeline runs it first, verified on calibration inputs); refuse models
   newer than the runtime accepts.
2. Initializers that are also graph inputs (IR < 4 exports list every weight as an input; later
   ones use it for overridable defaults) become plain constants: the input is dropped, so passes
   that replace or remove a weight never leave a required input with no value, and the weights
   are constants to quantize and fold.
3. Names: every node and value gets a unique name (plans address nodes by name).
4. Constants: Constant nodes become initializers, constant subgraphs are folded (onnxscript), so
   weights are visible as constants.
5. Shapes and types: ONNX shape inference, so analysis knows which inputs are float and their rank.
"""
from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from qcompile.passes.convert_opset import ConvertOpsetPass, pop_record

log = logging.getLogger(__name__)


class NormalizePass(ir.passes.InPlacePass):
    def __init__(self, min_opset: int, max_opset: int) -> None:
        super().__init__()
        self.min_opset = min_opset
        self.max_opset = max_opset

    def __repr__(self) -> str:
        return f"NormalizePass(opset>={self.min_opset})"

    def requires(self, model: ir.Model) -> None:
        ConvertOpsetPass(self.min_opset, self.max_opset).requires(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = ConvertOpsetPass(self.min_opset, self.max_opset)(model).modified
        pop_record(model)  # unverified here; the pipeline converts (and verifies) before this pass
        modified |= _fold_initializer_inputs(model.graph)
        lift = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
        for p in (common.NameFixPass(), lift):
            modified |= p(model).modified
        modified |= onnxscript.optimizer.fold_constants(model, input_size_limit=1 << 24, output_size_limit=1 << 24).modified
        for p in (common.RemoveUnusedNodesPass(), lift):
            modified |= p(model).modified
        before = _type_signature(model.graph)
        common.ShapeInferencePass()(model)
        modified |= _type_signature(model.graph) != before
        modified |= _name_nodes(model.graph)
        return ir.passes.PassResult(model, modified=modified)


def _fold_initializer_inputs(graph: ir.Graph) -> bool:
    """Drop the graph inputs that are initializers (the values stay, as constants). True if any."""
    keep = [v for v in graph.inputs if not v.is_initializer()]
    if len(keep) == len(graph.inputs):
        return False
    log.info("%d initializers listed as graph inputs become constants", len(graph.inputs) - len(keep))
    graph.inputs.clear()
    graph.inputs.extend(keep)
    return True


def _type_signature(graph: ir.Graph) -> list:
    return [(o.dtype, None if o.shape is None else tuple(str(d) for d in o.shape)) for n in graph for o in n.outputs]


def _name_nodes(graph: ir.Graph) -> bool:
    """Unique, stable names for unnamed or duplicate nodes: `<op_type>_<index>`. True if any renamed."""
    seen: set[str] = set()
    renamed = False
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            renamed = True
        seen.add(node.name)
    return renamed
