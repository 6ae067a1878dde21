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
         B_j     = pack_nibbles(digit_j[codes^T])                               [N, K/bs, bs/2] uint8
         scale_j = scale^T repeated to MatMulNBits blocks * (u * 16**j)         [N, K/bs] float32

B_j and scale_j are computed in numpy at compile time (`plane_inputs`) and stored as initializers
in MatMulNBits' own layout, so a session reads them as they are: nothing is rebuilt at load (an
in-graph decode chain made onnxruntime hold every full-size intermediate while constant-folding:
a 2.4 GB model's w4 output could not be loaded in 24 GB). P planes store P x 4 bits per weight
(one plane for int2..int4: the same bytes as packed codes). The sum is exact up to
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

from qcompile import codec, functions
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


# --- MatMulNBits' own layout, computed at compile time ------------------------------------------
def plane_inputs(t: PackedTensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per digit plane j: (B_j, scale_j, zero_points_j or None) in MatMulNBits' input layout.

    B_j     uint8 [N, n_blocks, bs/2]: digit of W^T[n, k] at byte k // 2 of row n, even k in the
            low nibble, K padded to n_blocks * bs with code 0 (MatMulNBits ignores the padding);
    scale_j float32 [N, n_blocks]: the storage scale of the block holding k = b * bs, times
            unit * 16**j (a power of two: exact, `_plane_scales_exact`);
    zero_points_j uint8 [N, ceil(n_blocks / 2)] (both nibbles = the plane's zero point), or None
            for zero point 8 (MatMulNBits' default).
    Computed on uint8 codes (one [N, Kp] byte copy of the weight at a time), these are the bytes
    the former in-graph decode chain (Transpose, Cast, Gather of digit tables, ...) folded to.
    """
    ints, unit = integer_grid(t)
    (k, n), bs = t.shape, nbits_block_size(t)
    nb = -(-k // bs)
    codes = np.zeros((n, nb * bs), dtype=np.uint8 if t.element.bits <= 8 else np.uint16)
    codes[:, :k] = t.codes.T
    rows, _ = (int(d) for d in t.scale.shape)
    which = np.minimum(np.arange(nb) * bs // t.block_size, rows - 1)
    base = np.broadcast_to(t.scale_values().T[:, which], (n, nb)).astype(np.float32)
    out = []
    for j, (digits, zp) in enumerate(digit_planes(ints)):
        table = digits.astype(np.uint8)
        b = table[codes[:, 0::2]] | (table[codes[:, 1::2]] << RADIX_BITS)
        scale = base * np.float32(unit * RADIX**j)
        zeros = None
        if zp != RADIX // 2:  # absent zero points mean 8
            zeros = np.full((n, -(-nb // 2)), zp | zp << RADIX_BITS, dtype=np.uint8)
        out.append((b.reshape(n, nb, bs // 2), scale, zeros))
    return out


def _out_shape(x: ir.Value, n: int) -> list | None:
    return None if x.shape is None else [*list(x.shape)[:-1], n]


def emit_matmul_nbits(graph: ir.Graph | functions.Emitter, node: ir.Node, x: ir.Value, t: PackedTensor, accuracy_level: int,
                      name: str) -> ir.Value:
    """Insert (before `node`) one MatMulNBits per digit plane and their sum; return the sum.

    Each plane's B, scales and zero points are initializers in MatMulNBits' layout (`plane_inputs`),
    so a session reads them as stored: nothing is decoded or constant-folded at load. The result
    equals MatMul(x, t.dequantize()) (exactly at accuracy_level 0, up to float summation order).
    The caller rewires `node`'s output users and removes `node`. Names start with `name`, which
    must be unique in the graph.
    """
    reason = unsupported(node, t)
    if reason is not None:
        raise ValueError(f"{node.name}: cannot lower to MatMulNBits: {reason}")
    if accuracy_level not in range(5):
        raise ValueError(f"accuracy_level {accuracy_level} is outside 0..4")
    (k, n), bs = t.shape, nbits_block_size(t)
    e = graph if isinstance(graph, functions.Emitter) else functions.Emitter(graph)
    e.graph.opset_imports.setdefault(DOMAIN, 1)
    f32, shape = ir.DataType.FLOAT, _out_shape(x, n)
    attrs = {"K": k, "N": n, "bits": RADIX_BITS, "block_size": bs, "accuracy_level": accuracy_level}
    total = None
    for j, (b, scale, zeros) in enumerate(plane_inputs(t)):
        inputs = [x, e.initializer(f"{name}_B{j}", b), e.initializer(f"{name}_scales{j}", scale)]
        if zeros is not None:
            inputs.append(e.initializer(f"{name}_zp{j}", zeros))
        y = _insert(e, node, "MatMulNBits", inputs, attrs, f"{name}_plane{j}", f32, shape, DOMAIN)
        total = y if total is None else _insert(e, node, "Add", [total, y], {}, f"{name}_sum{j}", f32, shape, "")
    return total


def _insert(e, anchor: ir.Node, op_type: str, inputs: list, attrs: dict, name: str, dtype: ir.DataType,
            shape: list | None, domain: str) -> ir.Value:
    """A node inserted before `anchor` (so the graph stays sorted), output named `name`."""
    out = ir.Value(name=e.fresh(name), shape=None if shape is None else ir.Shape(shape), type=ir.TensorType(dtype))
    e.graph.insert_before(anchor, ir.node(op_type, inputs, attrs, domain=domain, outputs=[out], name=out.name))
    return out
