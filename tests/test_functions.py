"""qcompile.* function ops run in stock onnxruntime and are bit-exact with the numpy codec.

Every case builds a small model (several outputs per model to keep session count low), attaches
the functions and runs it at ORT_DISABLE_ALL and ORT_ENABLE_ALL. Equality is bitwise: the same NaN
positions and identical float32 bit patterns elsewhere (so -0.0 vs +0.0 counts).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_bitwise, block_probe, run

from qcompile import codec, functions, storage
from qcompile.formats import FORMATS, parse_format

LEVELS = ["disable", "all"]
SCALAR_DQ_FORMATS = [
    "e2m1", "e2m3", "e3m2", "e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e3m4", "e2m5",
    *(f"int{b}" for b in range(2, 9)), *(f"uint{b}" for b in range(2, 9)),
]
MX_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8"]
FQ_FORMATS = ["e2m1", "e2m3", "e3m2", "e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e3m4", "int3", "int4", "int8",
              "uint4", "fixed"]
NVFP4 = FORMATS["nvfp4"]
# per-tensor scales: powers of two over a wide range plus non-powers of two
SCALES = np.array([*(2.0**k for k in range(-20, 21)), 0.1, 0.037, 3.7, 123.456, 1e-3, 6.5e-6], dtype=np.float32)


def fmt_of(name: str):
    if name == "fixed":  # the MX INT8 element: k / 64, narrow range
        return FORMATS["mxint8"].element
    return parse_format(name)


def build(outputs, inputs: dict[str, tuple[int, ...]] | None = None, opset: int = 21) -> ir.Model:
    """A model whose outputs are `outputs(graph, *inputs)` (float32 graph inputs), functions attached."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="g")
    xs = [ir.Value(name=n, shape=ir.Shape(s), type=ir.TensorType(ir.DataType.FLOAT)) for n, s in (inputs or {}).items()]
    graph.inputs.extend(xs)
    graph.outputs.extend(outputs(graph, *xs))
    model = ir.Model(graph, ir_version=10)
    functions.attach(model)
    return model


def run_all(model: ir.Model, feeds: dict | None = None) -> dict[str, list[np.ndarray]]:
    return {level: run(model, feeds or {}, level) for level in LEVELS}


def check_tensors(tensors: list[storage.PackedTensor]) -> None:
    model = build(lambda g: [functions.dequantize(g, t, f"w{i}") for i, t in enumerate(tensors)])
    with np.errstate(over="ignore"):  # E8M0 2**127 * 448 is inf in both
        refs = [t.dequantize() for t in tensors]
    for level, outs in run_all(model).items():
        for t, ref, got in zip(tensors, refs, outs):
            assert_bitwise(got, ref, f"{t.fmt.name} {t.shape} axis {t.axis} block {t.block_size} @{level}")


# --- Dequantize -------------------------------------------------------------------------------


def scalar_cases(fmt) -> list[storage.PackedTensor]:
    """Every code x every scale (per channel), per tensor, and blocked with a ragged last block."""
    codes = codec.all_codes(fmt)
    rng = np.random.default_rng(fmt.bits)
    grid = np.tile(codes, (SCALES.size, 1))
    per_channel = storage.PackedTensor(fmt, grid, SCALES.reshape(-1, 1), axis=0, block_size=1)
    per_tensor = [storage.PackedTensor(fmt, grid, np.full((1, 1), s, np.float32), 0, SCALES.size) for s in SCALES[-6:]]
    columns = np.stack([codes, codes[::-1], rng.permutation(codes)], axis=1)  # [2**bits, 3]
    nb = -(-codes.size // 5)
    blocked_scale = (2.0 ** rng.integers(-10, 10, (nb, 3)) * rng.uniform(0.5, 2, (nb, 3))).astype(np.float32)
    blocked = storage.PackedTensor(fmt, columns, blocked_scale, axis=0, block_size=5)
    blocked_cols = storage.PackedTensor(fmt, columns.T.copy(), blocked_scale.T[:1].copy(), axis=1, block_size=5)
    return [per_channel, *per_tensor, blocked, blocked_cols]


@pytest.mark.parametrize("name", SCALAR_DQ_FORMATS)
def test_dequantize_scalar_formats(name):
    fmt = parse_format(name)
    check_tensors(scalar_cases(fmt))


def test_dequantize_op_choice_and_from_scalar():
    """E2M1 uses DequantizeFP4, others DequantizeMinifloat; storage.from_scalar layouts decode right."""
    rng = np.random.default_rng(0)
    fp4, int3 = FORMATS["e2m1"], FORMATS["int3"]
    values = codec.round_to_grid(rng.normal(0, 3, (6, 10)), fp4)
    tensors = [
        storage.from_scalar(values, rng.uniform(0.1, 2, 10), fp4, 1, None),  # per channel on axis 1
        storage.from_scalar(values, np.float32(0.3), fp4, None, None),  # per tensor
        storage.from_scalar(rng.integers(-4, 4, (6, 10)), rng.uniform(0.1, 2, (6, 3)).astype(np.float32), int3, 1, 4),
    ]
    check_tensors(tensors)
    model = build(lambda g: [functions.dequantize(g, t, "w") for t in tensors])
    ops = [n.op_type for n in model.graph if n.domain == functions.DOMAIN]
    assert ops == ["DequantizeFP4", "DequantizeFP4", "DequantizeMinifloat"]
    assert {name for _, name, _ in model.functions} == {"DequantizeFP4", "DequantizeMinifloat", "UnpackBits"}
    assert len({v.name for v in model.graph.initializers.values()}) == 7  # 3 x (packed, scale) + one int3 lut


@pytest.mark.parametrize("name", [*MX_FORMATS, "nvfp4"])
def test_dequantize_block_formats_exhaustive(name):
    """Every element code x every scale code (E8M0 0..255 with 255 = NaN; every E4M3 code)."""
    fmt = FORMATS[name]
    codes = codec.all_codes(fmt.element)
    scale_codes = np.arange(256, dtype=np.uint8).reshape(-1, 1)
    grid = np.tile(codes, (256, 1))
    tensor_scales = [None] if fmt.tensor_scale is None else [1.0, 0.37, 2.0**-20, 3.0e5]
    check_tensors([storage.PackedTensor(fmt, grid, scale_codes, 0, 1, ts) for ts in tensor_scales])


@pytest.mark.parametrize("name", [*MX_FORMATS, "nvfp4"])
def test_dequantize_block_formats_real_blocks(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(70, 48)) * 2.0 ** rng.integers(-12, 12, (70, 1))).astype(np.float32)
    check_tensors([storage.from_block(codec.quantize_block(x, fmt, axis), fmt) for axis in (0, 1)])


# --- UnpackBits / scale_values ------------------------------------------------------------------


def test_unpack_bits_round_trip():
    rng = np.random.default_rng(2)
    cases = [(bits, (3, 37 + bits)) for bits in range(1, 9)]
    data = [rng.integers(0, 2**bits, size=shape).astype(np.uint8) for bits, shape in cases]

    def outputs(g):
        outs = []
        for (bits, shape), codes in zip(cases, data):
            packed = functions.Emitter(g).initializer(f"p{bits}", codec.pack(codes, bits))
            outs.append(functions.unpack(g, packed, bits, shape, f"u{bits}"))
        return outs

    for level, outs in run_all(build(outputs)).items():
        for (bits, shape), codes, got in zip(cases, data, outs):
            ref = codec.unpack(codec.pack(codes, bits), bits, codes.size).reshape(shape)
            assert got.dtype == np.uint8 and np.array_equal(got, ref), f"{bits} bits @{level}"


def test_scale_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 24)).astype(np.float32)
    tensors = [storage.from_block(codec.quantize_block(x, FORMATS[n], 0), FORMATS[n]) for n in ("mxfp4", "nvfp4")]
    tensors.append(storage.PackedTensor(FORMATS["int4"], np.zeros((40, 24), np.uint8),
                                        rng.uniform(size=(1, 24)).astype(np.float32), 0, 40))
    model = build(lambda g: [functions.scale_values(g, t, f"s{i}")[1] for i, t in enumerate(tensors)])
    for level, outs in run_all(model).items():
        for t, got in zip(tensors, outs):
            assert_bitwise(got, t.scale_values(), f"{t.fmt.name} @{level}")


# --- FakeQuant ----------------------------------------------------------------------------------


def grid_probe(fmt, rng) -> np.ndarray:
    """Grid points, their float32 neighbours, exact midpoints (ties), beyond max, zeros, inf, NaN."""
    grid = np.unique(codec.decode(codec.all_codes(fmt), fmt))
    grid = grid[np.isfinite(grid)].astype(np.float64)
    mids = (grid[:-1] + grid[1:]) / 2
    near = np.concatenate([np.nextafter(grid.astype(np.float32), np.float32(s)) for s in (-np.inf, np.inf)])
    top = float(np.abs(grid).max())
    beyond = np.array([1.01, 1.5, 2, 1e10]) * top
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 1e-44]
    normal = np.concatenate([rng.normal(0, m, 64) for m in (1e-3, 0.1, 1, 10, 1e3)])
    return np.concatenate([grid, mids, near, beyond, -beyond, special, normal]).astype(np.float32)


def minifloat_ref(x: np.ndarray, fmt, scale: float) -> np.ndarray:
    s = np.float32(scale)
    return codec.round_to_grid((x / s).astype(np.float32), fmt) * s


@pytest.mark.parametrize("name", FQ_FORMATS)
def test_fake_quant_minifloat(name):
    fmt = fmt_of(name)
    x = grid_probe(fmt, np.random.default_rng(4))
    scales = [1.0, 2.0**-3, 2.0**7, 0.037, 17.5]
    feeds = {f"x{i}": (x * np.float32(s)).astype(np.float32) for i, s in enumerate(scales)}
    model = build(lambda g, *xs: [functions.fake_quant(g, v, fmt, f"fq{i}", scale=s)
                                  for i, (v, s) in enumerate(zip(xs, scales))], {k: x.shape for k in feeds})
    for level, outs in run_all(model, feeds).items():
        for (key, xi), s, got in zip(feeds.items(), scales, outs):
            # numpy's clip keeps round_to_grid's -0.0 of an unsigned int grid; the op returns +0.0 there
            assert_bitwise(got, minifloat_ref(xi, fmt, s), f"{name} scale {s} @{level}", zero_sign=fmt.signed)


@pytest.mark.parametrize("axis, shape", [(-1, (2, 3, 5, 70)), (1, (2, 45, 3, 4))])
def test_fake_quant_mx(axis, shape):
    rng = np.random.default_rng(5)
    x = block_probe(rng, shape, axis)
    fmts = [FORMATS[n] for n in MX_FORMATS]
    model = build(lambda g, v: [functions.fake_quant(g, v, f, f.name, axis=axis) for f in fmts], {"x": shape})
    for level, outs in run_all(model, {"x": x}).items():
        for f, got in zip(fmts, outs):
            assert_bitwise(got, codec.fake_quant(x, f, axis), f"{f.name} axis {axis} @{level}")


def test_fake_quant_mx_shared_exponent_every_binade():
    """Block amax = 2**k and its float32 neighbours for every k (the exact floor(log2 amax))."""
    amax = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    amax = np.concatenate([amax, np.nextafter(amax, np.float32(0)), np.nextafter(amax, np.float32(np.inf))])
    amax = amax[np.isfinite(amax) & (amax > 0)]
    rng = np.random.default_rng(6)
    x = (amax[:, None] * rng.uniform(-1, 1, (amax.size, 32))).astype(np.float32)
    x[:, 0] = amax
    fmts = [FORMATS[n] for n in MX_FORMATS]
    model = build(lambda g, v: [functions.fake_quant(g, v, f, f.name) for f in fmts], {"x": x.shape})
    for level, outs in run_all(model, {"x": x}).items():
        for f, got in zip(fmts, outs):
            assert_bitwise(got, codec.fake_quant(x, f, -1), f"{f.name} @{level}")


def nvfp4_ref(x: np.ndarray, tensor_scale: float, axis: int) -> np.ndarray:
    """codec.quantize_block's NVFP4 math with a fixed tensor scale s_t, then dequantized."""
    ax, st = axis % x.ndim, np.float32(tensor_scale)
    amax = codec._block_amax(x, ax, NVFP4.block_size)
    sb = codec.round_to_grid(amax / np.float32(NVFP4.element.max) / st, NVFP4.scale)
    d = codec.expand_param((np.where(np.isfinite(amax), sb, np.nan) * st).astype(np.float32), x.shape, ax, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d == 0, np.float32(0), x / d)
    return codec.decode(codec.encode(v, NVFP4.element), NVFP4.element) * d


def test_nvfp4_reference_matches_codec():
    x = np.random.default_rng(7).normal(size=(6, 40)).astype(np.float32)
    x[1] = 0
    for axis in (0, 1):
        assert_bitwise(nvfp4_ref(x, codec._tensor_scale(x, NVFP4), axis), codec.fake_quant(x, NVFP4, axis))


@pytest.mark.parametrize("axis, shape", [(-1, (2, 3, 5, 70)), (1, (2, 45, 3, 4))])
def test_fake_quant_nvfp4(axis, shape):
    rng = np.random.default_rng(8)
    x = block_probe(rng, shape, axis)
    x = np.where(np.abs(x) > 1e30, x * 1e-20, x).astype(np.float32)  # keep blocks within reach of the scale
    tensor_scales = [codec._tensor_scale(x, NVFP4), 1.0, 2.0**-30, 0.0123, 1e3]
    model = build(lambda g, v: [functions.fake_quant(g, v, NVFP4, f"n{i}", tensor_scale=s, axis=axis)
                                for i, s in enumerate(tensor_scales)], {"x": shape})
    for level, outs in run_all(model, {"x": x}).items():
        for s, got in zip(tensor_scales, outs):
            assert_bitwise(got, nvfp4_ref(x, s, axis), f"s_t {s} axis {axis} @{level}")
    assert_bitwise(run(model, {"x": x})[0], codec.fake_quant(x, NVFP4, axis), "s_t from the tensor")


# --- model-level --------------------------------------------------------------------------------


W = np.random.default_rng(9).normal(size=(64, 8)).astype(np.float32)


def _blocked(name: str) -> storage.PackedTensor:
    return storage.from_block(codec.quantize_block(W, FORMATS[name], 0), FORMATS[name])


def _scalar(name: str) -> storage.PackedTensor:
    f = FORMATS[name]
    return storage.PackedTensor(f, codec.encode(W / 4, f), np.full((1, 8), 4, np.float32), 0, 64)


# one emitter per op: (graph, x) -> output value
EMITTERS = {
    "DequantizeMX": lambda g, x: functions.dequantize(g, _blocked("mxfp6_e3m2"), "mx"),
    "DequantizeNVFP4": lambda g, x: functions.dequantize(g, _blocked("nvfp4"), "nv"),
    "DequantizeFP4": lambda g, x: functions.dequantize(g, _scalar("e2m1"), "fp4"),
    "DequantizeMinifloat": lambda g, x: functions.dequantize(g, _scalar("e3m2"), "e3m2"),
    "UnpackBits": lambda g, x: functions.unpack(g, functions.packed_codes(g, _scalar("e3m2"), "p"), 6, W.shape, "u"),
    "FakeQuantMinifloat": lambda g, x: functions.fake_quant(g, x, FORMATS["e4m3fn"], "a", scale=0.5),
    "FakeQuantMX": lambda g, x: functions.fake_quant(g, x, FORMATS["mxfp8_e4m3"], "b", axis=0),
    "FakeQuantNVFP4": lambda g, x: functions.fake_quant(g, x, NVFP4, "c", tensor_scale=0.01, axis=1),
}


def every_op_model(opset: int = 21) -> tuple[ir.Model, list[str]]:
    """A model using every op that works at `opset` (functions.OP_MIN_OPSET), and those ops."""
    ops = [op for op in EMITTERS if functions.OP_MIN_OPSET[op] <= opset]
    return build(lambda g, x: [EMITTERS[op](g, x) for op in ops], {"x": W.shape}, opset), ops


def test_every_op_checker_and_attach():
    model, ops = every_op_model()
    assert set(ops) == {name for _, name, _ in model.functions} == {p.name for p in functions.function_protos()}
    assert model.opset_imports[functions.DOMAIN] == functions.VERSION
    before = ir.to_proto(model).SerializeToString(deterministic=True)
    functions.attach(model)
    assert ir.to_proto(model).SerializeToString(deterministic=True) == before, "attach is not idempotent"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for proto in functions.function_protos():
        assert all(n.domain in ("", functions.DOMAIN) for n in proto.node)


@pytest.mark.parametrize("opset", [13, 17, 18, 19, 23, 26])
def test_other_model_opsets(opset):
    """attach adopts the model's opset: checker-clean and identical results from each op's minimum up."""
    model, ops = every_op_model(opset)
    assert all(f.opset_imports[""] == opset for f in model.functions.values())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ref_model, ref_ops = every_op_model(21)
    ref = dict(zip(ref_ops, run(ref_model, {"x": W}, "disable")))
    for level in LEVELS:
        for op, got in zip(ops, run(model, {"x": W}, level)):
            assert_bitwise(got, ref[op], f"{op} opset {opset} @{level}")


def test_attach_rejects_a_too_old_opset():
    with pytest.raises(ValueError, match="FakeQuantMX needs default-domain opset >= 18"):
        build(lambda g, x: [EMITTERS["FakeQuantMX"](g, x)], {"x": W.shape}, 17)


def test_attach_without_qcompile_nodes_is_a_no_op():
    model = build(lambda g, x: [x], {"x": (2,)})
    assert functions.DOMAIN not in model.opset_imports and not model.functions


def test_grid_attributes():
    assert functions.grid_attributes(FORMATS["int4"]) == dict(
        mantissa_bits=0, emin=0, emax=0, min=-8.0, max=7.0, signed_zero=1, has_nan=0)
    g = functions.grid_attributes(FORMATS["e4m3fnuz"])
    assert (g["mantissa_bits"], g["emin"], g["emax"], g["max"], g["signed_zero"], g["has_nan"]) == (3, -7, 7, 240.0, 0, 1)
    assert functions.grid_attributes(fmt_of("fixed"), encoded=True)["signed_zero"] == 0
