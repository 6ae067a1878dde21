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
        if opset < self.min_opset:
            log.info("upgrading opset %d -> %d", opset, self.min_opset)
            onnxscript.version_converter.convert_version(model, self.min_opset)
            if model.opset_imports.get("") != self.min_opset:
                raise PreconditionError(f"could not upgrade opset {opset} to {self.min_opset}")
        common.NameFixPass()(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        onnxscript.optimizer.fold_constants(model, input_size_limit=1 << 24, output_size_limit=1 << 24)
        common.RemoveUnusedNodesPass()(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.ShapeInferencePass()(model)
        _name_nodes(model.graph)
        return ir.passes.PassResult(model, modified=True)


def _name_nodes(graph: ir.Graph) -> None:
    """Unique, stable names for unnamed or duplicate nodes: `<op_type>_<index>`."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
