"""Lower standard Q/DQ graphs to emissions onnxruntime loads and runs exactly as simulated.

FP8 activations. At ENABLE_EXTENDED and above, onnxruntime's QDQ fusions match float8 Q/DQ
pairs as if they were int8 and break the model:
- MatMulIntegerToFloat fusion on DQ(x_fp8) -> MatMul <- DQ(W_fp8): the session fails to load;
- ReluQuantFusion removes Relu before QuantizeLinear(fp8, zero point 0): wrong results
  (negative values survive);
- the Q/DQ drop around Transpose/Reshape/MaxPool leaves those ops on float8 inputs, which have
  no kernels: the session fails to load.
The activation fake-quant of such types is therefore emitted as the identical arithmetic with
no Q/DQ op for the fusions to match:

Before:  y = DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)
After:   y = Mul(Cast(Cast(Div(x, s), to=FP8, saturate=1), to=FLOAT), s)

QuantizeLinear(x, s, 0) for float8 is by definition saturate_cast(x / s) with round-to-nearest-
even, and DequantizeLinear multiplies the exactly representable float8 value by s, so the result
is bit-identical to the simulation. Weights keep their float8 DequantizeLinear (1 byte/element).
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.backends.onnxruntime.capabilities import Capabilities
from qcompile.graph import drop_unused_initializers


class LowerForOnnxruntimePass(ir.passes.InPlacePass):
    def __init__(self, caps: Capabilities) -> None:
        super().__init__()
        self.caps = caps

    def __repr__(self) -> str:
        return "LowerForOnnxruntimePass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewritten = 0
        for q in list(ir.traversal.RecursiveGraphIterator(model.graph)):  # If / Loop / Scan bodies too
            if q.op_type != "QuantizeLinear" or not self._unsafe(q):
                continue
            graph = q.graph
            x, scale = q.inputs[0], q.inputs[1]
            qout = q.outputs[0]
            qtype = _quantized_type(q)
            div = ir.node("Div", [x, scale], name=f"{q.name}_Div")
            cast = ir.node("Cast", [div.outputs[0]], {"to": qtype, "saturate": 1}, name=f"{q.name}_Cast")
            for node, dtype in ((div, ir.DataType.FLOAT), (cast, qtype)):
                node.outputs[0].name = f"{node.name}_out"
                node.outputs[0].dtype, node.outputs[0].shape = dtype, x.shape
            graph.insert_before(q, [div, cast])
            for use in list(qout.uses()):
                dq = use.node
                if dq.op_type != "DequantizeLinear":
                    use.node.replace_input_with(use.idx, cast.outputs[0])
                    continue
                back = ir.node("Cast", [cast.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{dq.name}_Cast")
                back.outputs[0].name = f"{dq.name}_cast"
                back.outputs[0].dtype, back.outputs[0].shape = ir.DataType.FLOAT, qout.shape
                mul = ir.node("Mul", [back.outputs[0], dq.inputs[1]], name=f"{dq.name}_Mul")
                graph.insert_before(dq, [back, mul])
                out = dq.outputs[0]
                name = out.name
                mul.outputs[0].dtype, mul.outputs[0].shape = out.dtype, out.shape
                out.replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
                graph.remove(dq, safe=True)
                mul.outputs[0].name = name
            graph.remove(q, safe=True)
            rewritten += 1
        if rewritten:
            drop_unused_initializers(model.graph)  # the float8 zero points (onnxruntime warns about each)
        return ir.passes.PassResult(model, modified=rewritten > 0)

    def _unsafe(self, q: ir.Node) -> bool:
        """A float8 activation quantizer with zero point 0 (see the module doc)."""
        if q.inputs[0] is None or q.inputs[0].const_value is not None:
            return False
        if _quantized_type(q) not in self.caps.activation_qdq_unsafe:
            return False
        zp = q.inputs[2] if len(q.inputs) > 2 else None
        return zp is None or (zp.const_value is not None and not zp.const_value.numpy().astype("float32").any())


def _quantized_type(q: ir.Node) -> ir.DataType | None:
    """The output type of a QuantizeLinear: its zero point's type, else `output_dtype`, else uint8."""
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    if zp is not None and zp.const_value is not None:
        return zp.const_value.dtype
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    attr = q.attributes.get("output_dtype")
    return ir.DataType(attr.as_int()) if attr is not None and attr.as_int() else ir.DataType.UINT8
