"""Normalize a model before analysis.

1. Opset: upgrade the default domain to `min_opset` when it is older (onnxscript version
   converter); refuse models newer than the runtime accepts.
2. Names: every node and value gets a unique name (plans address nodes by name).
3. Constants: Constant nodes become initializers, constant subgraphs are folded (onnxscript), so
   weights are visible as constants.
4. Shapes and types: ONNX shape inference, so analysis knows which inputs are float and their rank.
"""
from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
import onnxscript.version_converter

from qcompile.errors import PreconditionError

log = logging.getLogger(__name__)


class NormalizePass(ir.passes.InPlacePass):
    def __init__(self, min_opset: int, max_opset: int) -> None:
        super().__init__()
        self.min_opset = min_opset
        self.max_opset = max_opset

    def __repr__(self) -> str:
        return f"NormalizePass(opset>={self.min_opset})"

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None:
            raise PreconditionError("model imports no default-domain opset")
        if opset > self.max_opset:
            raise PreconditionError(f"model opset {opset} is newer than onnxruntime supports ({self.max_opset})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        modified = False
        if opset < self.min_opset:
            log.info("upgrading opset %d -> %d", opset, self.min_opset)
            onnxscript.version_converter.convert_version(model, self.min_opset)
            if model.opset_imports.get("") != self.min_opset:
                raise PreconditionError(f"could not upgrade opset {opset} to {self.min_opset}")
            modified = True
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
