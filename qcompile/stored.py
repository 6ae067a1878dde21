"""A quantized weight's stored form, read back from the graph that holds it.

The inverse of the emitters (`InsertQDQPass._native_weight`, `functions.dequantize`): given the node
that decodes a constant weight, return the `storage.PackedTensor` it decodes, from its initializers
and attributes alone. This is what lets the backend lowering run on a saved Q/DQ model by itself
(`qcompile lower`), with no state carried over from the pass that quantized the weights:

    DequantizeLinear(codes:int4|uint4|int8|uint8|float8*, scale[, zero point 0][, axis][, block_size])
    qcompile.DequantizeFP4(packed, scale)                         E2M1 codes, float32 scales
    qcompile.DequantizeMinifloat(packed, scale, lut) <bits>        any scalar format
    qcompile.DequantizeMX(packed, e8m0 codes, lut) <bits>          OCP MX
    qcompile.DequantizeNVFP4(packed, e4m3 codes, tensor_scale)     NVFP4

The element format of a qcompile op is the one named by the node's `qcompile.format` metadata
(written by the emitter), else the registered format whose code table equals the op's `lut`.
A decoded weight with a nonzero zero point has no stored form (None): the lowering needs zero 0.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import codec
from qcompile.formats import FORMATS, BlockFormat, FloatFormat, Format, IntFormat, parse_format
from qcompile.storage import PackedTensor, from_scalar

FORMAT_KEY = "qcompile.format"  # node metadata: the canonical name of the format a node decodes / quantizes
_BY_DTYPE = {f.onnx_dtype: f for f in reversed(FORMATS.values())
             if not isinstance(f, BlockFormat) and getattr(f, "onnx_dtype", None) is not None and not getattr(f, "frac_bits", 0)}


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _format(node: ir.Node, lut: np.ndarray | None, block: bool) -> Format | None:
    name = node.metadata_props.get(FORMAT_KEY)
    if name is not None:
        return parse_format(name)
    if lut is None:
        return None
    for f in FORMATS.values():
        element = f.element if isinstance(f, BlockFormat) else f
        if isinstance(f, BlockFormat) != block or element.bits > 8 or len(lut) != 2**element.bits:
            continue
        if block and f.tensor_scale is not None:
            continue
        if np.array_equal(codec.decode(np.arange(2**element.bits), element), lut, equal_nan=True):
            return f
    return None


def stored_form(node: ir.Node | None) -> PackedTensor | None:
    """The PackedTensor `node` decodes, or None (not a decoder of constants, or not representable)."""
    if node is None:
        return None
    if node.domain == "" and node.op_type == "DequantizeLinear":
        return _dequantize_linear(node)
    if node.domain != "qcompile" or not node.op_type.startswith("Dequantize"):
        return None
    ins = [_const(v) for v in node.inputs]
    if any(a is None for a in ins):
        return None
    shape = tuple(int(d) for d in _attr(node, "shape", ()))
    axis, block = int(_attr(node, "axis", 0)), int(_attr(node, "block_size", 1))
    op = node.op_type
    if op == "DequantizeNVFP4":
        fmt = _format(node, None, True) or FORMATS["nvfp4"]
        packed, scale, tensor_scale = ins
        codes = codec.unpack(packed, 4, int(np.prod(shape))).reshape(shape)
        return PackedTensor(fmt, codes, np.asarray(scale).view(np.uint8), axis, block, float(tensor_scale))
    if op == "DequantizeFP4":
        fmt = _format(node, None, False) or FORMATS["e2m1"]
        packed, scale = ins
        return PackedTensor(fmt, codec.unpack(packed, 4, int(np.prod(shape))).reshape(shape),
                            np.asarray(scale, np.float32), axis, block)
    if op in ("DequantizeMX", "DequantizeMinifloat"):
        packed, scale, lut = ins
        fmt = _format(node, lut, op == "DequantizeMX")
        if fmt is None:
            return None
        bits = int(_attr(node, "bits"))
        codes = codec.unpack(packed, bits, int(np.prod(shape))).reshape(shape)
        scale = np.asarray(scale, np.uint8) if op == "DequantizeMX" else np.asarray(scale, np.float32)
        return PackedTensor(fmt, codes, scale, axis, block)
    return None


def _dequantize_linear(node: ir.Node) -> PackedTensor | None:
    codes_v = node.inputs[0]
    codes, scale = _const(codes_v), _const(node.inputs[1] if len(node.inputs) > 1 else None)
    if codes is None or scale is None or codes.ndim == 0:
        return None
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if zp is not None and np.any(zp.astype(np.float64) != 0):
        return None
    fmt = _format(node, None, False) or _BY_DTYPE.get(codes_v.const_value.dtype)
    if not isinstance(fmt, (IntFormat, FloatFormat)):
        return None
    axis = None if scale.ndim == 0 else _attr(node, "axis", 1)  # ONNX's default axis is 1
    block = _attr(node, "block_size", 0) or None
    return from_scalar(codes, scale.astype(np.float32), fmt, axis, block)
