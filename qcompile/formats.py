"""Number formats as data.

Every format is a frozen dataclass of its *defining* parameters only (bit widths, bias, special-value
mode, signedness; a block format is element + scale + block size). Every other number -- max, min
normal, ONNX dtype, bits per element -- is a property computed from those parameters, and
`tests/test_formats.py` checks the derivations against `ml_dtypes.finfo`.

`FORMATS` maps canonical names to formats, `ALIASES` maps other spellings to canonical names, and
`parse_format` accepts both plus generic spellings (`e3m4`, `ue5m3fn`, `e4m3fnuz_b11`, ...).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir


class Specials(enum.Enum):
    """Which codes of a minifloat are not finite numbers.

    IEEE: exponent field all ones is reserved -- mantissa 0 is +-inf, any other mantissa is NaN.
    FN:   no inf; only the all-ones magnitude (S.111..1) is NaN (OCP E4M3, E8M0).
    FNUZ: no inf, no -0; the single NaN is the negative-zero code 1000..0; default bias +1.
    NONE: every code is a finite number (OCP FP6 E2M3/E3M2, FP4 E2M1).
    """

    IEEE = "ieee"
    FN = "fn"
    FNUZ = "fnuz"
    NONE = "none"


@dataclass(frozen=True)
class IntFormat:
    """Integer (or fixed-point) grid: code k in [qmin, qmax] means the value k * 2**-frac_bits.

    `signed` codes are two's complement. `narrow_range` drops -2**(bits-1) so the grid is symmetric
    (the OCP MX INT8 element: `frac_bits=6, narrow_range=True` is k/64 for k in [-127, 127]).
    A fixed-point format's implicit 2**-frac_bits is only a scale, so the ONNX/storage types of the
    codes are those of the plain integer of the same width.
    """

    name: str
    bits: int
    signed: bool
    frac_bits: int = 0
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"{self.name}: integer width {self.bits} is outside 2..16")
        if self.narrow_range and not self.signed:
            raise ValueError(f"{self.name}: narrow_range needs a signed format")

    @property
    def kind(self) -> str:
        return "int"

    @property
    def params(self) -> tuple:
        """The defining numbers (everything but the name)."""
        return (self.bits, self.signed, self.frac_bits, self.narrow_range)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + self.narrow_range if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max(self) -> float:
        """Largest value, qmax * 2**-frac_bits."""
        return math.ldexp(self.qmax, -self.frac_bits)

    @property
    def emax(self) -> int:
        """floor(log2(max)): the exponent OCP MX calls emax_elem."""
        return math.frexp(self.max)[1] - 1

    @property
    def onnx_dtype(self) -> ir.DataType | None:
        return _ONNX_INT.get((self.bits, self.signed))

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype holding one (unpacked) code as a signed/unsigned integer."""
        return np.dtype(f"{'int' if self.signed else 'uint'}{8 if self.bits <= 8 else 16}")


@dataclass(frozen=True)
class FloatFormat:
    """Sign/exponent/mantissa minifloat; every derived number is computed, never typed in.

    Value of a code with exponent field E and mantissa field M (m = man_bits, b = exponent_bias):
      E > 0 (or m == 0): (-1)**s * 2**(E - b) * (1 + M / 2**m)
      E == 0, m > 0:     (-1)**s * 2**(1 - b) * (M / 2**m)          (subnormal, includes zero)
    except the codes `specials` reserves. A format without mantissa bits (E8M0) has no zero and no
    subnormals: every code is the power of two 2**(E - b). Unsigned formats have no sign bit.
    The codec computes in float32/float64, so every value must be a float32 (checked here).
    """

    name: str
    exp_bits: int
    man_bits: int
    specials: Specials
    bias: int | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.exp_bits < 1 or self.man_bits < 0 or self.bits > 32:
            raise ValueError(f"{self.name}: bad widths e{self.exp_bits}m{self.man_bits}")
        if self.specials is Specials.FNUZ and not self.signed:
            raise ValueError(f"{self.name}: FNUZ puts NaN on the sign bit; it needs a signed format")
        if self.specials is Specials.IEEE and self.man_bits == 0:
            raise ValueError(f"{self.name}: IEEE specials need a mantissa bit to encode NaN")
        if self.emax > 127 or self.emin - self.man_bits < -149 or self.man_bits > 23:
            raise ValueError(f"{self.name}: values do not fit in float32")

    @property
    def kind(self) -> str:
        return "float"

    @property
    def params(self) -> tuple:
        """The defining numbers (everything but the name), with the bias resolved."""
        return (self.exp_bits, self.man_bits, self.specials, self.exponent_bias, self.signed)

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def exponent_bias(self) -> int:
        if self.bias is not None:
            return self.bias
        return 2 ** (self.exp_bits - 1) - 1 + (self.specials is Specials.FNUZ)

    @property
    def has_inf(self) -> bool:
        return self.specials is Specials.IEEE

    @property
    def has_nan(self) -> bool:
        return self.specials is not Specials.NONE

    @property
    def has_zero(self) -> bool:
        return self.man_bits > 0

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.has_zero and self.specials is not Specials.FNUZ

    def _max_fields(self) -> tuple[int, int]:
        """(exponent field, mantissa field) of the largest finite value."""
        top_e, top_m = 2**self.exp_bits - 1, 2**self.man_bits - 1
        if self.specials is Specials.IEEE or (self.specials is Specials.FN and self.man_bits == 0):
            return top_e - 1, top_m
        if self.specials is Specials.FN:
            return top_e, top_m - 1
        return top_e, top_m

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value (OCP MX's emax_elem)."""
        return self._max_fields()[0] - self.exponent_bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal: 1 - bias, or -bias without mantissa bits."""
        return (1 if self.man_bits else 0) - self.exponent_bias

    @property
    def max(self) -> float:
        e, m = self._max_fields()
        return math.ldexp(1 + m / 2**self.man_bits, e - self.exponent_bias)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals min_normal when there is no mantissa)."""
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def onnx_dtype(self) -> ir.DataType | None:
        return _ONNX_FLOAT.get(self.params)

    @property
    def ml_dtype(self) -> np.dtype | None:
        """The numpy/ml_dtypes dtype with identical semantics, if one exists."""
        return _ML_DTYPES.get(self.params)


@dataclass(frozen=True)
class BlockFormat:
    """Blocks of `block_size` elements sharing one `scale` code, optionally times a tensor scale.

    The scale rule is chosen by the scale format (see `codec.quantize_block`): a mantissa-less
    scale (E8M0) is the OCP MX shared exponent; otherwise the scale is amax / element.max rounded
    to the scale format, relative to a per-tensor scale when `tensor_scale` is set (NVFP4).
    """

    name: str
    element: IntFormat | FloatFormat
    scale: FloatFormat
    block_size: int
    tensor_scale: FloatFormat | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be positive")
        if self.tensor_scale is not None and self.scale.man_bits == 0:
            raise ValueError(f"{self.name}: a power-of-two (MX) block scale takes no tensor scale")

    @property
    def kind(self) -> str:
        return "block"

    @property
    def bits_per_element(self) -> float:
        """Storage per element; the per-tensor scale is amortized over the tensor and left out."""
        return self.element.bits + self.scale.bits / self.block_size


Format = IntFormat | FloatFormat | BlockFormat

_ONNX_INT = {
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
    (16, True): ir.DataType.INT16,
    (16, False): ir.DataType.UINT16,
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
}


def _p(e: int, m: int, specials: Specials, bias: int | None = None, signed: bool = True) -> tuple:
    return FloatFormat("", e, m, specials, bias, signed).params


_S = Specials
_ONNX_FLOAT = {
    _p(8, 23, _S.IEEE): ir.DataType.FLOAT,
    _p(5, 10, _S.IEEE): ir.DataType.FLOAT16,
    _p(8, 7, _S.IEEE): ir.DataType.BFLOAT16,
    _p(4, 3, _S.FN): ir.DataType.FLOAT8E4M3FN,
    _p(4, 3, _S.FNUZ): ir.DataType.FLOAT8E4M3FNUZ,
    _p(5, 2, _S.IEEE): ir.DataType.FLOAT8E5M2,
    _p(5, 2, _S.FNUZ): ir.DataType.FLOAT8E5M2FNUZ,
    _p(2, 1, _S.NONE): ir.DataType.FLOAT4E2M1,
    _p(8, 0, _S.FN, signed=False): ir.DataType.FLOAT8E8M0,
    _p(2, 3, _S.NONE): ir.DataType.FLOAT6E2M3,
    _p(3, 2, _S.NONE): ir.DataType.FLOAT6E3M2,
}
_ML_DTYPES = {
    _p(8, 23, _S.IEEE): np.dtype(np.float32),
    _p(5, 10, _S.IEEE): np.dtype(np.float16),
    _p(8, 7, _S.IEEE): np.dtype(ml_dtypes.bfloat16),
    _p(4, 3, _S.FN): np.dtype(ml_dtypes.float8_e4m3fn),
    _p(4, 3, _S.FNUZ): np.dtype(ml_dtypes.float8_e4m3fnuz),
    _p(5, 2, _S.IEEE): np.dtype(ml_dtypes.float8_e5m2),
    _p(5, 2, _S.FNUZ): np.dtype(ml_dtypes.float8_e5m2fnuz),
    _p(4, 3, _S.IEEE): np.dtype(ml_dtypes.float8_e4m3),
    _p(3, 4, _S.IEEE): np.dtype(ml_dtypes.float8_e3m4),
    _p(4, 3, _S.FNUZ, bias=11): np.dtype(ml_dtypes.float8_e4m3b11fnuz),
    _p(2, 3, _S.NONE): np.dtype(ml_dtypes.float6_e2m3fn),
    _p(3, 2, _S.NONE): np.dtype(ml_dtypes.float6_e3m2fn),
    _p(2, 1, _S.NONE): np.dtype(ml_dtypes.float4_e2m1fn),
    _p(8, 0, _S.FN, signed=False): np.dtype(ml_dtypes.float8_e8m0fnu),
}


def _registry() -> dict[str, Format]:
    ints = [IntFormat(f"{'u' * (not s)}int{b}", b, s) for s in (True, False) for b in range(2, 17)]
    floats = [
        FloatFormat("fp32", 8, 23, _S.IEEE),
        FloatFormat("fp16", 5, 10, _S.IEEE),
        FloatFormat("bf16", 8, 7, _S.IEEE),
        FloatFormat("e4m3fn", 4, 3, _S.FN),
        FloatFormat("e4m3fnuz", 4, 3, _S.FNUZ),
        FloatFormat("e5m2", 5, 2, _S.IEEE),
        FloatFormat("e5m2fnuz", 5, 2, _S.FNUZ),
        FloatFormat("e2m3", 2, 3, _S.NONE),
        FloatFormat("e3m2", 3, 2, _S.NONE),
        FloatFormat("e2m1", 2, 1, _S.NONE),
        # OCP MX v1.0 scale: unsigned, bias 127, 0xFF = NaN, no zero, value 2**(code - 127).
        FloatFormat("e8m0", 8, 0, _S.FN, signed=False),
        # Unsigned E5M3 block scale (Intel auto-round's UE5M3, "Is Finer Better?" ICLR'26 review):
        # bias 15, subnormals, no inf, 0xFF = NaN (max 1.75 * 2**16 = 114688), the same
        # all-ones-is-NaN convention as the UE4M3 scale of NVFP4. Other write-ups use IEEE-style
        # specials (max 61440) or no specials (max 122880); parse `ue5m3ieee`/`ue5m3none` for those.
        FloatFormat("ue5m3", 5, 3, _S.FN, signed=False),
    ]
    by = {f.name: f for f in ints + floats}
    e8m0, fp32 = by["e8m0"], by["fp32"]
    blocks = [
        BlockFormat("mxfp8_e4m3", by["e4m3fn"], e8m0, 32),
        BlockFormat("mxfp8_e5m2", by["e5m2"], e8m0, 32),
        BlockFormat("mxfp6_e2m3", by["e2m3"], e8m0, 32),
        BlockFormat("mxfp6_e3m2", by["e3m2"], e8m0, 32),
        BlockFormat("mxfp4", by["e2m1"], e8m0, 32),
        # OCP MX v1.0 INT8 element: two's complement with an implicit 2**-6 (1.6 fixed point),
        # symmetric [-127/64, 127/64] as in Microsoft's microxcaling reference (-2.0 unused).
        BlockFormat("mxint8", IntFormat("mxint8_element", 8, True, 6, True), e8m0, 32),
        BlockFormat("nvfp4", by["e2m1"], by["e4m3fn"], 16, tensor_scale=fp32),
    ]
    return by | {b.name: b for b in blocks}


FORMATS: dict[str, Format] = _registry()
"""Canonical name -> format. Use `parse_format` for user-supplied names (aliases, generics)."""

ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "fp8": "e4m3fn",
    "fp8_e4m3": "e4m3fn",
    "fp8_e4m3fn": "e4m3fn",
    "fp8_e4m3fnuz": "e4m3fnuz",
    "fp8_e5m2": "e5m2",
    "fp8_e5m2fnuz": "e5m2fnuz",
    "fp6_e2m3": "e2m3",
    "fp6_e3m2": "e3m2",
    "fp4": "e2m1",
    "fp4_e2m1": "e2m1",
    "e8m0fnu": "e8m0",
    "ue8m0": "e8m0",
    "mxfp8": "mxfp8_e4m3",
    "mxfp6": "mxfp6_e2m3",
    "mxfp4_e2m1": "mxfp4",
}

# numbers -> the first registered scalar format with them, so generic names resolve canonically
_BY_PARAMS = {
    (type(f), f.params): f for f in reversed(FORMATS.values()) if not isinstance(f, BlockFormat)
}

_MINIFLOAT = re.compile(r"(u?)e(\d+)m(\d+)(fnuz|fn|ieee|none)?(?:_b(\d+))?")


def default_specials(exp_bits: int, man_bits: int, signed: bool = True) -> Specials:
    """Special-value mode of a generic `[u]e<X>m<Y>` name written without a suffix.

    - 6 bits or fewer (FP4/FP6 family): NONE, as OCP E2M1/E2M3/E3M2;
    - signed with >= 5 exponent bits: IEEE, as E5M2, FP16, BF16, FP32 (wide range, spare binade);
    - otherwise FN, as OCP E4M3, Intel's E3M4 (max 30), the UE4M3/UE5M3 scales and E8M0.
    So `e4m3` is E4M3FN and `e3m4` has max 30; ml_dtypes' IEEE-style float8_e4m3 and float8_e3m4
    are `e4m3ieee` and `e3m4ieee`.
    """
    if int(signed) + exp_bits + man_bits <= 6:
        return Specials.NONE
    if signed and exp_bits >= 5 and man_bits >= 1:
        return Specials.IEEE
    return Specials.FN


def parse_format(name: str) -> Format:
    """Format for a name: registry names and aliases (case-insensitive), or a generic minifloat.

    Generic minifloats: `[u]e<X>m<Y>[fn|fnuz|ieee|none][_b<bias>]`, where `u` makes it unsigned,
    the suffix picks the special values (default: `default_specials`) and `_b` overrides the bias
    (`e4m3fnuz_b11` is ml_dtypes' float8_e4m3b11fnuz). A generic name whose numbers equal a
    registered format returns the registered one (`e4m3` -> `e4m3fn`, `e8m7` -> `bf16`).
    Unknown names raise KeyError listing the known ones.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    if m := _MINIFLOAT.fullmatch(key):
        unsigned, e, mant, suffix, bias = m.groups()
        e, mant, signed = int(e), int(mant), not unsigned
        specials = Specials(suffix) if suffix else default_specials(e, mant, signed)
        try:
            fmt = FloatFormat(key, e, mant, specials, int(bias) if bias else None, signed)
        except ValueError as err:
            raise KeyError(f"format {name!r}: {err}") from None
        return _BY_PARAMS.get((FloatFormat, fmt.params), fmt)
    known = ", ".join(sorted(FORMATS) + sorted(ALIASES))
    raise KeyError(
        f"unknown format {name!r}; known: {known}; "
        "or a generic minifloat [u]e<X>m<Y>[fn|fnuz|ieee|none][_b<bias>]"
    )
