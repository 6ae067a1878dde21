"""Compute in float32 what a float16 / bfloat16 model computes in its own type; keep its interface.

qcompile's analysis, calibration and quantizers work on float32 values, onnxruntime's integer QDQ
fusions need float32 scales, and its CPU provider has few float16 kernels (it wraps the others in
Casts to float32) and no bfloat16 ones (a bfloat16 Relu does not load). So a half-precision model
is quantized from its float32 equivalent, which computes the same function more exactly:

Before:  x:fp16 -> Conv(x, W:fp16) -> ... -> Cast(to=fp16) -> y:fp16
After:   x:fp16 -> Cast(to=float) -> Conv(., W:float) -> ... -> Cast(to=float) -> Cast(to=fp16) -> y:fp16

- every float16 / bfloat16 initializer becomes float32 (exact), and every value of those types,
  in the main graph and in If / Loop / Scan bodies, becomes float32;
- type attributes follow: `to` / `dtype` naming float16 or bfloat16 (Cast, EyeLike, Random*, ...)
  name float32, and tensor attributes (Constant, ConstantOfShape values) are converted;
- graph inputs and outputs keep their types: a half-precision input is read through a Cast to
  float32, a half-precision output is a Cast of the float32 value (under the output's name).
  bfloat16 ones are float32 while qcompile runs the model (onnxruntime's Python API takes and
  returns no bfloat16 arrays) and get their Casts from `HalfInterfacePass` after validation, so
  validation measures all but the final rounding of the outputs to bfloat16 (~2**-9 relative).

`StoreHalfPass` runs after quantization: the weights left in float go back to the source type in
the file, read through a Cast that onnxruntime folds at load, so the float parts of the output are
no larger than in the input. Model-local functions are inlined before this pass runs.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_TYPE_ATTRS = ("to", "dtype")


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    return [graph] + [a.as_graph() for n in ir.traversal.RecursiveGraphIterator(graph) for a in n.attributes.values()
                      if a.type == ir.AttributeType.GRAPH]


def _float32(t: ir.TensorProtocol, name: str | None = None) -> ir.Tensor:
    return ir.tensor(t.numpy().astype(np.float32), name=name if name is not None else t.name)


SOURCE_TYPE_KEY = "qcompile.source_float_type"  # model metadata: the half type most weights had
INTERFACE_KEY = "qcompile.half_interface"  # model metadata: JSON [[kind, name, type], ...] for HalfInterfacePass


def source_type(model: ir.Model) -> ir.DataType | None:
    """The half type PromoteFloatPass found most weights in (None: the model was not half precision)."""
    name = model.metadata_props.get(SOURCE_TYPE_KEY)
    return None if name is None else ir.DataType[name]


def interface(model: ir.Model) -> list[tuple[str, str, ir.DataType]]:
    """The (kind, name, type) of the inputs/outputs PromoteFloatPass left float32 for now."""
    return [(k, n, ir.DataType(t)) for k, n, t in json.loads(model.metadata_props.get(INTERFACE_KEY, "[]"))]


class PromoteFloatPass(ir.passes.InPlacePass):
    """Stateless: the source type and the interface left float32 are written to the model's metadata
    (`source_type`, `interface` read them; `StoreHalfPass` and `HalfInterfacePass` use them)."""

    def __init__(self, keep: tuple[ir.DataType, ...] = (ir.DataType.FLOAT16,)) -> None:
        super().__init__()
        self.keep = keep  # interface types kept through the whole compile (onnxruntime takes numpy float16)

    def __repr__(self) -> str:
        return "PromoteFloatPass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        changed = 0
        promoted: list[ir.DataType] = []
        left = interface(model)
        # a kept-type input already read through Casts to float32, or output already a Cast of a float32
        # value (a first run's work, or the source's own), needs no boundary Cast
        boundary_in = [v for v in main.inputs if v.dtype in HALF and not v.is_initializer()
                       and not (v.dtype in self.keep and _read_as_float_already(v))]
        boundary_out = [(k, v, v.dtype) for k, v in enumerate(main.outputs) if v.dtype in HALF
                        and not (v.dtype in self.keep and _written_as_already(v))]
        for g in _graphs(main):
            for name, v in g.initializers.items():
                if v.dtype in HALF and v.const_value is not None:
                    promoted.append(v.dtype)
                    v.const_value = _float32(v.const_value)
                    v.dtype = ir.DataType.FLOAT
                    changed += 1
            for v in g.inputs:
                if v.dtype in HALF and g is not main:
                    v.dtype = ir.DataType.FLOAT
                    changed += 1
        kept_casts = {id(v.producer()) for v in main.outputs if v.dtype in self.keep and _written_as_already(v)}
        for node in ir.traversal.RecursiveGraphIterator(main):
            if id(node) in kept_casts:  # an output Cast a first run wrote: it stays half
                continue
            changed += _promote_attributes(node)
            for o in node.outputs:
                if o.dtype in HALF:
                    o.dtype = ir.DataType.FLOAT
                    changed += 1
        for x in boundary_in:
            if x.dtype in self.keep:
                _read_as_float(main, x)
            else:
                left.append(("input", x.name, x.dtype))
                x.dtype = ir.DataType.FLOAT
        for k, v, src in boundary_out:
            if src in self.keep:
                _write_as(main, k, src)
            else:
                left.append(("output", v.name, src))
        if promoted and SOURCE_TYPE_KEY not in model.metadata_props:
            model.metadata_props[SOURCE_TYPE_KEY] = max(set(promoted), key=promoted.count).name
        if left:
            model.metadata_props[INTERFACE_KEY] = json.dumps([[k, n, int(t)] for k, n, t in left])
        return ir.passes.PassResult(model, modified=changed + len(boundary_in) + len(boundary_out) > 0)


def _read_as_float_already(x: ir.Value) -> bool:
    """Whether every reader of input x is a Cast to float32 (`_read_as_float` ran: a second run adds none)."""
    uses = list(x.uses())
    return bool(uses) and all(u.node.op_type == "Cast" and u.node.domain == "" and u.node.attributes.get_int("to") == ir.DataType.FLOAT
                              for u in uses)


def _written_as_already(v: ir.Value) -> bool:
    """Whether graph output v is a Cast of a float32 value (`_write_as` ran)."""
    p = v.producer()
    return (p is not None and p.op_type == "Cast" and p.domain == "" and p.inputs[0] is not None
            and p.inputs[0].dtype == ir.DataType.FLOAT)


def _read_as_float(graph: ir.Graph, x: ir.Value) -> None:
    """Input x keeps its type; its readers read Cast(x, to=FLOAT)."""
    uses = list(x.uses())
    cast = ir.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{x.name}_to_float")
    y = cast.outputs[0]
    y.name, y.dtype, y.shape = f"{x.name}_float", ir.DataType.FLOAT, x.shape
    for use in uses:
        use.node.replace_input_with(use.idx, y)
    graph.insert_before(graph.node(0), cast) if len(graph) else graph.append(cast)


def _write_as(graph: ir.Graph, k: int, dtype: ir.DataType) -> None:
    """Graph output k (a float32 value) becomes Cast(., to=dtype) under the same name."""
    v = graph.outputs[k]
    name = v.name
    v.name, v.dtype = f"{name}_float", ir.DataType.FLOAT
    cast = ir.node("Cast", [v], {"to": dtype}, name=f"{name}_to_{dtype.name.lower()}")
    cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, dtype, v.shape
    graph.append(cast)
    graph.outputs[k] = cast.outputs[0]


class HalfInterfacePass(ir.passes.InPlacePass):
    """Give the model back the interface types PromoteFloatPass left float32 (`interface`: (kind,
    name, type) records), through the same boundary Casts."""

    def __init__(self, interface: list[tuple[str, str, ir.DataType]]) -> None:
        super().__init__()
        self.interface = interface

    def __repr__(self) -> str:
        return f"HalfInterfacePass({len(self.interface)} values)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: k for k, v in enumerate(graph.outputs)}
        done = 0
        for kind, name, dtype in self.interface:
            if kind == "input" and name in inputs and inputs[name].dtype == ir.DataType.FLOAT:
                inputs[name].dtype = dtype
                _read_as_float(graph, inputs[name])
                done += 1
            elif kind == "output" and name in outputs and graph.outputs[outputs[name]].dtype == ir.DataType.FLOAT:
                _write_as(graph, outputs[name], dtype)
                done += 1
        return ir.passes.PassResult(model, modified=done > 0)


def _promote_attributes(node: ir.Node) -> int:
    changed = 0
    for name, attr in list(node.attributes.items()):
        if attr.type == ir.AttributeType.INT and name in _TYPE_ATTRS and attr.as_int() in HALF:
            node.attributes[name] = ir.AttrInt64(name, int(ir.DataType.FLOAT))
            changed += 1
        elif attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in HALF:
            node.attributes[name] = ir.AttrTensor(name, _float32(attr.as_tensor()))
            changed += 1
    return changed


class StoreHalfPass(ir.passes.InPlacePass):
    """Store the float32 weights of a model that was half precision in its source type `dtype`
    again, read through a Cast: W:float -> Cast(W:fp16, to=float). Weights are the initializers
    that only default-domain float ops read (not Q/DQ scales, nor inputs of qcompile or
    com.microsoft ops, which need float32); folded or corrected ones included, so their rounding
    to `dtype` is part of what validation measures."""

    def __init__(self, dtype: ir.DataType) -> None:
        super().__init__()
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"StoreHalfPass({self.dtype.name})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = 0
        tag = self.dtype.name.lower()
        for g in _graphs(model.graph):
            for name, v in list(g.initializers.items()):
                if v.dtype != ir.DataType.FLOAT or v.const_value is None or v.is_graph_output() or not _weight_uses(v):
                    continue
                half = ir.Value(name=f"{name}_{tag}", shape=v.shape, type=ir.TensorType(self.dtype),
                                const_value=ir.tensor(v.const_value.numpy().astype(self.dtype.numpy()), name=f"{name}_{tag}"))
                cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=f"{name}_Cast")
                g.register_initializer(half)
                v.replace_all_uses_with(cast.outputs[0])
                del g.initializers[name]
                cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, ir.DataType.FLOAT, v.shape
                g.insert_before(g.node(0), cast) if len(g) else g.append(cast)
                changed += 1
        return ir.passes.PassResult(model, modified=changed > 0)


def _weight_uses(v: ir.Value) -> bool:
    uses = list(v.uses())
    return bool(uses) and all(u.node.domain == "" and u.node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast")
                              for u in uses)
