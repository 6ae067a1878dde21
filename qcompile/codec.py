"""Numpy reference codec: the semantics of every format (vectorized, no per-element Python).

Scalar formats
  round_to_grid  nearest representable value (float32), ties to the even integer significand
  encode/decode  value <-> code (bit pattern in the low `bits` bits of uint8/uint16/uint32)
  all_codes      every valid code of a format
  pack/unpack    dense little-endian bit packing (ONNX INT4/FLOAT4E2M1 layout for 4 bits)
ONNX Q/DQ, bit-exact with onnxruntime QuantizeLinear/DequantizeLinear (saturate=1)
  quantize_int / dequantize_int, quantize_float / dequantize_float: per tensor, per axis, blocked
Block formats (OCP MX v1.0, NVIDIA NVFP4)
  quantize_block / dequantize_block / fake_quant
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.formats import BlockFormat, FloatFormat, IntFormat, Specials

ScalarFormat = IntFormat | FloatFormat


def code_dtype(bits: int) -> np.dtype:
    """The unsigned type holding a `bits`-bit code."""
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def _smallest(fmt: FloatFormat) -> float:
    """Smallest magnitude a float format represents: 0, or min_subnormal when it has no zero."""
    return 0.0 if fmt.has_zero else fmt.min_subnormal


# ---------------------------------------------------------------------------------------------
# Scalar formats
# ---------------------------------------------------------------------------------------------


def round_to_grid(x: np.ndarray, fmt: ScalarFormat) -> np.ndarray:
    """Nearest value of `fmt` to each x (float32 result; x is read at full precision, once).

    Rounding is round-half-to-even on the integer significand: a tie goes to the neighbour whose
    code is even (for a mantissa-less format such as E8M0 the carry makes the larger power of two
    the even one, as ml_dtypes does). Saturating: |x| > max, including +-inf, becomes +-max, as
    onnxruntime QuantizeLinear with saturate=1 does. NaN stays NaN where the format has NaN and
    becomes the smallest magnitude (0) where it has none. Unsigned formats clamp negatives to their
    smallest value (0, or 2**-127 for E8M0); FNUZ formats round -0 to +0.

    IntFormat: integers (times 2**-frac_bits) in [qmin, qmax]; the caller divides by the scale
    and adds the zero point.
    """
    if isinstance(fmt, IntFormat) and fmt.frac_bits == 0 and getattr(x, "dtype", None) == np.float32:
        # integers of <= 24 bits: rint and clip in float32 give the float64 path's values exactly
        q = np.array(x, dtype=np.float32)
        np.rint(q, out=q)
        np.clip(q, fmt.qmin, fmt.qmax, out=q)
        q[np.isnan(q)] = 0.0
        return q
    x = np.asarray(x, dtype=np.float64)
    if isinstance(fmt, IntFormat):
        step = 2.0**-fmt.frac_bits
        q = np.clip(np.rint(x / step), fmt.qmin, fmt.qmax)
        return (np.where(np.isnan(q), 0.0, q) * step).astype(np.float32)
    lo = _smallest(fmt)
    mag = np.clip(np.abs(x) if fmt.signed else x, lo, fmt.max)
    # Binade exponent floor(log2|x|), floored at emin so subnormals share the emin step.
    e = np.maximum(np.frexp(mag)[1] - 1, fmt.emin)
    step = np.ldexp(1.0, e - fmt.man_bits)
    r = np.rint(mag / step) * step
    if fmt.signed:
        r = np.copysign(r, x) if fmt.has_negative_zero else np.where(r == 0, 0.0, np.copysign(r, x))
    if not fmt.has_nan:
        r = np.where(np.isnan(r), lo, r)
    return r.astype(np.float32)


def _float_bits(v: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Codes of values already on the grid of `fmt` (NaN -> the format's NaN code)."""
    v = np.asarray(v, dtype=np.float64)
    nan = np.isnan(v)
    a = np.where(nan, _smallest(fmt), np.abs(v))
    e = np.frexp(a)[1] - 1
    normal = a >= fmt.min_normal
    exp_field = np.where(normal, e + fmt.exponent_bias, 0)
    significand = np.where(normal, np.ldexp(a, fmt.man_bits - e), a / fmt.min_subnormal)
    man_field = significand.astype(np.int64) - np.where(normal, 2**fmt.man_bits, 0)
    code = (exp_field.astype(np.int64) << fmt.man_bits) | man_field
    sign_bit = 1 << (fmt.bits - 1)
    if fmt.signed:
        code |= np.signbit(v) * sign_bit
    code = np.where(nan, _nan_code(fmt), code)
    return code.astype(code_dtype(fmt.bits))


def _nan_code(fmt: FloatFormat) -> int:
    """The NaN code the encoder writes: sign bit only for FNUZ, else the all-ones magnitude."""
    if fmt.specials is Specials.FNUZ:
        return 1 << (fmt.bits - 1)
    return 2 ** (fmt.bits - fmt.signed) - 1


def encode(x: np.ndarray, fmt: ScalarFormat) -> np.ndarray:
    """Codes of round_to_grid(x, fmt): uint8 for <= 8 bits, uint16 for <= 16 (uint32 for fp32).

    IntFormat codes are the two's-complement bit pattern in the low `bits` bits (unsigned).
    Negative values keep their sign bit (including -0, except FNUZ); NaN gets the sign-less
    all-ones magnitude (FN/IEEE, 0x7F for E4M3FN) or the single NaN 0x80 (FNUZ).
    """
    v = round_to_grid(x, fmt)
    if isinstance(fmt, IntFormat):
        k = np.rint(v.astype(np.float64) * 2.0**fmt.frac_bits).astype(np.int64)
        return (k & (2**fmt.bits - 1)).astype(code_dtype(fmt.bits))
    return _float_bits(v, fmt)


def decode(codes: np.ndarray, fmt: ScalarFormat) -> np.ndarray:
    """Float32 value of every code (NaN codes -> NaN, inf codes -> inf); the inverse of encode."""
    c = np.asarray(codes).astype(np.int64) & (2**fmt.bits - 1)
    if isinstance(fmt, IntFormat):
        k = np.where(c >= 2 ** (fmt.bits - 1), c - 2**fmt.bits, c) if fmt.signed else c
        return np.ldexp(k.astype(np.float64), -fmt.frac_bits).astype(np.float32)
    m, bias = fmt.man_bits, fmt.exponent_bias
    exp_field, man_field = (c >> m) & (2**fmt.exp_bits - 1), c & (2**m - 1)
    if m:
        subnormal = np.ldexp(man_field.astype(np.float64), fmt.emin - m)
        normal = np.ldexp((man_field + 2**m).astype(np.float64), exp_field - bias - m)
        val = np.where(exp_field == 0, subnormal, normal)
    else:
        val = np.ldexp(1.0, exp_field - bias)
    magnitude_bits = fmt.bits - fmt.signed
    if fmt.signed:
        val = np.where(c >> magnitude_bits, -val, val)
    magnitude = c & (2**magnitude_bits - 1)
    top = exp_field == 2**fmt.exp_bits - 1
    match fmt.specials:
        case Specials.IEEE:
            val = np.where(top & (man_field == 0), np.copysign(np.inf, val), val)
            val = np.where(top & (man_field != 0), np.nan, val)
        case Specials.FN:
            val = np.where(magnitude == 2**magnitude_bits - 1, np.nan, val)
        case Specials.FNUZ:
            val = np.where(c == 1 << magnitude_bits, np.nan, val)
    return val.astype(np.float32)


def all_codes(fmt: ScalarFormat) -> np.ndarray:
    """Every valid code of a format of <= 16 bits, ascending (narrow-range ints skip -2**(b-1))."""
    if fmt.bits > 16:
        raise ValueError(f"{fmt.name}: {fmt.bits}-bit formats are too wide to enumerate")
    codes = np.arange(2**fmt.bits, dtype=code_dtype(fmt.bits))
    if isinstance(fmt, IntFormat) and fmt.narrow_range:
        codes = codes[codes != 2 ** (fmt.bits - 1)]
    return codes


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian packing: code i occupies stream bits [i*bits, (i+1)*bits), LSB first.

    For 4 bits element 0 is the low nibble of byte 0 (ONNX INT4/UINT4/FLOAT4E2M1 storage); for 6
    bits four codes fill three bytes; 8 bits is a plain copy. The last byte is zero-padded.
    """
    c = np.asarray(codes).ravel()
    if bits == 8:
        return c.astype(np.uint8)
    if bits == 4:  # two codes per byte, directly
        c = c.astype(np.uint8)
        if c.size % 2:
            c = np.append(c, np.uint8(0))
        return (c[0::2] & 0xF) | (c[1::2] << 4)
    step = PACK_CHUNK  # a multiple of 8 codes: every chunk fills whole bytes, so chunks concatenate
    return np.concatenate([_pack_bits(c[i : i + step], bits) for i in range(0, max(c.size, 1), step)])


PACK_CHUNK = 1 << 20  # codes packed at a time (the bit stream costs ~bits x 9 bytes per code)


def _pack_bits(c: np.ndarray, bits: int) -> np.ndarray:
    stream = ((c.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(stream.ravel(), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes of a `pack`ed stream (uint8 for <= 8 bits, else uint16)."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return (stream.reshape(count, bits).astype(np.uint32) @ weights).astype(code_dtype(bits))


# ---------------------------------------------------------------------------------------------
# ONNX QuantizeLinear / DequantizeLinear
# ---------------------------------------------------------------------------------------------


def expand_param(p, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Broadcast a scale / zero point to `shape` the way ONNX QuantizeLinear-21 does.

    Scalar (or size-1 with no axis): per tensor. 1-D with no block_size: per axis (ONNX default
    axis 1). With block_size: same rank as x, dim `axis` = ceil(shape[axis] / block_size), each
    entry repeated over its block.
    """
    p = np.asarray(p)
    if p.ndim == 0 or (p.size == 1 and axis is None and block_size is None):
        return p.reshape(())
    ax = (1 if axis is None else axis) % len(shape)
    if block_size is None:
        return p.reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return np.repeat(p, block_size, axis=ax).take(np.arange(shape[ax]), axis=ax)


def quantize_int(
    x: np.ndarray,
    scale,
    zero_point,
    fmt: IntFormat,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """onnxruntime QuantizeLinear for integer outputs: clamp(rint(x / scale) + zp, qmin, qmax).

    x / scale is a float32 division, rint is round-half-even, +-inf and out-of-range values
    saturate, and NaN becomes qmin (onnxruntime's MLAS clamp turns NaN into the lower bound).
    onnxruntime 1.31's int2/uint2 kernels and its int4/uint4 per-axis kernel on the last axis
    convert to int32 before clamping, so NaN, +-inf and |x / scale| >= 2**31 differ there
    (tests/test_codec.py::test_ort_int32_first_kernels); this function keeps the saturating rule.
    A fixed-point format's 2**-frac_bits belongs in the scale; narrow_range is honoured through
    qmin. Returns codes as `fmt.storage_dtype` (signed for signed formats).
    """
    x = np.asarray(x, dtype=np.float32)
    s = expand_param(np.asarray(scale, dtype=np.float32), x.shape, axis, block_size)
    zp = 0 if zero_point is None else expand_param(zero_point, x.shape, axis, block_size)
    q = np.rint(x / s).astype(np.float64) + zp
    q = np.where(np.isnan(q), fmt.qmin, np.clip(q, fmt.qmin, fmt.qmax))
    return q.astype(fmt.storage_dtype)


def dequantize_int(
    q: np.ndarray, scale, zero_point, axis: int | None = None, block_size: int | None = None
) -> np.ndarray:
    """onnxruntime DequantizeLinear: float32(q - zp) * scale (the difference in int32)."""
    q = np.asarray(q)
    s = expand_param(np.asarray(scale, dtype=np.float32), q.shape, axis, block_size)
    zp = 0 if zero_point is None else expand_param(zero_point, q.shape, axis, block_size)
    return (q.astype(np.int32) - np.asarray(zp, dtype=np.int32)).astype(np.float32) * s


def quantize_float(
    x: np.ndarray, scale, fmt: FloatFormat, axis: int | None = None, block_size: int | None = None
) -> np.ndarray:
    """onnxruntime QuantizeLinear (saturate=1) for float outputs: encode(float32(x / scale))."""
    x = np.asarray(x, dtype=np.float32)
    s = expand_param(np.asarray(scale, dtype=np.float32), x.shape, axis, block_size)
    return encode(x / s, fmt)


def dequantize_float(
    codes: np.ndarray,
    scale,
    fmt: FloatFormat,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """onnxruntime DequantizeLinear for float inputs: decode(codes) * scale in float32."""
    v = decode(codes, fmt)
    return v * expand_param(np.asarray(scale, dtype=np.float32), v.shape, axis, block_size)


# ---------------------------------------------------------------------------------------------
# Block formats
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockQuantized:
    """A block-quantized tensor in the ONNX blocked-quantization layout.

    elements:     element codes (unpacked), shape == `shape`.
    scales:       scale codes, shape == `shape` with dim `axis` = ceil(shape[axis] / block_size).
    tensor_scale: the per-tensor scale (NVFP4), or None.
    """

    elements: np.ndarray
    scales: np.ndarray
    tensor_scale: float | None
    shape: tuple[int, ...]
    axis: int


def _blocks(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """`x` zero-padded along `axis` to whole blocks, that axis split into [blocks, block_size]."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % block_size)
    a = np.pad(x, pad)
    shape = list(a.shape)
    shape[axis : axis + 1] = [shape[axis] // block_size, block_size]
    return a.reshape(shape)


def _block_amax(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """max |x| over each block along `axis` (zero-padded to a whole block; NaN propagates)."""
    return _blocks(np.abs(x), axis, block_size).max(axis=axis + 1)


def _mx_scale(amax: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """OCP MX v1.0 shared scale X = 2**(floor(log2 amax) - emax_elem), clamped to the scale range.

    A zero block gets the smallest scale (floor(log2 0) = -inf clamps to E8M0's 2**-127; its
    elements are 0 anyway). A block holding NaN or +-inf gets X = NaN: the whole block decodes to
    NaN, as in the spec (X = NaN means every element is NaN) and microxcaling.
    """
    finite = np.isfinite(amax)
    a = np.where(finite, amax, 1.0)
    shared = np.where(a > 0, np.frexp(a)[1] - 1 - fmt.element.emax, fmt.scale.emin)
    shared = np.clip(shared, fmt.scale.emin, fmt.scale.emax)
    return np.where(finite, np.ldexp(1.0, shared), np.nan)


def tensor_scale_from_amax(amax: float, fmt: BlockFormat) -> float:
    """NVFP4 per-tensor scale s_t = amax / (scale.max * element.max) (448 * 6), in float32; 1 for amax 0."""
    s = np.float32(amax) / np.float32(fmt.scale.max * fmt.element.max)
    s = round_to_grid(s, fmt.tensor_scale)
    return float(s) if s > 0 else 1.0


def _tensor_scale(x: np.ndarray, fmt: BlockFormat) -> float:
    """`tensor_scale_from_amax` of the tensor's largest finite magnitude."""
    return tensor_scale_from_amax(np.max(np.abs(x), where=np.isfinite(x), initial=0.0), fmt)


# Block-scale candidates of the weight search, as multiples of the spec's scale: MX scales are powers of two,
# so the only useful alternative is the next one up (no element clips); NVFP4's E4M3 block scale is searched
# over its grid points near amax / 6 (below: clip the largest element, above: round the scale up).
MX_SEARCH = (1.0, 2.0)
NV_SEARCH = tuple(float(r) for r in np.round(np.linspace(0.75, 1.25, 11), 2))


def quantize_block(x: np.ndarray, fmt: BlockFormat, axis: int = -1, tensor_scale: float | None = None,
                   search: bool = False) -> BlockQuantized:
    """Quantize `x` to `fmt` with blocks of `fmt.block_size` consecutive elements along `axis`.

    The blocked axis is zero-padded to a whole number of blocks; the padding is not stored.
    `tensor_scale` fixes s_t (a calibrated, static per-tensor scale for activations) instead of
    taking it from this tensor's amax.

    Power-of-two scale (E8M0, OCP MX v1.0 section 6.3): X = 2**(floor(log2 amax_block) -
    emax_elem) clamped to [2**-127, 2**127] (see `_mx_scale` for zero and non-finite blocks),
    elements = round_to_grid(v / X) -- exact division, saturating to +-element.max.

    Scale with a mantissa (NVFP4, two-level, all in float32): s_t = amax_tensor / (448 * 6)
    (`_tensor_scale`, 1 without a tensor scale), s_b = round_to_grid(amax_block / 6 / s_t, E4M3),
    elements = round_to_grid(v / (s_b * s_t), E2M1). A block whose s_b rounds to 0 stores 0
    elements; a block holding NaN or +-inf gets s_b = NaN and decodes to NaN.

    `search` (constant weights): the scale rule above applied to amax_block * r for each r of
    MX_SEARCH / NV_SEARCH, keeping per block the candidate with the least squared error
    ||x - DQ(Q(x))||^2 (the spec's scale on ties). Any block scale is a valid encoding -- decoding
    is unchanged -- and the spec's rule clips: E4M3 elements reach 448 of the binade's 512, E2M1
    6 of 8, so a block whose amax lies in the top of its binade loses up to 12.5 % (25 %) of its
    largest element.
    """
    x = np.asarray(x, dtype=np.float32)
    ax = axis % x.ndim
    amax = _block_amax(x, ax, fmt.block_size)
    bs = fmt.block_size
    if fmt.scale.man_bits == 0:
        tensor_scale = None
        st = np.float32(1.0)
        rule = lambda a: _mx_scale(a, fmt)  # noqa: E731
        ratios = MX_SEARCH
    else:
        if fmt.tensor_scale is None:
            tensor_scale = None
        elif tensor_scale is None:
            tensor_scale = _tensor_scale(x, fmt)
        st = np.float32(1.0 if tensor_scale is None else tensor_scale)
        rule = lambda a: np.where(np.isfinite(a), round_to_grid(a / np.float32(fmt.element.max) / st, fmt.scale),  # noqa: E731
                                  np.nan)
        ratios = NV_SEARCH

    def elements(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """v = x / divisor (MX: exact in float64; NVFP4: the float32 division kernels do) and the divisor."""
        if fmt.scale.man_bits == 0:
            divisor = expand_param(scale, x.shape, ax, bs)
            return x.astype(np.float64) / divisor, divisor
        divisor = expand_param((scale * st).astype(np.float32), x.shape, ax, bs)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(divisor == 0, 0.0, x / divisor), divisor

    scale = spec = rule(amax)
    if search:
        best = None
        for r in sorted(ratios, key=lambda r: r != 1.0):  # the spec's scale first: it wins ties
            cand = spec if r == 1.0 else rule((amax * np.float32(r)).astype(np.float32))
            v, divisor = elements(cand)
            err = _blocks((round_to_grid(v, fmt.element) * divisor - x) ** 2, ax, bs).sum(axis=ax + 1)
            if best is None:
                best, scale = err, cand
            else:
                better = err < best
                best, scale = np.where(better, err, best), np.where(better, cand, scale)
    v, _ = elements(scale)
    return BlockQuantized(
        elements=encode(v, fmt.element),
        scales=encode(scale, fmt.scale),
        tensor_scale=tensor_scale,
        shape=x.shape,
        axis=ax,
    )


def dequantize_block(q: BlockQuantized, fmt: BlockFormat) -> np.ndarray:
    """Float32 values of a BlockQuantized: element * scale (* tensor scale), block by block.

    MX: element * X, exact. NVFP4: element * float32(s_b * s_t), the divisor quantize used.
    """
    scale = decode(q.scales, fmt.scale)
    if q.tensor_scale is not None:
        scale = scale * np.float32(q.tensor_scale)
    full = expand_param(scale, q.shape, q.axis, fmt.block_size)
    return decode(q.elements, fmt.element) * full


def fake_quant(x: np.ndarray, fmt: BlockFormat, axis: int = -1, tensor_scale: float | None = None) -> np.ndarray:
    """dequantize_block(quantize_block(x)): x rounded to what `fmt` can store, as float32."""
    return dequantize_block(quantize_block(x, fmt, axis, tensor_scale), fmt)
