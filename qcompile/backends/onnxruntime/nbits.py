"""Exact integer lowering of a low-bit MatMul weight to onnxruntime's MatMulNBits (com.microsoft).

Many element grids are small integers times a power of two: E2M1 x 2 is an integer in [-12, 12],
E2M3 x 8 in [-60, 60], E3M2 x 16 in [-448, 448], the MX INT8 element x 64 in [-127, 127], intN
are integers. So a [K, N] weight stored as codes + scales (`qcompile.storage.PackedTensor`) is

    W[k, n] = v[code[k, n]] * u * scale[k // b, n]        (v integer, u a power of two)

Write v in base 16 as P "digit planes", v = sum_j d_j * 16**j: the two's-complement digits, lower
planes in [0, 15] (stored as is, zero point 0), the top plane in [-8, 7] (stored d + 8, zero point
8); a format without negative values uses [0, 15] digits on every plane. P is as small as the grid
allows (int2..int4: 1, E2M1/E2M3/int8/MX INT8: 2, E3M2: 3; more than 4 is refused, e.g. E4M3).
Each plane is one 4-bit MatMulNBits, whose weight is (stored - zero_point) * block scale:

Before:  y = MatMul(x, W)                                   W = DequantizeLinear(codes, scale, ...)
After:   y = MatMulNBits(x, B_0, scale_0, zp_0) + ... + MatMulNBits(x, B_{P-1}, scale_{P-1}[, zp])
         B_j     = pack_nibbles(Gather(digit_lut_j, Transpose(codes)))   [N, K/bs, bs/2] uint8
         scale_j = Transpose(scale) repeated to MatMulNBits blocks * (u * 16**j)   [N, K/bs] float32

B_j and scale_j are computed in the graph from the stored (packed, own-bit-width) codes and the
scales by standard ops on constants, which onnxruntime constant-folds (ENABLE_BASIC and above)
into initializers that MatMulNBits prepacks; the file keeps only the codes. The sum is exact up to
float summation order: u * 16**j is a power of two, so scale_j is the exact scale (checked by
`unsupported`), and at accuracy_level 0 MatMulNBits multiplies x by the exact float weight.
accuracy_level 4 quantizes x to int8 per block (fast, approximate).

MatMulNBits facts this relies on (checked against numpy with onnxruntime 1.31, see the tests):
- B is [N, ceil(K/bs), bs/2]: for each output column, K contiguous, two 4-bit values per byte,
  the even k in the low nibble; K need not be a multiple of bs (the padding is ignored).
- zero_points absent means 8 for every block; uint8 zero points are [N, ceil(n_blocks/2)] (or
  flat), block 2i in the low nibble and 2i+1 in the high one. Float zero points (same type as the
  scales) are also accepted but select a ~70x slower kernel, so zero point 0 is given packed.

Cost (4096 x 4096, batch 1, 1 thread, weights streamed from DRAM as in a real model): float MatMul
2.9 ms; one plane 1.2-1.4 ms at accuracy_level 0, 0.45-0.7 ms at 4; two planes 1.9-2.5 ms at 0,
1.3 ms at 4 (each plane streams its own 4-bit B, so P planes cost about P times one plane or more).
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile import codec
from qcompile.storage import PackedTensor

RADIX_BITS = 4
RADIX = 1 << RADIX_BITS
MAX_PLANES = 4
MAX_BLOCK = 128  # largest MatMulNBits block used (64/128 measured a little faster than 32 at level 4)
MIN_BLOCK = 16
DOMAIN = "com.microsoft"


# --- the integer grid and its digit planes -----------------------------------------------------
def _unit_exponent(values: np.ndarray) -> int:
    """Largest e such that every value is an integer multiple of 2**e (values nonzero, finite)."""
    mant, exp = np.frexp(values.astype(np.float64))
    sig = np.abs(np.ldexp(mant, 53)).astype(np.int64)  # exact: float32 significands fit in 53 bits
    trailing = np.log2(sig & -sig).astype(np.int64)
    return int((exp - 53 + trailing).min())


def integer_grid(t: PackedTensor) -> tuple[np.ndarray, float] | None:
    """(ints, unit): ints[c] * unit == element value of code c for every code c, unit a power of two.

    Non-finite codes (NaN, inf) map to 0: the saturating quantizer never writes them. None when the
    grid needs more than MAX_PLANES 4-bit digit planes (E4M3, E5M2, ...).
    """
    fmt = t.element
    values = codec.decode(np.arange(2**fmt.bits), fmt).astype(np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    nonzero = values[values != 0]
    e = _unit_exponent(nonzero) if nonzero.size else 0
    ints = np.rint(np.ldexp(values, -e)).astype(np.int64)
    if planes_needed(ints) is None:
        return None
    return ints, math.ldexp(1.0, e)


def plane_count(t: PackedTensor) -> int | None:
    """Number of MatMulNBits (digit planes) the lowering of `t` emits, or None without an integer grid."""
    grid = integer_grid(t)
    return None if grid is None else planes_needed(grid[0])


def planes_needed(ints: np.ndarray) -> int | None:
    """Fewest base-16 digit planes holding every value (two's complement when any is negative)."""
    lo, hi = int(ints.min()), int(ints.max())
    for p in range(1, MAX_PLANES + 1):
        top = RADIX ** (p - 1)
        if (lo >= 0 and hi < RADIX * top) or (-RADIX // 2 * top <= lo and hi < RADIX // 2 * top):
            return p
    return None


def digit_planes(ints: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Per plane j (weight 16**j): (stored 4-bit digit of every code, zero point).

    sum_j (stored_j[c] - zero_point_j) * 16**j == ints[c].
    """
    p = planes_needed(ints)
    if p is None:
        raise ValueError("integer grid needs more than MAX_PLANES digit planes")
    signed = bool(ints.min() < 0)
    planes = [(((ints >> (RADIX_BITS * j)) & (RADIX - 1)).astype(np.int32), 0) for j in range(p - 1)]
    top = ints >> (RADIX_BITS * (p - 1))  # floor division: in [-8, 7] when signed, [0, 15] when not
    zp = RADIX // 2 if signed else 0
    planes.append(((top + zp).astype(np.int32), zp))
    return planes


# --- block size and applicability ------------------------------------------------------------
def nbits_block_size(t: PackedTensor) -> int | None:
    """MatMulNBits block: a power of two in [16, 128] that divides the storage block (or any when
    one storage block spans K: per channel / per tensor), or None."""
    k, b = t.shape[0], t.block_size
    if b >= k:
        return min(MAX_BLOCK, max(MIN_BLOCK, 1 << max(k - 1, 1).bit_length()))
    pow2 = b & -b
    return min(pow2, MAX_BLOCK) if pow2 >= MIN_BLOCK else None


def _plane_scales_exact(t: PackedTensor, unit: float, planes: int) -> bool:
    """Every finite scale times unit * 16**j stays an exact, finite float32."""
    s = t.scale_values().astype(np.float64)
    s = s[np.isfinite(s)]
    for j in range(planes):
        f = unit * float(RADIX**j)
        with np.errstate(over="ignore"):
            prod = (s * np.float32(f)).astype(np.float32)
        if not np.all(np.isfinite(prod)) or not np.array_equal(prod.astype(np.float64), s * f):
            return False
    return True


def unsupported(node: ir.Node, t: PackedTensor) -> str | None:
    """None when `node` computes x @ W with this [K, N] weight and lowers to MatMulNBits, else why not.

    `node` is a MatMul, or a Gemm the caller has checked is x @ W (+ b) (t already in [K, N] form).
    """
    if node.op_type not in ("MatMul", "Gemm"):
        return f"{node.op_type} is not a MatMul/Gemm"
    if len(t.shape) != 2:
        return f"weight rank {len(t.shape)} (MatMulNBits needs a 2-D [K, N] weight)"
    if t.axis != 0:
        return "scale blocks run along N (MatMulNBits blocks run along K)"
    grid = integer_grid(t)
    if grid is None:
        return f"{t.element.name}: element grid needs more than {MAX_PLANES} 4-bit digit planes"
    if nbits_block_size(t) is None:
        return f"block size {t.block_size} has no power-of-two divisor >= {MIN_BLOCK}"
    x = node.inputs[0]
    if x is not None and x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return f"activation dtype {x.dtype} (float32 only)"
    inner = x.shape[-1] if x is not None and x.shape is not None and len(x.shape) else None
    if isinstance(inner, int) and inner != t.shape[0]:
        return f"activation inner dim {inner} != K={t.shape[0]}"
    if not _plane_scales_exact(t, grid[1], planes_needed(grid[0])):
        return "scale x plane weight overflows or loses bits in float32"
    return None


# --- graph construction ------------------------------------------------------------------------
class _Builder:
    """Inserts nodes before `anchor` and registers initializers, names prefixed by `name`."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, name: str) -> None:
        self.graph, self.anchor, self.name, self.count = graph, anchor, name, 0

    def const(self, array: np.ndarray, tag: str) -> ir.Value:
        tensor = ir.tensor(np.array(array, order="C"), name=f"{self.name}_{tag}")
        value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list, attrs: dict | None = None, *, dtype: ir.DataType,
           shape: list | None = None, domain: str = "") -> ir.Value:
        self.count += 1
        node = ir.node(op_type, inputs, attrs or {}, domain=domain, name=f"{self.name}_{op_type}_{self.count}")
        out = node.outputs[0]
        out.name, out.dtype = f"{node.name}_out", dtype
        out.shape = ir.Shape(shape) if shape is not None else None
        self.graph.insert_before(self.anchor, node)
        return out


def _code_pairs(b: _Builder, codes: ir.Value, k: int, n: int, kp: int) -> tuple[ir.Value, ir.Value]:
    """int32 codes of W^T as [N, Kp/2] (even k, odd k), padded past K with code 0 (ignored)."""
    i32 = ir.DataType.INT32
    idx = b.op("Cast", [b.op("Transpose", [codes], {"perm": [1, 0]}, dtype=codes.dtype, shape=[n, k])],
               {"to": i32}, dtype=i32, shape=[n, k])
    if kp > k:
        pad = b.const(np.zeros((n, kp - k), np.int32), "pad")
        idx = b.op("Concat", [idx, pad], {"axis": 1}, dtype=i32, shape=[n, kp])
    pairs = b.op("Reshape", [idx, b.const(np.array([n, kp // 2, 2], np.int64), "pairs_shape")],
                 dtype=i32, shape=[n, kp // 2, 2])
    return tuple(b.op("Gather", [pairs, b.const(np.array(i, np.int64), f"nib{i}")], {"axis": 2},
                      dtype=i32, shape=[n, kp // 2]) for i in (0, 1))


def _plane_b(b: _Builder, lo: ir.Value, hi: ir.Value, digits: np.ndarray, j: int, n: int, nb: int,
             bs: int) -> ir.Value:
    """B_j: stored digits of plane j packed two per byte, [N, n_blocks, bs/2] uint8."""
    i32, u8 = ir.DataType.INT32, ir.DataType.UINT8
    d_lo = b.op("Gather", [b.const(digits, f"lut{j}"), lo], dtype=i32, shape=[n, nb * bs // 2])
    d_hi = b.op("Gather", [b.const(digits * RADIX, f"lut{j}_hi"), hi], dtype=i32, shape=[n, nb * bs // 2])
    byte = b.op("Cast", [b.op("Add", [d_lo, d_hi], dtype=i32, shape=[n, nb * bs // 2])], {"to": u8},
                dtype=u8, shape=[n, nb * bs // 2])
    return b.op("Reshape", [byte, b.const(np.array([n, nb, bs // 2], np.int64), f"b{j}_shape")],
                dtype=u8, shape=[n, nb, bs // 2])


def _block_scales(b: _Builder, scales: ir.Value, t: PackedTensor, n: int, nb: int, bs: int) -> ir.Value:
    """The storage scale of every MatMulNBits block, [N, n_blocks] float32."""
    f32 = ir.DataType.FLOAT
    rows, cols = (int(d) for d in t.scale.shape)
    which = np.minimum(np.arange(nb) * bs // t.block_size, rows - 1).astype(np.int64)
    st = b.op("Transpose", [scales], {"perm": [1, 0]}, dtype=f32, shape=[cols, rows])
    per_block = b.op("Gather", [st, b.const(which, "scale_block")], {"axis": 1}, dtype=f32, shape=[cols, nb])
    return b.op("Expand", [per_block, b.const(np.array([n, nb], np.int64), "scale_shape")], dtype=f32,
                shape=[n, nb])


def _out_shape(x: ir.Value, n: int) -> list | None:
    return None if x.shape is None else [*list(x.shape)[:-1], n]


def emit_matmul_nbits(graph: ir.Graph, node: ir.Node, x: ir.Value, codes: ir.Value, scales: ir.Value,
                      t: PackedTensor, accuracy_level: int, name: str) -> ir.Value:
    """Insert (before `node`) the plane decode, one MatMulNBits per plane and their sum; return the sum.

    codes: [K, N] element codes (uint8, or uint16 for wider formats); scales: float32 shaped like
    t.scale. The result equals MatMul(x, t.dequantize()) (exactly at accuracy_level 0, up to float
    summation order). The caller rewires `node`'s output users and removes `node`. Names start with
    `name`, which must be unique in the graph.
    """
    reason = unsupported(node, t)
    if reason is not None:
        raise ValueError(f"{node.name}: cannot lower to MatMulNBits: {reason}")
    if accuracy_level not in range(5):
        raise ValueError(f"accuracy_level {accuracy_level} is outside 0..4")
    ints, unit = integer_grid(t)
    (k, n), bs = t.shape, nbits_block_size(t)
    nb = -(-k // bs)
    graph.opset_imports.setdefault(DOMAIN, 1)
    b = _Builder(graph, node, name)
    lo, hi = _code_pairs(b, codes, k, n, nb * bs)
    base = _block_scales(b, scales, t, n, nb, bs)
    f32, shape = ir.DataType.FLOAT, _out_shape(x, n)
    attrs = {"K": k, "N": n, "bits": RADIX_BITS, "block_size": bs, "accuracy_level": accuracy_level}
    total = None
    for j, (digits, zp) in enumerate(digit_planes(ints)):
        factor = b.const(np.array(unit * RADIX**j, np.float32), f"factor{j}")
        inputs = [x, _plane_b(b, lo, hi, digits, j, n, nb, bs),
                  b.op("Mul", [base, factor], dtype=f32, shape=[n, nb])]
        if zp != RADIX // 2:  # absent zero points mean 8
            packed = (zp | zp << RADIX_BITS) * np.ones((n, -(-nb // 2)), np.uint8)
            inputs.append(b.const(packed.astype(np.uint8), f"zp{j}"))
        y = b.op("MatMulNBits", inputs, attrs, dtype=f32, shape=shape, domain=DOMAIN)
        total = y if total is None else b.op("Add", [total, y], dtype=f32, shape=shape)
    return total
