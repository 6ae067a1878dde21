"""What onnxruntime (CPU, 1.31) runs, fuses, or cannot run: one table, checked by tests.

Lowering and emission ask this table; no pass hard-codes runtime quirks. Every fact here has a
test in tests/backends/test_capabilities.py that runs the installed onnxruntime, so the day a fact
changes (say, ORT gains a FLOAT4E2M1 DequantizeLinear kernel) a strict xfail turns red.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

D = ir.DataType


@dataclass(frozen=True)
class Capabilities:
    max_ir_version: int = 13
    max_opset: int = 26
    # QuantizeLinear/DequantizeLinear kernels: dtype -> first default-domain opset that has them.
    qdq_min_opset: dict = field(
        default_factory=lambda: {
            D.INT8: 13, D.UINT8: 13,
            D.FLOAT8E4M3FN: 19, D.FLOAT8E4M3FNUZ: 19, D.FLOAT8E5M2: 19, D.FLOAT8E5M2FNUZ: 19,
            D.INT16: 21, D.UINT16: 21, D.INT4: 21, D.UINT4: 21,
            D.INT2: 25, D.UINT2: 25,
        }
    )
    # Q/DQ around MatMul/Conv/Gemm fuse into integer kernels at ENABLE_ALL (QLinearConv,
    # MatMulIntegerToFloat, QGemm ...).
    integer_fusion: frozenset = frozenset({D.INT8, D.UINT8})
    # Activation Q/DQ of these types are mishandled by QDQ fusions at ENABLE_EXTENDED/ALL:
    # MatMulIntegerToFloat fails to load, ReluQuantFusion drops a Relu it must keep, and the Q/DQ
    # drop around shape ops leaves Transpose/MaxPool on float8 (no kernel). See lowering.py.
    activation_qdq_unsafe: frozenset = frozenset(
        {D.FLOAT8E4M3FN, D.FLOAT8E4M3FNUZ, D.FLOAT8E5M2, D.FLOAT8E5M2FNUZ}
    )
    # Q/DQ pairs with one scale around Reshape/Transpose/MaxPool/... are dropped so the op runs on
    # integers: worth propagating activation scales through shape ops only for these types.
    shape_op_qdq_drop: frozenset = frozenset({D.INT8, D.UINT8})
    # Blocked weight-only DQ(w) -> MatMul fuses into MatMulNBits for these types.
    matmulnbits_types: frozenset = frozenset({D.INT4, D.UINT4})
    # MatMulNBits is fast only for bits=4 (4096^2 GEMV, 1 thread: 4-bit 1.3 ms at accuracy level 0,
    # 0.3 ms at 4; bits=8 73 / 1.2 ms; bits=2 85 / 0.4 ms; float MatMul 3.0 ms), so the exact
    # integer lowering writes 4-bit digit planes, one MatMulNBits each. "auto" lowers a layer of at
    # most `nbits_auto_max_planes` planes, or `nbits_auto_max_planes_gemv` when its activation is one
    # row per sample (rank 2). Measured: one plane is as fast as float on MiniLM (28-128 rows per
    # sample: 1.0-1.05x) and 2x faster on a GEMV; two planes are 1.2-1.5x faster than float on a
    # GEMV but 1.8x slower on MiniLM, where the function path (folded to float) runs at 1.0x.
    nbits_auto_max_planes: int = 1
    nbits_auto_max_planes_gemv: int = 2

    def qdq_native(self, dtype: ir.DataType | None, opset: int | None = None) -> bool:
        first = self.qdq_min_opset.get(dtype)
        return first is not None and (opset is None or opset >= first)

    def min_opset(self, dtype: ir.DataType) -> int:
        return self.qdq_min_opset[dtype]


CAPABILITIES = Capabilities()
