"""How a quantized constant is stored in a compiled model: packed element codes plus scales.

One layout serves every format and granularity, so every emitter (native DequantizeLinear, the
`qcompile` function ops, the integer MatMulNBits lowering) reads the same object:

    value[i] = element(codes[i]) * scale_value[block(i)]

- `codes` has the weight's shape; `packed()` stores them densely at the element's bit width
  (`codec.pack`: two E2M1 codes per byte, four 6-bit codes per three bytes, ...).
- `scale` has the weight's rank. On `axis` it has ceil(shape[axis] / block_size) entries, each
  covering `block_size` consecutive elements; on every other dim it has 1 entry (broadcast) or
  shape[d]. So per-channel quantization of a [K, N] MatMul weight is axis=0, block_size=K, scale
  [1, N]; per-tensor is scale [1, 1] with block_size=K; blocks of 32 along K are scale [K/32, N].
- Scalar formats (INT, FP4/FP6/FP8, any ExMy) keep float32 scales. Block formats keep scale
  *codes*: E8M0 bytes for OCP MX (value 2**(code - 127)), E4M3 bytes for NVFP4, whose scale value
  is float32(decode(code) * tensor_scale), exactly as `codec.dequantize_block` multiplies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile import codec
from qcompile.formats import BlockFormat, FloatFormat, Format, IntFormat


@dataclass
class PackedTensor:
    fmt: Format  # the element format, or the BlockFormat (element + scale format)
    codes: np.ndarray  # element codes (codec.encode), unpacked, shaped like the weight
    scale: np.ndarray  # float32 values (scalar formats) or scale codes (block formats); see module doc
    axis: int
    block_size: int
    tensor_scale: float | None = None

    @property
    def element(self) -> IntFormat | FloatFormat:
        return self.fmt.element if isinstance(self.fmt, BlockFormat) else self.fmt

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def packed(self) -> np.ndarray:
        """The element codes, C order, densely packed at the element's bit width (uint8)."""
        return codec.pack(self.codes.ravel(), self.element.bits)

    def scale_values(self) -> np.ndarray:
        """Float32 scale of every block (shaped like `scale`)."""
        if not isinstance(self.fmt, BlockFormat):
            return np.asarray(self.scale, dtype=np.float32)
        s = codec.decode(self.scale, self.fmt.scale)
        if self.tensor_scale is not None:
            s = s * np.float32(self.tensor_scale)
        return s

    def element_values(self) -> np.ndarray:
        """Float32 value of every element code, before scaling."""
        return codec.decode(self.codes, self.element)

    def dequantize(self) -> np.ndarray:
        """The float32 weight the compiled model computes with (bit-exact with the codec)."""
        full = codec.expand_param(self.scale_values(), self.shape, self.axis, self.block_size)
        return self.element_values() * full

    def row_slices(self, chunk: int = 1 << 20):
        """Yield (start, stop, dequantized rows start:stop) over axis 0, ~`chunk` elements each
        (a whole number of scale blocks when several blocks run along axis 0; per output channel,
        one block spans all rows, any slice of them is fine): `dequantize()` in pieces."""
        if len(self.shape) == 0 or self.codes.size <= chunk:
            yield 0, self.shape[0] if self.shape else 1, self.dequantize()
            return
        rows = self.shape[0]
        step = max(1, chunk // (self.codes.size // rows))
        if self.axis == 0 and self.scale.shape[0] > 1:  # several blocks along the rows: slice at their edges
            step = max(self.block_size, step // self.block_size * self.block_size)
        for i in range(0, rows, step):
            j = min(i + step, rows)
            if self.axis == 0:
                s_rows = slice(i // self.block_size, -(-j // self.block_size))
            else:
                s_rows = slice(i, j) if self.scale.shape[0] == rows else slice(None)
            part = PackedTensor(self.fmt, self.codes[i:j], self.scale[s_rows], self.axis, self.block_size, self.tensor_scale)
            yield i, j, part.dequantize()

    def transposed(self) -> PackedTensor:
        """The same 2-D tensor transposed (a Gemm transB weight seen as [K, N]); exact."""
        return PackedTensor(self.fmt, self.codes.T, self.scale.T, 1 - self.axis, self.block_size, self.tensor_scale)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes + scales (+ 4 for a tensor scale)."""
        code_bytes = -(-int(np.prod(self.shape)) * self.element.bits // 8)
        scale_bytes = self.scale.size * (self.fmt.scale.bits // 8 if isinstance(self.fmt, BlockFormat) else 4)
        return code_bytes + scale_bytes + (4 if self.tensor_scale is not None else 0)


def from_block(q: codec.BlockQuantized, fmt: BlockFormat) -> PackedTensor:
    """A block-format tensor (codec.quantize_block output) in the storage layout."""
    return PackedTensor(fmt, q.elements, q.scales, q.axis, fmt.block_size, q.tensor_scale)


def from_scalar(codes: np.ndarray, scale: np.ndarray, fmt: IntFormat | FloatFormat, axis: int | None,
                block_size: int | None) -> PackedTensor:
    """Codes with ONNX-DequantizeLinear-style scales (scalar, 1-D per-axis, or blocked) in the storage layout.

    `codes` are values on the format's grid (ints for IntFormat, floats for FloatFormat) or codes;
    they are re-encoded with `codec.encode` so `codes` always holds bit patterns.
    """
    values = np.asarray(codes)
    shape = values.shape
    scale = np.asarray(scale, dtype=np.float32)
    if block_size is not None:  # blocked along `axis`: already the storage layout
        ax, bs, s = axis % len(shape), block_size, scale
    elif axis is not None and scale.ndim == 1:  # per axis: one block spans every other axis
        ax = axis % len(shape)
        other = next((d for d in range(len(shape)) if d != ax), ax)
        s = scale.reshape([-1 if d == ax else 1 for d in range(len(shape))])
        ax, bs = other, shape[other] if other != axis % len(shape) else 1
    else:  # per tensor
        ax, bs, s = 0, max(shape[0], 1) if shape else 1, scale.reshape([1] * len(shape))
    return PackedTensor(fmt, _encode_chunked(values, fmt), s, ax, bs)


ENCODE_CHUNK = 1 << 20  # elements encoded at a time (encode works in float64)


def _encode_chunked(values: np.ndarray, fmt: IntFormat | FloatFormat) -> np.ndarray:
    """codec.encode of grid values (ints scaled by 2**-frac_bits for IntFormat), elementwise over
    slices along axis 0, so its float64 temporaries stay ~8 bytes x ENCODE_CHUNK. Integers stored
    at exactly the format's width are viewed, not copied (the compiled model's DequantizeLinear
    codes and the stored form then share one array)."""
    if isinstance(fmt, IntFormat) and not fmt.frac_bits and values.dtype.kind in "iu" and values.dtype.itemsize * 8 == fmt.bits:
        return values.view(codec.code_dtype(fmt.bits))  # int8 / int16 codes are their own two's-complement bits
    unit = 2.0**-fmt.frac_bits if isinstance(fmt, IntFormat) else 1.0
    if values.ndim == 0 or values.size <= ENCODE_CHUNK:
        return codec.encode(values.astype(np.float64) * unit, fmt)
    step = max(1, ENCODE_CHUNK // (values.size // values.shape[0]))
    return np.concatenate([codec.encode(values[i : i + step].astype(np.float64) * unit, fmt)
                           for i in range(0, values.shape[0], step)], axis=0)
