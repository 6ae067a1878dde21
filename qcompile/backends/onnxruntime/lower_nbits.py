"""Lower quantized MatMul/Gemm weights onto onnxruntime's 4-bit MatMulNBits kernels, exactly.

Before:  y = MatMul(x, qcompile.DequantizeMX(packed, e8m0))      (or DequantizeLinear(int4, s, block),
         y = Gemm(x, DQ(W), b)                                    any format with an integer grid)
After:   y = MatMulNBits(x, B_0, s_0) + ... + MatMulNBits(x, B_P-1, s_P-1)  (+ b)

where the element values are small integers v times a power of two u (E2M1: v = 2e in [-12, 12])
written in base-16 digit planes v = sum_j d_j 16**j, B_j the 4-bit digits of plane j and
s_j = scale * u * 16**j (`nbits.py`). B_j and s_j are initializers in MatMulNBits' own layout,
computed at compile time, so a session loads them as stored (no decode subgraph to constant-fold;
the kernel prepacks them as it would any B). With accuracy_level 0 the kernel
computes in float: the output equals x @ dequantize(W) up to float summation order. Level 4
quantizes x to int8 per block inside the kernel: ~4x faster at batch 1, ~5e-3 relative error.

Lowering "native" (opt-in) instead emits one fused `qcompile.native.MatMulFp4` (decode packed
E2M1 + GEMM, `qcompile.native`, C++) for MXFP4 / NVFP4 weights, which also absorbs an MXFP4 /
NVFP4 activation FakeQuant along K (its `act` attribute), and MatMulNBits planes for the rest:

    y = MatMul(qcompile.FakeQuantMX(x), qcompile.DequantizeMX(packed, e8m0))
      -> y = qcompile.native.MatMulFp4(x, codes, scales) <act="mxfp4">

Such a model needs the library registered in its session (`qcompile.native.session_options`).

Which layer gets which kernel is decided in one place, the ordered table of `kernels.py`
(integer activations stay with onnxruntime's QDQ fusions; "function" never rewrites; "integer"
takes every layer MatMulNBits represents exactly; "auto" only those with few digit planes; "native"
prefers the C++ kernels).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile import functions, native
from qcompile.backends.onnxruntime import kernels, nbits
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES, Capabilities
from qcompile.formats import BlockFormat, parse_format
from qcompile.graph import drop_unused_initializers
from qcompile.storage import PackedTensor
from qcompile.stored import FORMAT_KEY, stored_form

log = logging.getLogger(__name__)
LOWERINGS = kernels.LOWERINGS
LAYER_KEY = "qcompile.layer"  # node metadata on an emitted kernel: the MatMul/Gemm it replaced
KERNEL_BYTES_KEY = "qcompile.kernel_bytes"  # ... and the bytes of the initializers it reads


class LowerToMatMulNBitsPass(ir.passes.InPlacePass):
    """Every MatMul/Gemm of the main graph whose weight is decoded from constants goes to the
    kernel `kernels.choose` picks; the weight's stored form is read from the graph
    (`qcompile.stored`), so the pass runs on any saved Q/DQ model. Stateless: what it decides is
    written on the nodes (`kernels.KERNEL_KEY`, `LAYER_KEY`, `KERNEL_BYTES_KEY`)."""

    def __init__(self, lowering: str = "auto", accuracy_level: int = 0, caps: Capabilities = CAPABILITIES) -> None:
        super().__init__()
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
        self.caps = caps
        self.lowering = lowering
        self.accuracy_level = accuracy_level

    def __repr__(self) -> str:
        return f"LowerToMatMulNBitsPass({self.lowering}, accuracy_level={self.accuracy_level})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0  # lowered, or newly recorded, by this call
        for node in list(graph):
            layer = _layer(node, self.caps)
            if layer is None:
                continue
            decision = kernels.choose(layer, self.lowering)
            if decision.kernel.emits:
                self._lower(graph, node, layer.weight, decision)
                count += 1
            elif kernels.recorded(node) != decision.to_json():
                kernels.record(node, decision)
                count += 1
        if count:
            if any(n.domain == nbits.DOMAIN for n in graph):
                model.opset_imports.setdefault(nbits.DOMAIN, 1)
            if any(n.domain == native.DOMAIN for n in graph):
                model.opset_imports.setdefault(native.DOMAIN, native.VERSION)
            graph.sort()
            _drop_dead(graph)
            functions.attach(model)
        return ir.passes.PassResult(model, modified=count > 0)

    def _lower(self, graph: ir.Graph, node: ir.Node, t: PackedTensor, decision: kernels.Decision) -> None:
        name = f"{node.name or node.outputs[0].name}_nbits"
        before = set(graph.initializers)
        if decision.kernel.name == "qcompile.native.MatMulFp4":
            x, act, act_scale = _fused_activation(node.inputs[0])
            y = native.emit_matmul_fp4(graph, x, t, name, act=act, act_tensor_scale=act_scale)
        elif decision.kernel.name == "qcompile.native.MatMulF8":
            y = native.emit_matmul_f8(graph, node.inputs[0], t, name)
        else:
            y = nbits.emit_matmul_nbits(graph, node, node.inputs[0], t, self.accuracy_level, name)
        kernel_node = y.producer()
        kernels.record(kernel_node, decision)
        kernel_node.metadata_props[LAYER_KEY] = node.name
        for key, text in node.metadata_props.items():  # the layer's records follow it
            kernel_node.metadata_props.setdefault(key, text)
        kernel_node.metadata_props[KERNEL_BYTES_KEY] = str(
            sum(graph.initializers[k].const_value.nbytes for k in set(graph.initializers) - before))
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [y, node.inputs[2]], name=f"{name}_bias")
            add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, node.outputs[0].shape
            graph.append(add)
            y = add.outputs[0]
        out = node.outputs[0]
        out_name = out.name
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = None
        y.name = out_name
        y.shape = y.shape or out.shape  # a graph output keeps its declared shape (the input's may be unknown)


def _layer(node: ir.Node, caps) -> kernels.Layer | None:
    """The policy's view of `node` when it is a MatMul / plain Gemm reading a decoded weight."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    p = node.inputs[1].producer()
    if p is None or not (p.op_type == "DequantizeLinear" and p.domain == "" or p.domain == functions.DOMAIN):
        return None
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return None
    t = stored_form(p)
    if t is not None and node.op_type == "Gemm" and _attr(node, "transB"):
        t = t.transposed()
    return kernels.Layer(node, t, caps)


def _fused_activation(x: ir.Value):
    """(input, format, tensor scale) of an MXFP4/NVFP4 FakeQuant on the last axis feeding the
    MatMul, which MatMulFp4 then quantizes itself (`act`); else (x, None, None)."""
    p = x.producer()
    name = p.metadata_props.get(FORMAT_KEY) if p is not None and p.domain == functions.DOMAIN else None
    if name is None or p.op_type not in ("FakeQuantMX", "FakeQuantNVFP4"):
        return x, None, None
    fmt = parse_format(name)
    src = p.inputs[0]
    axis = int(_attr(p, "axis", -1))
    rank = len(src.shape) if src.shape is not None else None
    last = axis == -1 or (rank is not None and axis == rank - 1)
    st = None
    if len(p.inputs) > 1 and p.inputs[1] is not None and p.inputs[1].const_value is not None:
        st = float(np.asarray(p.inputs[1].const_value.numpy()).reshape(()))
    try:
        act = native.act_attribute(fmt if isinstance(fmt, BlockFormat) else None)
    except ValueError:
        act = "none"
    if last and act != "none":
        return src, fmt, st
    return x, None, None


def _attr(node: ir.Node, name: str, default=0):
    a = node.attributes.get(name)
    return a.value if a is not None else default


def _plain_gemm(node: ir.Node) -> bool:
    """Gemm that is x @ W (+ b): no transA, alpha = beta = 1, bias absent or a vector."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    vector_bias = b is None or (b.shape is not None and len(b.shape) == 1)
    return not _attr(node, "transA") and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0 and vector_bias


def _drop_dead(graph: ir.Graph) -> None:
    """Remove the dequantizers nobody reads any more (and their decode chains), then unused initializers."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph)):
            ours = n.op_type == "DequantizeLinear" or n.domain == functions.DOMAIN
            if ours and all(not o.uses() and not o.is_graph_output() for o in n.outputs):
                graph.remove(n, safe=True)
                changed = True
    drop_unused_initializers(graph)


