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

Policy per layer: a layer whose activation arrives through DequantizeLinear (int8/uint8/int16
activations) is left to onnxruntime's integer QDQ fusions. Lowering "function" never rewrites;
"integer" rewrites every layer `nbits.unsupported` accepts; "auto" also requires at most
`caps.nbits_auto_max_planes` planes (1), or `caps.nbits_auto_max_planes_gemv` (2) when the
activation has one row per sample ([batch, K]): each plane is a GEMM of its own, and with many rows
(a transformer's tokens) two planes are slower than the float MatMul the function path folds to.
"native" lowers what MatMulFp4 takes (E2M1 weights with E8M0/E4M3 block scales) and what MatMulF8
takes (E4M3FN/E5M2 weights with a scale per column) to them, and the rest as "auto".
"""
from __future__ import annotations

import logging

import onnx_ir as ir

from qcompile import functions, native
from qcompile.backends.onnxruntime import nbits
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES, Capabilities
from qcompile.passes.insert_qdq import drop_unused_initializers
from qcompile.storage import PackedTensor

log = logging.getLogger(__name__)
LOWERINGS = ("auto", "function", "integer", "native")


class LowerToMatMulNBitsPass(ir.passes.InPlacePass):
    def __init__(self, stored: dict[str, PackedTensor], lowering: str = "auto", accuracy_level: int = 0,
                 block_activations: dict | None = None, caps: Capabilities = CAPABILITIES) -> None:
        super().__init__()
        self.caps = caps
        self.block_activations = block_activations or {}
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
        self.stored = stored
        self.lowering = lowering
        self.accuracy_level = accuracy_level
        self.lowered: dict[str, int] = {}  # node name -> bytes of the initializers its kernel reads

    def __repr__(self) -> str:
        return f"LowerToMatMulNBitsPass({self.lowering}, accuracy_level={self.accuracy_level})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.lowering == "function":
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        count = 0  # lowered by this call (`self.lowered` records every call's, for the layer table)
        for node in list(graph):
            t = self._lowerable(node)
            if t is not None:
                self._lower(graph, node, t)
                count += 1
        if count:
            model.opset_imports.setdefault(nbits.DOMAIN, 1)
            if any(n.domain == native.DOMAIN for n in graph):
                model.opset_imports.setdefault(native.DOMAIN, native.VERSION)
            graph.sort()
            _drop_dead(graph)
            functions.attach(model)
        return ir.passes.PassResult(model, modified=count > 0)

    def _lowerable(self, node: ir.Node) -> PackedTensor | None:
        """The weight's stored form in [K, N] orientation, if this layer is lowered."""
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        w = node.inputs[1]
        t = self.stored.get(w.name) if w is not None else None
        if t is None or (node.op_type == "Gemm" and not _plain_gemm(node)):
            return None
        x = node.inputs[0]
        if x is not None and x.producer() is not None and x.producer().op_type == "DequantizeLinear":
            return None  # integer activations: onnxruntime fuses the Q/DQ MatMul into its int8 kernels
        if node.op_type == "Gemm" and _attr(node, "transB"):
            t = t.transposed()
        if self.lowering == "native" and _native_kernel(t):
            return t
        reason = nbits.unsupported(node, t)
        gemv = x is not None and x.shape is not None and len(x.shape) == 2
        limit = self.caps.nbits_auto_max_planes_gemv if gemv else self.caps.nbits_auto_max_planes
        if reason is None and self.lowering in ("auto", "native") and nbits.plane_count(t) > limit:
            reason = f"{nbits.plane_count(t)} digit planes (auto lowers at most {limit} here)"
        if reason is not None:
            log.debug("%s stays %s: %s", node.name, self.lowering, reason)
            return None
        return t

    def _lower(self, graph: ir.Graph, node: ir.Node, t: PackedTensor) -> None:
        name = f"{node.name or node.outputs[0].name}_nbits"
        kernel = _native_kernel(t) if self.lowering == "native" else None
        before = set(graph.initializers)
        if kernel == "fp4":
            x, act, act_scale = self._fused_activation(node.inputs[0])
            y = native.emit_matmul_fp4(graph, x, t, name, act=act, act_tensor_scale=act_scale)
        elif kernel == "f8":
            y = native.emit_matmul_f8(graph, node.inputs[0], t, name)
        else:
            y = nbits.emit_matmul_nbits(graph, node, node.inputs[0], t, self.accuracy_level, name)
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
        self.lowered[node.name] = sum(graph.initializers[k].const_value.nbytes for k in set(graph.initializers) - before)


    def _fused_activation(self, x: ir.Value):
        """(input, format, tensor scale) of an MXFP4/NVFP4 FakeQuant on the last axis feeding the
        MatMul, which MatMulFp4 then quantizes itself (`act`); else (x, None, None)."""
        entry = self.block_activations.get(x.name)
        if entry is not None and x.producer() is not None and x.producer().domain == functions.DOMAIN:
            src, fmt, st, axis = entry
            rank = len(src.shape) if src.shape is not None else None
            last = axis == -1 or (rank is not None and axis == rank - 1)
            try:
                act = native.act_attribute(fmt)
            except ValueError:
                act = "none"
            if last and act != "none":
                return src, fmt, st
        return x, None, None


def _native_kernel(t: PackedTensor) -> str | None:
    """The native MatMul that takes this weight: "fp4" (MatMulFp4: E2M1 blocks with E8M0 / E4M3
    scales along K), "f8" (MatMulF8: E4M3FN / E5M2 with a scale per column or tensor), or None."""
    for kind, check in (("fp4", native.check_weight), ("f8", native.check_weight_f8)):
        try:
            check(t)
        except ValueError:
            continue
        return kind
    return None


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


