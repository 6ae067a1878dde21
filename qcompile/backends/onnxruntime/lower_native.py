"""NativeFakeQuantPass: the activation quantizers left as standard or function ops run natively.

With `--lowering native`, LowerToMatMulNBitsPass already folds the MXFP4/NVFP4 quantizer of each
weight MatMul's input into MatMulFp4. The others run as ~150-op qcompile functions (FakeQuantMX,
FakeQuantNVFP4, FakeQuantMinifloat) or, for float8 activations, as the Cast pair that
LowerForOnnxruntimePass emits (onnxruntime's float8 casts take ~10 ns per element). This pass
moves them to the native library's ops of the same name, attributes and values (bit for bit):

    qcompile.FakeQuant*(x, ...) <attrs>                 -> qcompile.native.FakeQuant*(x, ...) <attrs>
    Mul(Cast(Cast(Div(x, s), to=F8, saturate=1), to=FLOAT), s)
                                                        -> qcompile.native.FakeQuantMinifloat(x, s) <grid of F8>

(saturate_cast(x / s) to a float8 type is round_to_grid(x / s) on its grid, ending at +-max), and
drops the function definitions no node uses any more.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import functions, native
from qcompile.formats import FORMATS

# float8 types whose saturating cast is the FakeQuantMinifloat grid of the format (onnxruntime
# casts +-inf to +-max under saturate=1 for E5M2 too; tests/test_native.py checks all four)
_FLOAT8 = {f.onnx_dtype: f for f in (FORMATS["e4m3fn"], FORMATS["e4m3fnuz"], FORMATS["e5m2"], FORMATS["e5m2fnuz"])}


class NativeFakeQuantPass(ir.passes.InPlacePass):
    """Stateless: `modified` counts the quantizers this call moved."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        moved = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == functions.DOMAIN and node.op_type in native.FAKE_QUANT_OPS:
                node.domain = native.DOMAIN
                moved += 1
        for node in list(model.graph):
            match = _float8_cast_pair(node)
            if match is not None:
                _replace(model.graph, node, *match)
                moved += 1
        modified = moved > 0
        if modified:
            model.opset_imports.setdefault(native.DOMAIN, native.VERSION)
            functions.attach(model)
        return ir.passes.PassResult(model, modified=modified)


def _replace(graph: ir.Graph, mul: ir.Node, x: ir.Value, scale: ir.Value, fmt) -> None:
    """The float8 Cast pair ending at `mul` becomes one native FakeQuantMinifloat."""
    out = mul.outputs[0]
    fq = ir.node("FakeQuantMinifloat", [x, scale], functions.minifloat_attributes(fmt), domain=native.DOMAIN,
                 name=f"{mul.name}_fq")
    fq.outputs[0].dtype, fq.outputs[0].shape = ir.DataType.FLOAT, out.shape
    graph.insert_before(mul, fq)
    name = out.name
    out.replace_all_uses_with(fq.outputs[0], replace_graph_outputs=True)
    out.name = None
    fq.outputs[0].name = name
    chain = [mul]
    while chain:  # the Mul, then any Cast / Div left without readers
        n = chain.pop()
        if n.graph is None or any(o.uses() or o.is_graph_output() for o in n.outputs):
            continue
        producers = [v.producer() for v in n.inputs if v is not None and v.producer() is not None]
        graph.remove(n, safe=True)
        chain.extend(p for p in producers if p.op_type in ("Cast", "Div") and p.domain == "")


def _scalar(v: ir.Value | None) -> float | None:
    if v is None or v.const_value is None or v.const_value.size != 1:
        return None
    return float(np.asarray(v.const_value.numpy(), np.float32).reshape(-1)[0])


def _float8_cast_pair(mul: ir.Node):
    """(x, s, format) when `mul` is Mul(Cast(Cast(Div(x, s), to=F8, saturate=1), to=FLOAT), s)."""
    if mul.op_type != "Mul" or mul.domain != "" or len(mul.inputs) != 2:
        return None
    back, scale = mul.inputs[0].producer() if mul.inputs[0] is not None else None, mul.inputs[1]
    if back is None or back.op_type != "Cast" or back.attributes.get_int("to") != ir.DataType.FLOAT:
        return None
    cast = back.inputs[0].producer()
    if cast is None or cast.op_type != "Cast" or cast.attributes.get_int("saturate", 1) != 1:
        return None
    fmt = _FLOAT8.get(ir.DataType(cast.attributes.get_int("to")))
    div = cast.inputs[0].producer()
    if fmt is None or div is None or div.op_type != "Div":
        return None
    x, s = div.inputs
    value = _scalar(s)  # a constant scalar scale, the same for the division and the multiplication
    if value is None or (s is not scale and _scalar(scale) != value):
        return None
    return x, s, fmt
