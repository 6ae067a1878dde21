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

NativeRotationQuantizePass fuses an online rotation (`passes.rotate`'s native BlockHadamard) with
the per-tensor 8-bit quantizer that reads it, so the rotated float tensor is never written:

    QuantizeLinear(qcompile.native.BlockHadamard(x[, d]), s, z)
                                     -> qcompile.native.BlockHadamardQuantize[S8](x, d | "", s, z)

(uint8 z: BlockHadamardQuantize, int8: ...S8; the same codes, native/hadamard.h). onnxruntime
still fuses the DequantizeLinear -> MatMul after it into its integer kernels.
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


class NativeRotationQuantizePass(ir.passes.InPlacePass):
    """Stateless: `modified` counts the rotations fused with their quantizer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = 0
        for node in list(model.graph):
            if node.domain != native.DOMAIN or node.op_type != "BlockHadamard" or node.outputs[0].is_graph_output():
                continue
            qs = [u.node for u in node.outputs[0].uses()]
            if not qs or not all(_per_tensor_q(q, qs[0]) for q in qs):
                continue
            s, z = qs[0].inputs[1], qs[0].inputs[2]
            op = "BlockHadamardQuantize" if z.const_value.dtype == ir.DataType.UINT8 else "BlockHadamardQuantizeS8"
            d = node.inputs[1] if len(node.inputs) > 1 else None
            new = ir.node(op, [node.inputs[0], d, s, z], {"block": node.attributes["block"].as_int()},
                          domain=native.DOMAIN, name=f"{node.name}_quantize", metadata_props=dict(node.metadata_props))
            out = qs[0].outputs[0]
            new.outputs[0].dtype, new.outputs[0].shape = z.const_value.dtype, out.shape or node.outputs[0].shape
            model.graph.insert_before(qs[0], new)
            name = out.name
            for q in qs:
                q.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
                q.outputs[0].name = None
            new.outputs[0].name = name
            for q in qs:
                model.graph.remove(q, safe=True)
            model.graph.remove(node, safe=True)
            fused += 1
        if fused:
            model.graph.sort()
        return ir.passes.PassResult(model, modified=fused > 0)


def _per_tensor_q(q: ir.Node, first: ir.Node) -> bool:
    """q is a standard QuantizeLinear with a constant scalar scale and uint8/int8 zero point, the
    same as `first`'s."""
    if q.op_type != "QuantizeLinear" or q.domain != "" or len(q.inputs) < 3 or q.inputs[2] is None:
        return False
    z = q.inputs[2].const_value
    if _scalar(q.inputs[1]) is None or z is None or z.size != 1 or z.dtype not in (ir.DataType.UINT8, ir.DataType.INT8):
        return False
    same = q is first or (_scalar(q.inputs[1]) == _scalar(first.inputs[1]) and z.dtype == first.inputs[2].const_value.dtype
                          and int(z.numpy().reshape(-1)[0]) == int(first.inputs[2].const_value.numpy().reshape(-1)[0]))
    return same and not (q.attributes.get("output_dtype") and q.attributes.get_int("output_dtype") not in (0, z.dtype))


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
