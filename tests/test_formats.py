"""Formats are data: derived numbers against ml_dtypes / the specs, registry and parser."""

import math

import ml_dtypes
import numpy as np
import pytest

from qcompile.formats import (
    ALIASES,
    FORMATS,
    BlockFormat,
    FloatFormat,
    IntFormat,
    Specials,
    default_specials,
    parse_format,
)

# ml_dtypes type -> a name parse_format maps to the same numbers.
ML_DTYPE_NAMES = {
    "float8_e4m3fn": "e4m3fn",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2": "e5m2",
    "float8_e5m2fnuz": "e5m2fnuz",
    "float8_e4m3": "e4m3ieee",
    "float8_e3m4": "e3m4ieee",
    "float8_e4m3b11fnuz": "e4m3fnuz_b11",
    "float6_e2m3fn": "e2m3",
    "float6_e3m2fn": "e3m2",
    "float4_e2m1fn": "e2m1",
    "float8_e8m0fnu": "e8m0",
    "bfloat16": "e8m7",
    "float16": "e5m10",
}


def _ml_type(name):
    return np.float16 if name == "float16" else getattr(ml_dtypes, name)


@pytest.mark.parametrize("ml_name", sorted(ML_DTYPE_NAMES))
def test_derived_numbers_equal_ml_dtypes_finfo(ml_name):
    dtype = _ml_type(ml_name)
    fmt = parse_format(ML_DTYPE_NAMES[ml_name])
    fi = ml_dtypes.finfo(dtype)
    values = np.arange(2**fi.bits, dtype=np.uint16 if fi.bits == 16 else np.uint8)
    decoded = values.view(dtype).astype(np.float32)
    assert fmt.bits == fi.bits
    assert (fmt.exp_bits, fmt.man_bits) == (fi.nexp, fi.nmant)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert (fmt.emin, fmt.emax) == (fi.minexp, fi.maxexp - 1)
    assert fmt.has_inf == bool(np.isinf(decoded).any())
    assert fmt.has_nan == bool(np.isnan(decoded).any())
    assert fmt.has_zero == bool((decoded == 0).any())
    assert fmt.ml_dtype == np.dtype(dtype)


def test_e8m0_is_ocp_mx_scale():
    e8m0 = FORMATS["e8m0"]
    assert not e8m0.signed and e8m0.bits == 8 and e8m0.exponent_bias == 127
    assert e8m0.max == 2.0**127 and e8m0.min_normal == e8m0.min_subnormal == 2.0**-127
    assert e8m0.has_nan and not e8m0.has_inf and not e8m0.has_zero


def test_ocp_element_emax():
    """emax_elem of OCP MX v1.0 table 1 and the MXINT8 1.6 fixed-point element."""
    emax = {"e4m3fn": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2}
    assert {n: FORMATS[n].emax for n in emax} == emax
    elem = FORMATS["mxint8"].element
    assert (elem.qmin, elem.qmax, elem.max, elem.emax) == (-127, 127, 127 / 64, 0)


def test_ue5m3_convention():
    ue5m3 = FORMATS["ue5m3"]
    assert (ue5m3.bits, ue5m3.exponent_bias, ue5m3.signed) == (8, 15, False)
    assert ue5m3.max == 1.75 * 2**16 and ue5m3.min_subnormal == 2.0**-17


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_int_formats(bits, signed):
    fmt = FORMATS[f"{'' if signed else 'u'}int{bits}"]
    half = 2 ** (bits - 1)
    assert (fmt.qmin, fmt.qmax) == ((-half, half - 1) if signed else (0, 2**bits - 1))
    info = np.iinfo(fmt.storage_dtype)
    assert info.min <= fmt.qmin and fmt.qmax <= info.max and info.bits == (8 if bits <= 8 else 16)
    if fmt.onnx_dtype is not None:
        onnx_info = ml_dtypes.iinfo(fmt.onnx_dtype.numpy())
        assert (onnx_info.min, onnx_info.max) == (fmt.qmin, fmt.qmax)
    assert (fmt.onnx_dtype is not None) == (bits in (2, 4, 8, 16))


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if isinstance(f, FloatFormat)])
def test_onnx_dtype_agrees_with_ml_dtype(name):
    fmt = FORMATS[name]
    if fmt.onnx_dtype is not None:
        assert np.dtype(fmt.onnx_dtype.numpy()) == fmt.ml_dtype


def test_onnx_dtypes_of_registry():
    expected = {
        "fp16": "FLOAT16", "bf16": "BFLOAT16", "fp32": "FLOAT", "e4m3fn": "FLOAT8E4M3FN",
        "e4m3fnuz": "FLOAT8E4M3FNUZ", "e5m2": "FLOAT8E5M2", "e5m2fnuz": "FLOAT8E5M2FNUZ",
        "e2m1": "FLOAT4E2M1", "e8m0": "FLOAT8E8M0", "e2m3": "FLOAT6E2M3", "e3m2": "FLOAT6E3M2",
    }  # fmt: skip
    assert {n: FORMATS[n].onnx_dtype.name for n in expected} == expected
    assert FORMATS["ue5m3"].onnx_dtype is None and parse_format("e3m4").onnx_dtype is None


@pytest.mark.parametrize(
    "name, bits", [("mxfp8_e4m3", 8.25), ("mxfp8_e5m2", 8.25), ("mxfp6_e2m3", 6.25),
                   ("mxfp6_e3m2", 6.25), ("mxfp4", 4.25), ("mxint8", 8.25), ("nvfp4", 4.5)],
)  # fmt: skip
def test_block_bits_per_element(name, bits):
    fmt = FORMATS[name]
    assert fmt.kind == "block" and fmt.bits_per_element == bits


def test_block_registry():
    for name, fmt in FORMATS.items():
        if isinstance(fmt, BlockFormat) and name != "nvfp4":
            assert fmt.scale is FORMATS["e8m0"] and fmt.block_size == 32 and fmt.tensor_scale is None
    nv = FORMATS["nvfp4"]
    assert (nv.element, nv.scale, nv.block_size, nv.tensor_scale) == (
        FORMATS["e2m1"], FORMATS["e4m3fn"], 16, FORMATS["fp32"])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_registry_names_round_trip(name):
    fmt = FORMATS[name]
    assert fmt.name == name
    assert parse_format(name) is fmt and parse_format(f" {name.upper()} ") is fmt
    assert fmt.kind in ("int", "float", "block")


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases(alias):
    assert alias not in FORMATS
    assert parse_format(alias) is FORMATS[ALIASES[alias]]


def test_generic_names():
    assert parse_format("e4m3") is FORMATS["e4m3fn"]
    assert parse_format("e5m2") is FORMATS["e5m2"] and FORMATS["e5m2"].specials is Specials.IEEE
    assert parse_format("e5m2ieee") is FORMATS["e5m2"]
    assert parse_format("e8m7") is FORMATS["bf16"] and parse_format("e5m10") is FORMATS["fp16"]
    assert parse_format("ue8m0fn") is FORMATS["e8m0"]
    for name in ("e2m1", "e2m3", "e3m2"):
        assert parse_format(name).specials is Specials.NONE
    e3m4 = parse_format("e3m4")
    assert (e3m4.specials, e3m4.max) == (Specials.FN, 30.0)  # Intel's E3M4 (Shen et al.)
    assert parse_format("e5m2fnuz") is FORMATS["e5m2fnuz"]
    assert parse_format("int6") is FORMATS["int6"] and parse_format("uint3") is FORMATS["uint3"]
    assert parse_format("mxfp6_e2m3") is FORMATS["mxfp6_e2m3"]
    e5m7 = parse_format("e5m7")
    assert (e5m7.bits, e5m7.specials, e5m7.name) == (13, Specials.IEEE, "e5m7")
    ue4m3 = parse_format("ue4m3")
    assert (ue4m3.signed, ue4m3.max) == (False, 448.0)  # NVFP4's UE4M3 scale


def test_default_specials_rule():
    assert default_specials(2, 1) is Specials.NONE
    assert default_specials(3, 2) is Specials.NONE
    assert default_specials(4, 3) is Specials.FN
    assert default_specials(5, 2) is Specials.IEEE
    assert default_specials(8, 0, signed=False) is Specials.FN
    assert default_specials(5, 3, signed=False) is Specials.FN


@pytest.mark.parametrize(
    "name", ["int17", "int1", "fp7", "mxfp3", "e9m30", "ue4m3fnuz", "e8m0ieee", ""]
)
def test_unknown_name_lists_known(name):
    with pytest.raises(KeyError) as err:
        parse_format(name)
    if not name.startswith(("e", "ue")) or name == "":
        assert "mxfp4" in str(err.value) and "int8" in str(err.value) and "fp8" in str(err.value)


def test_invalid_formats_are_rejected():
    with pytest.raises(ValueError):
        IntFormat("int17", 17, True)
    with pytest.raises(ValueError):
        FloatFormat("u_fnuz", 4, 3, Specials.FNUZ, signed=False)
    with pytest.raises(ValueError):
        FloatFormat("e9m2", 9, 2, Specials.IEEE)  # beyond float32
    with pytest.raises(ValueError):
        BlockFormat("b0", FORMATS["e2m1"], FORMATS["e8m0"], 0)
    with pytest.raises(ValueError):
        BlockFormat("mx_t", FORMATS["e2m1"], FORMATS["e8m0"], 32, tensor_scale=FORMATS["fp32"])


def test_formats_are_hashable_and_frozen():
    fmt = FORMATS["e4m3fn"]
    assert {fmt: 1}[parse_format("fp8")] == 1
    with pytest.raises(AttributeError):
        fmt.man_bits = 4
    assert math.isclose(FORMATS["fp16"].max, 65504.0)
