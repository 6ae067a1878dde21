"""`qcompile` custom ops as ONNX functions made of standard ops only.

Stock onnxruntime (CPU, no extra library) inlines model-local functions, so these ops run anywhere;
every body below is bit-exact with the numpy reference (`qcompile.codec`, `storage.PackedTensor`)
at every optimization level. Domain `qcompile`, version 1. `function_protos()` import default-domain
opset 21; `attach` sets each function's default-domain import to the model's own (onnx.checker
requires them equal), which is valid from the op's minimum opset (`OP_MIN_OPSET`: 13 for
UnpackBits and the LUT decoders, 18 for the FakeQuant ops' ReduceMax(axes input), 19 for the
float8 Cast of the NVFP4 ops) through opset 26 -- later versions of the ops used only add types.
Integer attributes written `@name` below are function attributes, referenced inside the bodies
(`ref_attr_name`).

UnpackBits(packed: uint8[N]) -> codes: uint8[shape]                   attrs bits (<= 8), shape
    bit offset o = i * bits of code i (C order); the two stream bytes at o // 8 form a 16-bit word
    w = p[o // 8] | p[o // 8 + 1] << 8 (the stream is padded with one zero byte), and
    code_i = (w >> (o % 8)) & (2**bits - 1), computed as w // 2**(o % 8) % 2**bits on int64.
    Inverse of `codec.pack`.

Every Dequantize* op computes value = element(code) * scale_value[block(i)] (storage.py layout),
with one scale-expansion rule for per-tensor, per-channel and blocked scales:
    full = Gather(scale_values, Range(0, shape[axis]) // block_size, axis=axis);  out = values * full
element(code) = Gather(lut, code), lut = codec.decode(codec.all_codes(fmt)), float32.

DequantizeFP4(packed, scale: float32)                                  attrs shape, axis, block_size
    E2M1 elements (the 16-entry lut is a constant of the body), float32 scales.
DequantizeMinifloat(packed, scale: float32, lut: float32[2**bits])     attrs bits, shape, axis, block_size
    any scalar format decoded by a lookup table (ExMy minifloats, int3, int5, fixed point, ...).
DequantizeMX(packed, scale: uint8 E8M0 codes, lut: float32[2**bits])   attrs bits, shape, axis, block_size
    scale value = E8M0[code] = 2**(code - 127), code 255 -> NaN (a 256-entry constant of the body).
DequantizeNVFP4(packed, scale: float8e4m3fn, tensor_scale: float32[])  attrs shape, axis, block_size
    scale value = float32(Cast(scale, float) * tensor_scale); E2M1 elements.

Rounding to a format's grid (shared by the FakeQuant ops), for y a float32 tensor; the grid is the
attributes mantissa_bits m, emin, emax (ints), min, max (floats), signed_zero, has_nan (0/1):
    c = Clip(y, min, max);  a = |c|
    e = clip(floor(log2(max(a, 2**emin))), emin, emax)         -- exact, see below
    step = 2**(e - m);  r = Round(a / step) * step              -- ONNX Round is half to even
    r = NaN (has_nan) or 0 where y is NaN
    out = r * (-1 where c < 0 or c is -0.0 (1/c < 0), unless r == 0 and signed_zero == 0; else 1)
  (A sign factor, not Where(neg, -r, r): onnxruntime 1.31's Where turns a -0.0 taken from its X
  input into +0.0; values are only ever passed as Where's Y input.)
  On an unsigned grid (min = 0) a negative y becomes +0.0, where codec.round_to_grid keeps the
  -0.0 that numpy's rint-then-clip gives y in [-step/2, 0); every other result is bitwise equal.
  A minifloat has e its binade (subnormals share emin's step). An integer / fixed-point grid is
  the one-binade case m = 0, emin = emax = -frac_bits, [min, max] = [qmin, qmax] * 2**-frac_bits
  (asymmetric saturation such as int4's -8..7 comes from the Clip). Powers of two are read from a
  constant table POW2[k + 149] = 2**k (k = -149..127, float32, subnormals included). floor(log2 a)
  for a >= 2**-126 (normal) is est = Floor(Log(a) / ln 2), at most one off because Log is accurate
  to a few ulp, then corrected exactly: est - (a < 2**est) + (a >= 2**(est + 1)).

FakeQuantMinifloat(x, scale: float32[]) -> Round_grid(x / scale) * scale      attrs: the grid
FakeQuantMX(x) -> dynamic OCP MX blocks of block_size along axis              attrs: grid, axis,
    block_size, emax_elem. Blocks: x is reshaped to [pre, n, post], transposed to [pre, post, n],
    zero-padded on n to a whole number of blocks and viewed as [pre, post, n_blocks, block_size]; per block
    amax = max |x|, X = 2**clip(floor(log2 amax) - emax_elem, -127, 127) (amax < 2**-126 counts
    as exponent -127), X = NaN for a block holding inf/NaN (detected as IsNaN(ReduceSum(x * 0)):
    onnxruntime's ReduceMax does not always propagate NaN); out = Round_grid(x / X) * X.
FakeQuantNVFP4(x, tensor_scale: float32[]) -> NVFP4 blocks, static tensor scale s_t  attrs axis,
    block_size. s_b = Round_e4m3fn(amax / 6 / s_t) (NaN for a non-finite block), d = s_b * s_t,
    out = Round_e2m1(x / d) * d, and 0 where d == 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from qcompile import codec
from qcompile.formats import FORMATS, BlockFormat, FloatFormat, IntFormat
from qcompile.graph import initializer
from qcompile.storage import PackedTensor

DOMAIN = "qcompile"
VERSION = 1
MIN_OPSET = 21  # default-domain opset of function_protos() (every op works in models of this opset and up)
OP_MIN_OPSET = {"UnpackBits": 13, "DequantizeFP4": 13, "DequantizeMinifloat": 13, "DequantizeMX": 13,
                "DequantizeNVFP4": 19, "FakeQuantMinifloat": 13, "FakeQuantMX": 18, "FakeQuantNVFP4": 19}

_E2M1, _E4M3FN, _E8M0 = FORMATS["e2m1"], FORMATS["e4m3fn"], FORMATS["e8m0"]
_POW2_MIN = -149  # POW2[k - _POW2_MIN] = 2**k for k = -149..127
_MIN_NORMAL_EXP = -126  # log2 of the smallest normal float32 (Log is only trusted from here up)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def lut(fmt: IntFormat | FloatFormat) -> np.ndarray:
    """float32 value of every code 0 .. 2**bits - 1 (invalid narrow-range codes decode too)."""
    return codec.decode(np.arange(2**fmt.bits), fmt)


def _pow2_table() -> np.ndarray:
    return np.ldexp(np.float64(1.0), np.arange(_POW2_MIN, 128)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Function-body builder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """A function attribute used inside the body (`<attr> = @name`)."""

    name: str
    type: int = AttributeProto.INT


_CONSTANT_ATTR = {AttributeProto.INT: "value_int", AttributeProto.INTS: "value_ints", AttributeProto.FLOAT: "value_float"}


class _Body:
    """Appends NodeProtos; every call returns the (unique) name of the new node's output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._pow2: str | None = None

    def __call__(self, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
        out = f"{op_type[0].lower()}{op_type[1:]}_{len(self.nodes)}"
        plain = {k: v for k, v in attrs.items() if not isinstance(v, _Ref)}
        node = helper.make_node(op_type, list(inputs), [out], domain=domain, **plain)
        for key, ref in attrs.items():
            if isinstance(ref, _Ref):
                node.attribute.append(AttributeProto(name=key, ref_attr_name=ref.name, type=ref.type))
        self.nodes.append(node)
        return out

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)

    def attr(self, name: str, type: int = AttributeProto.INT) -> str:
        """The value of function attribute `name` as a tensor (int64 scalar / int64[] / float)."""
        return self("Constant", **{_CONSTANT_ATTR[type]: _Ref(name, type)})

    def pow2(self, k: str) -> str:
        """2**k (float32) for an int64 tensor k in -149..127, from the constant POW2 table."""
        if self._pow2 is None:
            self._pow2 = self.const(_pow2_table(), np.float32)
        return self("Gather", self._pow2, self("Add", k, self.const(-_POW2_MIN)))

    def function(self, name: str, inputs: list[str], attributes: list[str], doc: str) -> onnx.FunctionProto:
        opsets = [helper.make_opsetid("", MIN_OPSET), helper.make_opsetid(DOMAIN, VERSION)]
        output = self.nodes[-1].output[0]
        return helper.make_function(DOMAIN, name, inputs, [output], self.nodes, opsets, attributes, doc_string=doc)


# ---------------------------------------------------------------------------------------------
# Shared subgraphs
# ---------------------------------------------------------------------------------------------


def _unpack_bits(b: _Body, packed: str) -> str:
    """Integer arithmetic on int64 (word // 2**shift % 2**bits): valid from opset 13 up."""
    bits, shape = b.attr("bits"), b.attr("shape", AttributeProto.INTS)
    count = b("ReduceProd", shape, keepdims=0)
    offset = b("Mul", b("Range", b.const(0), count, b.const(1)), bits)
    first = b("Div", offset, b.const(8))
    stream = b("Cast", b("Concat", packed, b.const([0], np.uint8), axis=0), to=TensorProto.INT64)
    high = b("Mul", b("Gather", stream, b("Add", first, b.const(1))), b.const(256))
    word = b("Add", b("Gather", stream, first), high)
    powers = b.const(2 ** np.arange(9))
    shifted = b("Div", word, b("Gather", powers, b("Mod", offset, b.const(8))))
    code = b("Mod", shifted, b("Gather", powers, bits))
    return b("Reshape", b("Cast", code, to=TensorProto.UINT8), shape)


def _element_values(b: _Body, packed: str, table: str, bits: int | _Ref) -> str:
    """Gather(table, UnpackBits(packed)) with the op's `shape` (a nested qcompile.UnpackBits)."""
    codes = b("UnpackBits", packed, domain=DOMAIN, bits=bits, shape=_Ref("shape", AttributeProto.INTS))
    return b("Gather", table, b("Cast", codes, to=TensorProto.INT64))


def _scaled(b: _Body, values: str, scale_values: str) -> str:
    """values * Gather(scale_values, Range(0, shape[axis]) // block_size, axis=axis)."""
    n = b("Gather", b.attr("shape", AttributeProto.INTS), b.attr("axis"))
    block = b("Div", b("Range", b.const(0), n, b.const(1)), b.attr("block_size"))
    return b("Mul", values, b("Gather", scale_values, block, axis=_Ref("axis")))


def _floor_log2(b: _Body, a: str) -> str:
    """Exact floor(log2 a) (int64) for float32 a >= 2**-126; garbage (in range) for inf/NaN."""
    est = b("Cast", b("Floor", b("Mul", b("Log", a), b.f32(1 / math.log(2)))), to=TensorProto.INT64)
    est = b("Min", b("Max", est, b.const(_MIN_NORMAL_EXP)), b.const(127))
    p = b.pow2(est)
    below = b("Cast", b("Less", a, p), to=TensorProto.INT64)
    above = b("Cast", b("GreaterOrEqual", a, b("Mul", p, b.f32(2.0))), to=TensorProto.INT64)
    return b("Add", b("Sub", est, below), above)


_GRID = ("mantissa_bits", "emin", "emax", "min", "max", "signed_zero", "has_nan")
_FLOAT_ATTRS = {"min", "max"}


def grid_attributes(fmt: IntFormat | FloatFormat, encoded: bool = False) -> dict[str, int | float]:
    """The FakeQuant grid attributes of a scalar format (see the module doc).

    `encoded`: the reference goes through codec.encode/decode (block formats), where an integer
    code cannot hold -0; plain round_to_grid (FakeQuantMinifloat) keeps the sign of an int zero.
    """
    if isinstance(fmt, IntFormat):
        step = math.ldexp(1.0, -fmt.frac_bits)
        return dict(mantissa_bits=0, emin=-fmt.frac_bits, emax=-fmt.frac_bits, min=fmt.qmin * step,
                    max=fmt.qmax * step, signed_zero=int(not encoded), has_nan=0)
    if not fmt.has_zero or fmt.emin < _MIN_NORMAL_EXP:
        raise NotImplementedError(f"{fmt.name}: FakeQuant needs a format with zero and emin >= -126")
    return dict(mantissa_bits=fmt.man_bits, emin=fmt.emin, emax=fmt.emax, min=-fmt.max if fmt.signed else 0.0,
                max=fmt.max, signed_zero=int(fmt.has_negative_zero), has_nan=int(fmt.has_nan))


def _grid_refs(b: _Body) -> dict[str, str]:
    return {k: b.attr(k, AttributeProto.FLOAT if k in _FLOAT_ATTRS else AttributeProto.INT) for k in _GRID}


def _grid_consts(b: _Body, fmt: IntFormat | FloatFormat) -> dict[str, str]:
    g = grid_attributes(fmt, encoded=True)
    return {k: b.f32(v) if k in _FLOAT_ATTRS else b.const(v) for k, v in g.items()}


def _round_to_grid(b: _Body, y: str, g: dict[str, str]) -> str:
    c = b("Clip", y, g["min"], g["max"])
    a = b("Abs", c)
    e = _floor_log2(b, b("Max", a, b.pow2(g["emin"])))
    e = b("Min", b("Max", e, g["emin"]), g["emax"])
    step = b.pow2(b("Sub", e, g["mantissa_bits"]))
    r = b("Mul", b("Round", b("Div", a, step)), step)
    nan = b("Where", b("Cast", g["has_nan"], to=TensorProto.BOOL), b.f32(np.nan), b.f32(0.0))
    r = b("Where", b("IsNaN", y), nan, r)
    negative = b("Less", b("Reciprocal", c), b.f32(0.0))  # true for c < 0 and for c = -0.0
    keep_sign = b("Or", b("Not", b("Equal", r, b.f32(0.0))), b("Cast", g["signed_zero"], to=TensorProto.BOOL))
    # the sign is a +-1 factor: onnxruntime's Where returns +0.0 for a -0.0 taken from its X input
    return b("Mul", r, b("Where", b("And", negative, keep_sign), b.f32(-1.0), b.f32(1.0)))


class _Blocks:
    """x viewed as [pre, post, n_blocks, block_size] blocks along `@axis` (zero-padded), and back.

    The block is the innermost axis on purpose: onnxruntime's broadcasting elementwise kernels
    run one element per inner loop when the innermost output dim is 1 ([pre, n_blocks,
    block_size, 1] made FakeQuantMX ~10x slower).
    """

    def __init__(self, b: _Body, x: str) -> None:
        self.b, one = b, b.const([1])
        self.shape = b("Shape", x)
        rank = b("Size", self.shape)
        axis = b("Unsqueeze", b("Mod", b("Add", b.attr("axis"), rank), rank), b.const([0]))
        size = b.attr("block_size")
        self.n = b("Gather", self.shape, axis)
        n_blocks = b("Div", b("Add", self.n, b("Sub", size, b.const(1))), size)
        self.padded = b("Mul", n_blocks, size)
        self.pre = b("ReduceProd", b("Concat", one, b("Slice", self.shape, b.const([0]), axis), axis=0))
        after = b("Add", axis, one)
        self.post = b("ReduceProd", b("Concat", one, b("Slice", self.shape, after, b.const([2**62])), axis=0))
        x3 = b("Transpose", b("Reshape", x, b("Concat", self.pre, self.n, self.post, axis=0)), perm=[0, 2, 1])
        pads = b("Concat", b.const([0, 0, 0, 0, 0]), b("Sub", self.padded, self.n), axis=0)
        view = b("Concat", self.pre, self.post, n_blocks, b("Unsqueeze", size, b.const([0])), axis=0)
        self.x = b("Reshape", b("Pad", x3, pads), view)
        self.amax = b("ReduceMax", b("Abs", self.x), b.const([3]), keepdims=1)
        # onnxruntime's ReduceMax may skip NaN; a sum of x * 0 is NaN exactly when a block holds inf/NaN
        poison = b("ReduceSum", b("Mul", self.x, b.f32(0.0)), b.const([3]), keepdims=1)
        self.non_finite = b("IsNaN", poison)

    def restore(self, y: str) -> str:
        b = self.b
        y3 = b("Reshape", y, b("Concat", self.pre, self.post, self.padded, axis=0))
        y3 = b("Slice", y3, b.const([0]), self.n, b.const([2]))
        return b("Reshape", b("Transpose", y3, perm=[0, 2, 1]), self.shape)


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

_DQ_ATTRS = ["shape", "axis", "block_size"]


def _unpack_bits_fn() -> onnx.FunctionProto:
    b = _Body()
    _unpack_bits(b, "packed")
    return b.function("UnpackBits", ["packed"], ["bits", "shape"], "uint8 codes of `shape` from a packed bit stream")


def _dequantize_fp4_fn() -> onnx.FunctionProto:
    b = _Body()
    values = _element_values(b, "packed", b.const(lut(_E2M1), np.float32), 4)
    _scaled(b, values, "scale")
    return b.function("DequantizeFP4", ["packed", "scale"], _DQ_ATTRS, "E2M1 codes * float32 scales")


def _dequantize_minifloat_fn() -> onnx.FunctionProto:
    b = _Body()
    _scaled(b, _element_values(b, "packed", "lut", _Ref("bits")), "scale")
    return b.function("DequantizeMinifloat", ["packed", "scale", "lut"], ["bits", *_DQ_ATTRS],
                      "lut[code] * float32 scales")


def _dequantize_mx_fn() -> onnx.FunctionProto:
    b = _Body()
    scale = b("Gather", b.const(lut(_E8M0), np.float32), b("Cast", "scale", to=TensorProto.INT64))
    _scaled(b, _element_values(b, "packed", "lut", _Ref("bits")), scale)
    return b.function("DequantizeMX", ["packed", "scale", "lut"], ["bits", *_DQ_ATTRS],
                      "lut[code] * 2**(E8M0 scale code - 127)")


def _dequantize_nvfp4_fn() -> onnx.FunctionProto:
    b = _Body()
    scale = b("Mul", b("Cast", "scale", to=TensorProto.FLOAT), "tensor_scale")
    _scaled(b, _element_values(b, "packed", b.const(lut(_E2M1), np.float32), 4), scale)
    return b.function("DequantizeNVFP4", ["packed", "scale", "tensor_scale"], _DQ_ATTRS,
                      "E2M1 codes * float32(E4M3 scale * tensor_scale)")


def _fake_quant_minifloat_fn() -> onnx.FunctionProto:
    b = _Body()
    r = _round_to_grid(b, b("Div", "x", "scale"), _grid_refs(b))
    b("Mul", r, "scale")
    return b.function("FakeQuantMinifloat", ["x", "scale"], list(_GRID), "round_to_grid(x / scale) * scale")


def _fake_quant_mx_fn() -> onnx.FunctionProto:
    b = _Body()
    blocks = _Blocks(b, "x")
    tiny = b("Less", blocks.amax, b.f32(2.0**_MIN_NORMAL_EXP))
    e = _floor_log2(b, b("Max", blocks.amax, b.f32(2.0**_MIN_NORMAL_EXP)))
    e = b("Sub", e, b("Cast", tiny, to=TensorProto.INT64))  # any amax < 2**-126 clamps to 2**-127
    shared = b("Min", b("Max", b("Sub", e, b.attr("emax_elem")), b.const(-127)), b.const(127))
    scale = b("Where", blocks.non_finite, b.f32(np.nan), b.pow2(shared))
    r = _round_to_grid(b, b("Div", blocks.x, scale), _grid_refs(b))
    blocks.restore(b("Mul", r, scale))
    return b.function("FakeQuantMX", ["x"], ["axis", "block_size", "emax_elem", *_GRID],
                      "OCP MX quantize-dequantize with dynamic E8M0 block scales")


def _fake_quant_nvfp4_fn() -> onnx.FunctionProto:
    b = _Body()
    blocks = _Blocks(b, "x")
    ratio = b("Div", b("Div", blocks.amax, b.f32(_E2M1.max)), "tensor_scale")
    block_scale = _round_to_grid(b, ratio, _grid_consts(b, _E4M3FN))
    block_scale = b("Where", blocks.non_finite, b.f32(np.nan), block_scale)
    d = b("Mul", block_scale, "tensor_scale")
    zero = b("Equal", d, b.f32(0.0))
    v = b("Where", zero, b.f32(0.0), b("Div", blocks.x, d))  # x / d as Y: Where keeps its -0.0
    blocks.restore(b("Mul", _round_to_grid(b, v, _grid_consts(b, _E2M1)), d))
    return b.function("FakeQuantNVFP4", ["x", "tensor_scale"], ["axis", "block_size"],
                      "NVFP4 quantize-dequantize: dynamic E4M3 block scales, static tensor scale")


_BUILDERS = {
    "UnpackBits": _unpack_bits_fn,
    "DequantizeFP4": _dequantize_fp4_fn,
    "DequantizeMinifloat": _dequantize_minifloat_fn,
    "DequantizeMX": _dequantize_mx_fn,
    "DequantizeNVFP4": _dequantize_nvfp4_fn,
    "FakeQuantMinifloat": _fake_quant_minifloat_fn,
    "FakeQuantMX": _fake_quant_mx_fn,
    "FakeQuantNVFP4": _fake_quant_nvfp4_fn,
}


@functools.cache
def _protos() -> dict[str, bytes]:
    return {name: build().SerializeToString() for name, build in _BUILDERS.items()}


def function_proto(op_type: str) -> onnx.FunctionProto:
    proto = onnx.FunctionProto()
    proto.ParseFromString(_protos()[op_type])
    return proto


def function_protos() -> list[onnx.FunctionProto]:
    """A fresh FunctionProto of every qcompile op."""
    return [function_proto(name) for name in _BUILDERS]


# ---------------------------------------------------------------------------------------------
# Graph API
# ---------------------------------------------------------------------------------------------


class Emitter:
    """Adds initializers and nodes to `graph` under names unused in it (value and node names).

    The graph is scanned once, when the Emitter is made: a pass that emits many ops keeps one
    Emitter and hands it to the functions below in place of the graph (they accept either), so
    its own names and theirs come from one set and the graph is not rescanned per op.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.names = set(graph.initializers) | {v.name for v in graph.inputs} | {
            o.name for n in ir.traversal.RecursiveGraphIterator(graph) for o in n.outputs} | {
            n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def initializer(self, name: str, array: np.ndarray, shared: bool = False) -> ir.Value:
        """Register `array`; with `shared`, reuse an equal initializer already named `name`."""
        existing = self.graph.initializers.get(name)
        if shared and existing is not None and existing.const_value is not None:
            old = existing.const_value.numpy()
            if old.dtype == array.dtype and np.array_equal(old, array, equal_nan=True):
                return existing
        return initializer(self.graph, self.fresh(name), array)

    def node(self, op_type: str, inputs: list[ir.Value], attrs: dict, out: str, dtype: ir.DataType, shape,
             domain: str = DOMAIN) -> ir.Value:
        value = ir.Value(name=self.fresh(out), shape=None if shape is None else ir.Shape(shape), type=ir.TensorType(dtype))
        self.graph.append(ir.node(op_type, inputs, attrs, domain=domain, outputs=[value], name=value.name))
        return value

    def packed(self, t: PackedTensor, name: str) -> ir.Value:
        return self.initializer(f"{name}_packed", t.packed())

    def stored_scale(self, t: PackedTensor, name: str) -> ir.Value:
        """The scale in its storage type: float32, E8M0 codes (uint8) or FLOAT8E4M3FN."""
        if not isinstance(t.fmt, BlockFormat):
            array = np.asarray(t.scale, dtype=np.float32)
        elif _is_mx(t.fmt):
            array = np.asarray(t.scale, dtype=np.uint8)
        elif _is_nvfp4(t.fmt):
            array = np.asarray(t.scale, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        else:
            raise NotImplementedError(f"{t.fmt.name}: no qcompile op for this block format")
        return self.initializer(f"{name}_scale", array)

    def scalar(self, value: float, name: str) -> ir.Value:
        return self.initializer(name, np.asarray(value, dtype=np.float32))

    def lut(self, fmt: IntFormat | FloatFormat) -> ir.Value:
        return self.initializer(f"qcompile_lut_{fmt.name}", lut(fmt), shared=True)


def _is_mx(fmt) -> bool:
    return isinstance(fmt, BlockFormat) and fmt.scale.params == _E8M0.params and fmt.tensor_scale is None


def _is_nvfp4(fmt) -> bool:
    return (isinstance(fmt, BlockFormat) and fmt.element.params == _E2M1.params
            and fmt.scale.params == _E4M3FN.params and fmt.tensor_scale is not None)


def _emitter(graph: ir.Graph | Emitter) -> Emitter:
    return graph if isinstance(graph, Emitter) else Emitter(graph)


def op_type(fmt, role: str) -> str:
    """The qcompile op that `dequantize` (role "weight") or `fake_quant` (role "activation") emits for fmt."""
    if role == "weight":
        if _is_nvfp4(fmt):
            return "DequantizeNVFP4"
        if _is_mx(fmt):
            return "DequantizeMX"
        if isinstance(fmt, FloatFormat) and fmt.params == _E2M1.params:
            return "DequantizeFP4"
        return "DequantizeMinifloat"
    if isinstance(fmt, (IntFormat, FloatFormat)):
        return "FakeQuantMinifloat"
    if _is_mx(fmt):
        return "FakeQuantMX"
    if _is_nvfp4(fmt):
        return "FakeQuantNVFP4"
    raise NotImplementedError(f"{fmt.name}: no qcompile FakeQuant op for this format")


def packed_codes(graph: ir.Graph | Emitter, t: PackedTensor, name: str) -> ir.Value:
    """Register the densely packed element codes as a 1-D uint8 initializer."""
    return _emitter(graph).packed(t, name)


def scale_values(graph: ir.Graph | Emitter, t: PackedTensor, name: str) -> tuple[ir.Value, ir.Value]:
    """(stored scale, float32 scale values shaped like t.scale): standard ops on initializers."""
    e = _emitter(graph)
    stored, shape, f32 = e.stored_scale(t, name), t.scale.shape, ir.DataType.FLOAT
    if not isinstance(t.fmt, BlockFormat):
        return stored, stored
    if _is_mx(t.fmt):
        table = e.initializer("qcompile_e8m0_values", lut(_E8M0), shared=True)
        index = e.node("Cast", [stored], {"to": ir.DataType.INT64}, f"{name}_scale_index", ir.DataType.INT64, shape, "")
        return stored, e.node("Gather", [table, index], {}, f"{name}_scale_values", f32, shape, "")
    decoded = e.node("Cast", [stored], {"to": f32}, f"{name}_scale_decoded", f32, shape, "")
    tensor_scale = e.scalar(t.tensor_scale, f"{name}_tensor_scale")
    return stored, e.node("Mul", [decoded, tensor_scale], {}, f"{name}_scale_values", f32, shape, "")


def unpack(graph: ir.Graph | Emitter, packed: ir.Value, bits: int, shape: tuple[int, ...], name: str) -> ir.Value:
    """qcompile.UnpackBits: uint8 codes of `shape` from a packed stream (bits <= 8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"UnpackBits handles 1..8-bit codes, not {bits}")
    attrs = {"bits": bits, "shape": [int(d) for d in shape]}
    return _emitter(graph).node("UnpackBits", [packed], attrs, f"{name}_codes", ir.DataType.UINT8, shape)


def dequantize(graph: ir.Graph | Emitter, t: PackedTensor, name: str) -> ir.Value:
    """Append the qcompile Dequantize* node of `t` (registering its initializers); float32 output."""
    element, e = t.element, _emitter(graph)
    if element.bits > 8:
        raise NotImplementedError(f"{element.name}: qcompile ops decode codes of at most 8 bits")
    packed, scale = e.packed(t, name), e.stored_scale(t, name)
    attrs = {"shape": [int(d) for d in t.shape], "axis": int(t.axis), "block_size": int(t.block_size)}
    op = op_type(t.fmt if isinstance(t.fmt, BlockFormat) else element, "weight")
    if op == "DequantizeNVFP4":
        inputs = [packed, scale, e.scalar(t.tensor_scale, f"{name}_tensor_scale")]
    elif op == "DequantizeFP4":
        inputs = [packed, scale]
    else:  # DequantizeMX, DequantizeMinifloat
        inputs, attrs = [packed, scale, e.lut(element)], {"bits": element.bits} | attrs
    return e.node(op, inputs, attrs, f"{name}_dq", ir.DataType.FLOAT, t.shape)


def fake_quant(graph: ir.Graph | Emitter, x: ir.Value, fmt, name: str, scale: float | None = None,
               tensor_scale: float | None = None, axis: int | None = -1) -> ir.Value:
    """Append a qcompile.FakeQuant* (quantize-dequantize) node on activation `x`; float32 output."""
    axis, e = -1 if axis is None else int(axis), _emitter(graph)
    op = op_type(fmt, "activation")
    if op == "FakeQuantMinifloat":
        if scale is None:
            raise ValueError(f"{fmt.name}: FakeQuantMinifloat needs a per-tensor scale")
        inputs, attrs = [x, e.scalar(scale, f"{name}_scale")], minifloat_attributes(fmt)
    elif op == "FakeQuantMX":
        grid = grid_attributes(fmt.element, encoded=True)
        inputs = [x]
        attrs = {"axis": axis, "block_size": fmt.block_size, "emax_elem": fmt.element.emax} | grid
    else:
        if tensor_scale is None:
            raise ValueError(f"{fmt.name}: FakeQuantNVFP4 needs a static tensor scale")
        inputs = [x, e.scalar(tensor_scale, f"{name}_tensor_scale")]
        attrs = {"axis": axis, "block_size": fmt.block_size}
    attrs = {k: float(v) if k in _FLOAT_ATTRS else v for k, v in attrs.items()}
    return e.node(op, inputs, attrs, f"{name}_fq", ir.DataType.FLOAT, x.shape)


def minifloat_attributes(fmt: IntFormat | FloatFormat) -> dict[str, int | float]:
    """FakeQuantMinifloat's attributes for a scalar format (its grid, float attributes as floats)."""
    return {k: float(v) if k in _FLOAT_ATTRS else v for k, v in grid_attributes(fmt).items()}


def _used_ops(nodes) -> set[str]:
    return {n.op_type for n in nodes if n.domain == DOMAIN}


def attach(model: ir.Model) -> None:
    """Make model.functions hold exactly the qcompile functions its nodes need (transitively), with
    the qcompile opset imported iff any: adds the missing ones, drops those a rewrite left unused."""
    pending = _used_ops(ir.traversal.RecursiveGraphIterator(model.graph))
    pending |= {op for key, f in model.functions.items() if key[0] != DOMAIN  # ours count only if reached
                for op in _used_ops(ir.traversal.RecursiveGraphIterator(f))}
    opset = model.opset_imports.get("", MIN_OPSET)
    done: set[str] = set()
    while pending:
        op = pending.pop()
        done.add(op)
        key = (DOMAIN, op, "")
        if key not in model.functions:
            if op not in _BUILDERS:
                raise KeyError(f"{DOMAIN}.{op} is not a qcompile op")
            if opset < OP_MIN_OPSET[op]:
                raise ValueError(f"{DOMAIN}.{op} needs default-domain opset >= {OP_MIN_OPSET[op]}, model has {opset}")
            function = ir.serde.deserialize_function(function_proto(op))
            function.opset_imports[""] = opset
            model.functions[key] = function
        pending |= _used_ops(ir.traversal.RecursiveGraphIterator(model.functions[key])) - done
    for key in [key for key in model.functions if key[0] == DOMAIN and key[1] not in done]:
        del model.functions[key]
    if done:
        model.opset_imports[DOMAIN] = VERSION
    else:
        model.opset_imports.pop(DOMAIN, None)


__all__ = [
    "DOMAIN", "VERSION", "MIN_OPSET", "OP_MIN_OPSET", "Emitter", "attach", "op_type", "dequantize", "fake_quant", "function_proto",
    "minifloat_attributes",
    "function_protos", "grid_attributes", "lut", "packed_codes", "scale_values", "unpack",
]
