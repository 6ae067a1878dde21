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
    # int16 pair saturation (MLAS u8 x s8 GEMM/conv kernels on x86 without VNNI: VPMADDUBSW adds the
    # products of the reduction pairs (2i, 2i+1) into int16 with saturation, then sums pairs of those in
    # int32). Activations reach the kernel as u8 codes 0..255 (s8 activations are shifted by 128), so a
    # pair |x_2i w_2i + x_2i+1 w_2i+1| <= 32767 for every input exactly when the same-signed weight pairs
    # have |w_2i + w_2i+1| <= 32767 // 255 = 128 (`pair_bound`). Pairs run along K of MatMul/Gemm and, for
    # Conv, along the per-group reduction ordered (taps, input channels) with the channel innermost;
    # depthwise Conv (one input and one output channel per group) uses a kernel that widens to 16 bits
    # first, and u8 x u8 (both activations of an activation x activation MatMul) uses VPMADDWD on 16-bit
    # values: both are exact. VNNI (VPDPBUSD, AVX-512 VNNI and AVX-VNNI) sums in int32, and ARM64 kernels
    # widen too. Measured under `qemu-x86_64 -cpu Haswell`; tests/backends/test_pair_saturation.py.
    int16_pair_saturation: frozenset = frozenset({"portable", "avx2", "avx512"})
    int16_pair_limit: int = 32767

    def qdq_native(self, dtype: ir.DataType | None, opset: int | None = None) -> bool:
        first = self.qdq_min_opset.get(dtype)
        return first is not None and (opset is None or opset >= first)

    def min_opset(self, dtype: ir.DataType) -> int:
        return self.qdq_min_opset[dtype]

    def pair_bound(self, cpu: str, weight_dtype: ir.DataType | None, activation_fmt) -> int | None:
        """The bound on same-signed int8 weight pairs that keeps the integer kernels of `cpu` from
        saturating, for activations of `activation_fmt` (None: no constraint)."""
        if cpu not in self.int16_pair_saturation or weight_dtype != D.INT8 or activation_fmt is None:
            return None
        if getattr(activation_fmt, "onnx_dtype", None) not in self.integer_fusion:
            return None
        span = activation_fmt.qmax - activation_fmt.qmin  # the u8 codes the kernel sees: 0..span
        return self.int16_pair_limit // span if span * 2 * 128 > self.int16_pair_limit else None


CAPABILITIES = Capabilities()
