"""Integer lowering of low-bit MatMul weights to onnxruntime MatMulNBits digit planes (nbits.py).

Tolerances:
- accuracy_level 0 against float64 numpy x @ t.dequantize(): max |diff| / max |ref| <= 1e-5. The
  lowering is exact in real arithmetic (integer digits, power-of-two plane factors); only float32
  summation order differs (measured <= 1e-6).
- accuracy_level 4 quantizes the activation to int8 per block: SQNR > 30 dB (measured ~45 dB).
"""
from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
from qcompile import codec, storage
from qcompile.backends.onnxruntime import nbits
from qcompile.formats import BlockFormat, parse_format
from qcompile.plan import PerBlock, PerChannel, QuantSpec
from qcompile.weights import quantize_weight

RTOL = 1e-5  # see module doc
SQNR_LEVEL4 = 30.0

SCALAR = ["int2", "int3", "int4", "uint4", "int8", "e2m1", "e2m3", "e3m2"]
BLOCK = ["mxfp4", "mxfp6_e2m3", "mxint8", "nvfp4"]
PLANES = {"int2": 1, "int3": 1, "int4": 1, "uint4": 1, "int8": 2, "e2m1": 2, "e2m3": 2, "e3m2": 3,
          "mxfp4": 2, "mxfp6_e2m3": 2, "mxint8": 2, "nvfp4": 2}  # fmt: skip
UNITS = {"e2m1": 0.5, "e2m3": 0.125, "e3m2": 0.0625, "mxfp4": 0.5, "mxfp6_e2m3": 0.125, "nvfp4": 0.5,
         "mxint8": 2.0**-6}
# (K, N, x shape): 2-D and 3-D activations; K=80 is not a multiple of the MatMulNBits block.
SHAPES = [(96, 40, [3, 96]), (512, 24, [2, 5, 512]), (80, 16, [4, 80])]


# --- building -----------------------------------------------------------------------------------
def packed(name: str, w: np.ndarray, granularity=None) -> storage.PackedTensor:
    """A [K, N] weight quantized to `name`: block formats along K, scalar ones per `granularity`."""
    fmt = parse_format(name)
    if isinstance(fmt, BlockFormat):
        return storage.from_block(codec.quantize_block(w, fmt, axis=0), fmt)
    qw = quantize_weight(w, QuantSpec(name, granularity))
    return storage.from_scalar(qw.codes, qw.scale, fmt, qw.axis, qw.block_size)


def _grid_only(name: str) -> storage.PackedTensor:
    """A 1-element tensor of format `name` (integer_grid reads only the element format)."""
    fmt = parse_format(name)
    return storage.PackedTensor(fmt, np.zeros((1, 1), np.uint8), np.ones((1, 1), np.float32), 0, 1)


def _const(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def lowered_model(t: storage.PackedTensor, x_shape: list, accuracy_level: int = 0) -> ir.Model:
    """y = MatMul(x, W) with the MatMul replaced by emit_matmul_nbits."""
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    w = _const("W", t.dequantize().astype(np.float32))
    mm = ir.node("MatMul", [x, w], name="mm")
    graph = ir.Graph([x], [], nodes=[mm], initializers=[w], opset_imports={"": 21}, name="g")
    assert nbits.unsupported(mm, t) is None
    y = nbits.emit_matmul_nbits(graph, mm, x, t, accuracy_level, "mm_nbits")
    graph.remove(mm)
    graph.initializers.pop("W")
    y.name = "y"
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def _feeds(x_shape: list, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)


def _reference(x: np.ndarray, t: storage.PackedTensor) -> np.ndarray:
    return x.astype(np.float64) @ t.dequantize().astype(np.float64)


def _rel_max(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


CASES = [(f, PerBlock(0, 32)) for f in SCALAR] + [(f, PerChannel(1)) for f in SCALAR] + [(f, None) for f in BLOCK]


def _case_id(case) -> str:
    name, g = case
    return name if g is None else f"{name}-{type(g).__name__}"


# --- the integer grid ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCALAR + BLOCK)
def test_integer_grid_and_planes(name):
    t = _grid_only(name)
    ints, unit = nbits.integer_grid(t)
    assert nbits.plane_count(t) == nbits.planes_needed(ints) == PLANES[name]
    assert unit == UNITS.get(name, 1.0)
    values = codec.decode(np.arange(2**t.element.bits), t.element).astype(np.float64)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(ints[finite] * unit, values[finite])
    total = sum((d.astype(np.int64) - zp) * nbits.RADIX**j for j, (d, zp) in enumerate(nbits.digit_planes(ints)))
    np.testing.assert_array_equal(total, ints)
    assert all(((d >= 0) & (d < nbits.RADIX)).all() for d, _ in nbits.digit_planes(ints))


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "mxfp8_e4m3", "mxfp8_e5m2", "fp16"])
def test_integer_grid_refuses_wide_grids(name):
    assert nbits.integer_grid(_grid_only(name)) is None
    assert nbits.plane_count(_grid_only(name)) is None


# --- exactness at accuracy_level 0 ---------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}N{s[1]}x{len(s[2])}d")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_exact_against_numpy(case, shape):
    name, granularity = case
    k, n, x_shape = shape
    w = np.random.default_rng(k + n).standard_normal((k, n)).astype(np.float32)
    t = packed(name, w, granularity)
    model = lowered_model(t, x_shape)
    helpers.check_model(model)
    x = _feeds(x_shape)
    ref = _reference(x, t)
    for level in ("disable", "all"):
        (y,) = helpers.run(model, {"x": x}, level)
        assert y.shape == ref.shape
        assert _rel_max(y, ref) <= RTOL, f"{name} {level}"


def test_symbolic_batch_dim():
    t = packed("mxfp4", np.random.default_rng(6).standard_normal((64, 8)).astype(np.float32))
    model = lowered_model(t, ["batch", 64])
    assert list(model.graph.outputs[0].shape)[1:] == [8]
    x = _feeds([5, 64])
    (y,) = helpers.run(model, {"x": x}, "all")
    assert _rel_max(y, _reference(x, t)) <= RTOL


@pytest.mark.parametrize("name", ["int4", "mxfp4", "e3m2"])
def test_no_decode_at_load(name, tmp_path):
    """The model holds only MatMulNBits (+ Add per extra plane) reading initializers, and ENABLE_ALL
    runs exactly that graph: nothing is rebuilt or constant-folded at session creation."""
    t = packed(name, np.random.default_rng(1).standard_normal((128, 32)).astype(np.float32), PerBlock(0, 32))
    model = lowered_model(t, [2, 128])
    assert +helpers.op_counts(model) == +collections.Counter(MatMulNBits=PLANES[name], Add=PLANES[name] - 1)
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert all(v.const_value is not None for v in node.inputs[1:]), node.name
    opt = helpers.optimized(model, tmp_path / "opt.onnx")
    assert helpers.op_counts(opt) == helpers.op_counts(model)


# --- the in-graph decode chain of the previous emission: the reference for plane_inputs ------------
def _decode_chain(t: storage.PackedTensor) -> ir.Model:
    """The B_j / scale_j the lowering emitted as a subgraph on packed codes before it wrote them as
    initializers (UnpackBits -> Transpose -> Cast -> Reshape -> Gather of digit tables ...), as graph outputs."""
    from qcompile import functions

    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    e = functions.Emitter(graph)
    codes = functions.unpack(e, functions.packed_codes(e, t, "w"), t.element.bits, t.shape, "w")
    _, scales = functions.scale_values(e, t, "w")
    ints, unit = nbits.integer_grid(t)
    (k, n), bs = t.shape, nbits.nbits_block_size(t)
    nb = -(-k // bs)
    i32, u8, f32 = ir.DataType.INT32, ir.DataType.UINT8, ir.DataType.FLOAT

    def op(op_type, inputs, attrs=None, dtype=i32, tag="n"):
        return e.node(op_type, inputs, attrs or {}, f"{tag}_{op_type}", dtype, None, "")

    idx = op("Cast", [op("Transpose", [codes], {"perm": [1, 0]}, codes.dtype)], {"to": i32})
    if nb * bs > k:
        idx = op("Concat", [idx, e.initializer("pad", np.zeros((n, nb * bs - k), np.int32))], {"axis": 1})
    pairs = op("Reshape", [idx, e.initializer("pairs", np.array([n, nb * bs // 2, 2], np.int64))])
    lo, hi = (op("Gather", [pairs, e.initializer(f"nib{i}", np.array(i, np.int64))], {"axis": 2}) for i in (0, 1))
    rows = int(t.scale.shape[0])
    which = np.minimum(np.arange(nb) * bs // t.block_size, rows - 1).astype(np.int64)
    per_block = op("Gather", [op("Transpose", [scales], {"perm": [1, 0]}, f32), e.initializer("which", which)],
                   {"axis": 1}, f32)
    base = op("Expand", [per_block, e.initializer("sshape", np.array([n, nb], np.int64))], dtype=f32)
    for j, (digits, _) in enumerate(nbits.digit_planes(ints)):
        d_lo = op("Gather", [e.initializer(f"lut{j}", digits), lo])
        d_hi = op("Gather", [e.initializer(f"lut{j}_hi", digits * nbits.RADIX), hi])
        byte = op("Cast", [op("Add", [d_lo, d_hi])], {"to": u8}, u8)
        b = op("Reshape", [byte, e.initializer(f"bshape{j}", np.array([n, nb, bs // 2], np.int64))], dtype=u8)
        s = op("Mul", [base, e.initializer(f"factor{j}", np.array(unit * nbits.RADIX**j, np.float32))], dtype=f32)
        b.name, s.name = f"B{j}", f"scale{j}"
        graph.outputs.extend([b, s])
    functions.attach(model := ir.Model(graph, ir_version=10))
    return model


@pytest.mark.parametrize("shape", [(96, 40), (80, 16), (300, 8)], ids=lambda s: f"K{s[0]}N{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plane_inputs_equal_the_decode_chain(case, shape):
    """plane_inputs writes exactly the bytes the former decode chain produced in onnxruntime."""
    name, granularity = case
    w = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
    t = packed(name, w, granularity)
    outs = helpers.run(_decode_chain(t), {}, "disable")
    planes = nbits.plane_inputs(t)
    assert len(outs) == 2 * len(planes)
    for j, (b, s, _) in enumerate(planes):
        assert b.dtype == outs[2 * j].dtype and s.dtype == outs[2 * j + 1].dtype
        np.testing.assert_array_equal(b, outs[2 * j])
        np.testing.assert_array_equal(s.view(np.uint32), outs[2 * j + 1].view(np.uint32))  # bit-equal


@pytest.mark.parametrize("name", ["int4", "e2m1", "mxint8", "e3m2"])
def test_accuracy_level_4_loads_and_agrees(name):
    t = packed(name, np.random.default_rng(2).standard_normal((256, 48)).astype(np.float32), PerBlock(0, 32))
    x = _feeds([4, 256], seed=3)
    (y,) = helpers.run(lowered_model(t, [4, 256], accuracy_level=4), {"x": x}, "all")
    assert helpers.sqnr_db(_reference(x, t), y) > SQNR_LEVEL4


# --- applicability --------------------------------------------------------------------------------
def _matmul_node() -> ir.Node:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    return ir.node("MatMul", [x, ir.Value(name="w")], name="mm")


@pytest.mark.parametrize(
    ("name", "granularity", "k", "reason"),
    [
        ("int4", PerBlock(0, 32), 64, None),
        ("int4", PerBlock(0, 48), 96, None),  # MatMulNBits block 16 divides 48
        ("int4", PerChannel(1), 40, None),  # per output column: one block spans K
        ("int4", PerBlock(0, 8), 64, "power-of-two divisor"),
        ("int4", PerChannel(0), 64, "along N"),  # one scale per row k: blocks along N
        ("e4m3fn", PerChannel(1), 64, "planes"),
    ],
)
def test_unsupported(name, granularity, k, reason):
    t = packed(name, np.random.default_rng(4).standard_normal((k, 8)).astype(np.float32), granularity)
    got = nbits.unsupported(_matmul_node(), t)
    assert got is None if reason is None else reason in got


def test_unsupported_scale_overflow():
    t = packed("e3m2", np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32), PerChannel(1))
    t.scale = np.full_like(t.scale, 2.0**126)  # x unit 2**-4 x 16**2 overflows float32
    assert "overflow" in nbits.unsupported(_matmul_node(), t)


def test_emit_refuses_unsupported():
    t = packed("e4m3fn", np.ones((32, 4), np.float32), PerChannel(1))
    node = _matmul_node()
    graph = ir.Graph([node.inputs[0]], [], nodes=[node], name="g")
    with pytest.raises(ValueError, match="MatMulNBits"):
        nbits.emit_matmul_nbits(graph, node, node.inputs[0], t, 0, "n")


# --- the MatMulNBits facts the lowering relies on -----------------------------------------------------
def _raw_matmul_nbits(k, n, bs, b, scales, zero_points=None) -> ort.InferenceSession:
    inits = [nh.from_array(b, "B"), nh.from_array(scales, "S")]
    if zero_points is not None:
        inits.append(nh.from_array(zero_points, "Z"))
    node = h.make_node("MatMulNBits", ["x", "B", "S"] + (["Z"] if zero_points is not None else []), ["y"],
                       domain="com.microsoft", K=k, N=n, bits=4, block_size=bs, accuracy_level=0)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, [None, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)],
                         ir_version=10)
    return helpers.session(model, "disable")


@pytest.mark.parametrize(("k", "bs"), [(64, 16), (80, 32), (100, 32)])
def test_matmul_nbits_layout_and_zero_points(k, bs):
    """B [N, ceil(K/bs), bs/2] low nibble first; no zero points = 8; packed uint8 zero points are
    [N, ceil(n_blocks/2)] with block 2i in the low nibble; K % bs != 0 is accepted."""
    rng = np.random.default_rng(k)
    n, nb = 6, -(-k // bs)
    d = rng.integers(0, 16, (n, nb * bs)).astype(np.uint8)
    b = (d[:, 0::2] | d[:, 1::2] << 4).reshape(n, nb, bs // 2)
    s = rng.uniform(0.5, 2, (n, nb)).astype(np.float32)
    zp = rng.integers(0, 16, (n, nb)).astype(np.uint8)
    zpad = np.zeros((n, 2 * -(-nb // 2)), np.uint8)
    zpad[:, :nb] = zp
    x = rng.standard_normal((3, k)).astype(np.float32)

    def ref(z):
        return x.astype(np.float64) @ ((d - z) * np.repeat(s, bs, axis=1))[:, :k].T.astype(np.float64)

    (y,) = _raw_matmul_nbits(k, n, bs, b, s).run(None, {"x": x})
    assert _rel_max(y, ref(8.0)) <= RTOL
    (y,) = _raw_matmul_nbits(k, n, bs, b, s, (zpad[:, 0::2] | zpad[:, 1::2] << 4)).run(None, {"x": x})
    assert _rel_max(y, ref(np.repeat(zp.astype(np.float64), bs, axis=1))) <= RTOL
