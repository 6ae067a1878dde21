"""The optional native custom-op library (`qcompile.native`): MatMulFp4 = x @ dequantize(FP4 weight).

Checks against float64 numpy `x @ t.dequantize()` (max |diff| / max |ref| <= 1e-5) for OCP MXFP4
(E8M0 scales per 32) and NVFP4 (E4M3 scales per 16 + tensor scale) at two optimization levels,
clean ORT errors for bad attributes and shapes, and that a stock session cannot load the op.
The fused activation quantization (act="mxfp4" / "nvfp4") is checked bit for bit against
`codec.fake_quant` (directly through the library's exported C entry point, and through the op with
an identity weight) and, with real weights, against float64 `fake_quant(x) @ t.dequantize()`.
If the library cannot be built, the tests fail under CI (env CI set) and are skipped elsewhere.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile import codec, functions, native, storage
from qcompile.backends.onnxruntime.lower_native import NativeFakeQuantPass
from qcompile.formats import FORMATS, parse_format
from helpers import LEVELS, assert_bitwise, assert_pass_contract, block_probe, session

ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph)


@pytest.fixture(scope="module")
def lib(native_lib):
    return native_lib


def weight(fmt_name: str, k: int, n: int, seed: int = 0) -> storage.PackedTensor:
    fmt = FORMATS[fmt_name]
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return storage.from_block(codec.quantize_block(w, fmt, axis=0), fmt)


def model(t: storage.PackedTensor, x_shape: list, attrs: dict | None = None, w_codes: np.ndarray | None = None,
          act: str | None = None, act_tensor_scale: float | None = None, w_scales: np.ndarray | None = None):
    """x -> MatMulFp4(t) -> y; `attrs` overrides node attributes, `w_codes` / `w_scales` replace the
    packed codes / scale codes, `act` names the fused activation format (FORMATS key)."""
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    y = native.emit_matmul_fp4(graph, x, t, "w", act=None if act is None else FORMATS[act],
                               act_tensor_scale=act_tensor_scale)
    node = y.producer()
    for key, value in (attrs or {}).items():
        node.attributes[key] = ir.Attr(key, ir.AttributeType.STRING if isinstance(value, str) else ir.AttributeType.INT,
                                       value)
    for index, array in ((1, w_codes), (2, w_scales)):
        if array is not None:
            node.inputs[index].const_value = ir.tensor(array, name=node.inputs[index].name)
            node.inputs[index].shape = ir.Shape(array.shape)
    graph.outputs.append(y)
    return ir.to_proto(ir.Model(graph, ir_version=10))


def native_session(lib, proto, level: str = "all") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k,n", [(256, 96), (4096, 64)])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_matches_numpy(lib, fmt, k, n, lead, level):
    t = weight(fmt, k, n)
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = native_session(lib, model(t, list(x.shape)), level).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ t.dequantize().astype(np.float64)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 70])  # 70 rows: the decode-a-tile-once path
def test_ragged_k_and_many_rows(lib, fmt, rows):
    """K not a multiple of the block (zero-padded codes, 1.0 padding scales) and M > 1 tiles."""
    t = weight(fmt, 100, 7, seed=2)
    x = np.random.default_rng(3).standard_normal((rows, 100)).astype(np.float32)
    y = native_session(lib, model(t, ["M", 100])).run(None, {"x": x})[0]
    assert rel_err(y, x.astype(np.float64) @ t.dequantize().astype(np.float64)) <= 1e-5


def test_scalar_fallback_matches(lib):
    """The portable (no AVX2) build computes the same result."""
    scalar = native.build(isa="scalar")
    t = weight("nvfp4", 256, 33, seed=4)
    x = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    y = native_session(scalar, model(t, [2, 256])).run(None, {"x": x})[0]
    assert rel_err(y, x.astype(np.float64) @ t.dequantize().astype(np.float64)) <= 1e-5


def test_library_is_cached_and_does_not_link_onnxruntime(lib):
    assert native.library_path() == lib
    assert native.build() == lib
    assert b"libonnxruntime" not in lib.read_bytes()


@pytest.mark.parametrize("attrs", [{"scale_type": "fp8"}, {"block_size": 24}, {"N": 0}])
def test_bad_attributes_raise(lib, attrs):
    proto = model(weight("mxfp4", 256, 8), [1, 256], attrs)
    with pytest.raises(ORT_ERRORS, match="MatMulFp4"):
        native_session(lib, proto).run(None, {"x": np.zeros((1, 256), np.float32)})


def test_bad_shapes_raise_at_run(lib):
    t = weight("mxfp4", 256, 8)
    wrong_w = model(t, [1, 256], w_codes=np.zeros((8, 64), np.uint8))  # K = 256 needs [8, 128]
    with pytest.raises(ORT_ERRORS, match="MatMulFp4: W must be"):
        native_session(lib, wrong_w).run(None, {"x": np.zeros((1, 256), np.float32)})
    wrong_k = model(t, ["M", "K"])
    with pytest.raises(ORT_ERRORS, match="MatMulFp4: X must be"):
        native_session(lib, wrong_k).run(None, {"x": np.zeros((1, 255), np.float32)})


def test_stock_session_refuses_the_op():
    """Without the library onnxruntime cannot load the model: the op is custom and opt-in."""
    with pytest.raises(Exception):
        session(model(weight("mxfp4", 64, 4), [1, 64]))


def test_session_options_registers_the_library(lib):
    t = weight("mxfp4", 64, 4)
    so = native.session_options()
    s = ort.InferenceSession(model(t, [1, 64]).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float32)
    assert rel_err(s.run(None, {"x": x})[0], x.astype(np.float64) @ t.dequantize()) <= 1e-5


def test_emit_rejects_unsupported_weights():
    x = ir.Value(name="x", shape=ir.Shape([1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21})
    with pytest.raises(ValueError, match="E2M1 block format"):
        native.emit_matmul_fp4(graph, x, weight("mxfp8_e4m3", 64, 4), "w")
    with pytest.raises(ValueError, match="axis 0"):
        native.emit_matmul_fp4(graph, x, weight("mxfp4", 4, 64).transposed(), "w")


# --- fused activation quantization (act = "mxfp4" / "nvfp4") ------------------------------------

ACT_CODES = {"none": 0, "mxfp4": 1, "nvfp4": 2}
E2M1_TIES = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])  # midpoints (and 7: saturates)
TENSOR_SCALES = [1.0, 2.0**-4, 0.0123, 3.7e-5]  # exact-tie friendly powers of two, and arbitrary ones


def act_inputs(fmt_name: str, rows: int, k: int, seed: int, tensor_scale: float = 1.0,
               magnitudes=(-40, -30, -3, 0, 3, 30), specials: bool = False) -> np.ndarray:
    """Rows of blocks of mixed kinds: exact E2M1 ties times the block scale (and their float32
    neighbours), E4M3 block-scale ties (nvfp4), zero blocks, values at and next to powers of two,
    random normals at several magnitudes; optionally a NaN/inf block per row. K may be ragged."""
    rng = np.random.default_rng(seed)
    bs = FORMATS[fmt_name].block_size
    x = np.zeros((rows, -(-k // bs) * bs), np.float32)
    st = np.float32(tensor_scale)
    for r in range(rows):
        for b in range(x.shape[1] // bs):
            kind = (r + b) % 7
            sign = rng.choice([-1.0, 1.0], bs)
            if kind in (0, 1):  # ties of the element grid, exact (0) or one float32 ulp off (1)
                if fmt_name == "mxfp4":
                    d = np.float32(2.0 ** int(rng.integers(-125, 120)))
                    top = 4.0 * d  # amax in [4, 8) * d gives X = d
                else:
                    sb = codec.round_to_grid(np.float32(2.0 ** rng.uniform(-8, 8)), FORMATS["e4m3fn"])
                    d = np.float32(sb * st)
                    top = np.float32(6.0) * d
                v = (rng.choice(E2M1_TIES, bs) * d).astype(np.float32)
                if kind == 1:
                    v = np.nextafter(v, rng.choice([-np.inf, np.inf], bs).astype(np.float32))
                v[rng.integers(bs)] = top
                block = v * sign
            elif kind == 2:  # zeros (with -0)
                block = np.where(rng.random(bs) < 0.5, -0.0, 0.0)
            elif kind == 3:  # at and next to powers of two (the MX exponent boundary)
                p = np.float32(2.0) ** rng.integers(-140, 126, bs).astype(np.float32)
                block = sign * np.nextafter(p, rng.choice([-np.inf, 0, np.inf], bs).astype(np.float32) * p)
            elif kind == 4 and fmt_name == "nvfp4":  # block scale s_b exactly between two E4M3 values
                mids = (1.0 + (2 * rng.integers(0, 8) + 1) / 16.0) * 2.0 ** rng.integers(-6, 8)
                if rng.random() < 0.3:
                    mids = (2 * rng.integers(0, 8) + 1) * 2.0**-10  # subnormal E4M3 ties
                block = rng.standard_normal(bs) * (mids * 6 * st) / 4
                block[rng.integers(bs)] = np.float32(np.float32(6.0 * mids) * st)
                block = block * sign
            else:  # random normal at a magnitude
                block = rng.standard_normal(bs) * 10.0 ** float(rng.choice(magnitudes))
            x[r, b * bs:(b + 1) * bs] = block
        if specials and x.shape[1] >= 2 * bs:
            x[r, bs + rng.integers(bs)] = [np.nan, np.inf, -np.inf][r % 3]
    return np.ascontiguousarray(x[:, :k])


def native_fake_quant(lib, x: np.ndarray, act: str, tensor_scale: float = 1.0) -> np.ndarray:
    """The library's activation quantize-dequantize alone (exported C entry point)."""
    fn = ctypes.CDLL(str(lib)).QcompileNativeFakeQuantAct
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    assert fn(x.ctypes.data, x.shape[0], x.shape[1], ACT_CODES[act], tensor_scale, out.ctypes.data) == 0
    return out


def reference_fq(x: np.ndarray, act: str, tensor_scale: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return codec.fake_quant(x, FORMATS[act], -1, tensor_scale if act == "nvfp4" else None)


def assert_bits_equal(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """Identical float32 bit patterns (signed zeros included), any NaN matching any NaN."""
    same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    if not same.all():
        i = tuple(np.argwhere(~same)[0])
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} differ, first at {i}: got {got[i]!r}, want {ref[i]!r}")


ACT_CASES = [("mxfp4", 1.0)] + [("nvfp4", s) for s in TENSOR_SCALES]


@pytest.mark.parametrize("isa", ["native", "scalar"])
@pytest.mark.parametrize("k", [256, 100, 7])
@pytest.mark.parametrize("act,tensor_scale", ACT_CASES)
def test_act_fake_quant_is_bit_exact(lib, act, tensor_scale, k, isa):
    """The in-op activation quantize-dequantize equals codec.fake_quant bit for bit (incl. NaN/inf blocks)."""
    library = lib if isa == "native" else native.build(isa="scalar")
    x = act_inputs(act, 40, k, seed=k, tensor_scale=tensor_scale, specials=True)
    assert_bits_equal(native_fake_quant(library, x, act, tensor_scale), reference_fq(x, act, tensor_scale))


def test_act_fake_quant_random_bit_exact(lib):
    """Random rows over the whole float32 range (subnormals to near-max), random tensor scales."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        k = int(rng.integers(1, 300))
        x = (rng.standard_normal((3, k)) * 10.0 ** rng.uniform(-44, 38)).astype(np.float32)
        for act in ("mxfp4", "nvfp4"):
            st = float(np.float32(10.0 ** rng.uniform(-8, 3)))
            assert_bits_equal(native_fake_quant(lib, x, act, st), reference_fq(x, act, st))


def identity_weight(k: int) -> storage.PackedTensor:
    """I [K, K] in MXFP4: each block holds one 1.0 (scale 2**-2, element 4) or zeros -- exact."""
    t = storage.from_block(codec.quantize_block(np.eye(k, dtype=np.float32), FORMATS["mxfp4"], axis=0), FORMATS["mxfp4"])
    assert np.array_equal(t.dequantize(), np.eye(k, dtype=np.float32))
    return t


@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize("k", [128, 100])
@pytest.mark.parametrize("act,tensor_scale", ACT_CASES)
def test_act_identity_weight_bit_exact(lib, act, tensor_scale, k, rows):
    """Through the op: with W = I, Y == fq(X) exactly (every other product is a zero)."""
    x = act_inputs(act, rows, k, seed=rows + k, tensor_scale=tensor_scale, magnitudes=(-30, -3, 0, 3, 30))
    x = np.where(np.abs(x) < 1e36, x, 0).astype(np.float32)  # keep 4 * fq(x) finite (unscaled E2M1 times x)
    proto = model(identity_weight(k), ["M", k], act=act, act_tensor_scale=tensor_scale if act == "nvfp4" else None)
    y = native_session(lib, proto).run(None, {"x": x})[0]
    ref = reference_fq(x, act, tensor_scale)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize("k,n", [(256, 40), (200, 33)])
@pytest.mark.parametrize("wfmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("act,tensor_scale", [("mxfp4", 1.0), ("nvfp4", 2.0**-4), ("nvfp4", 0.0123)])
def test_act_matches_numpy(lib, act, tensor_scale, wfmt, k, n, rows):
    """Y == float64 fake_quant(x) @ t.dequantize() within 1e-5 (mxfp4 weights: empty T before A_T)."""
    t = weight(wfmt, k, n, seed=rows)
    x = act_inputs(act, rows, k, seed=rows * k, tensor_scale=tensor_scale, magnitudes=(-3, 0, 1))
    proto = model(t, ["M", k], act=act, act_tensor_scale=tensor_scale if act == "nvfp4" else None)
    y = native_session(lib, proto).run(None, {"x": x})[0]
    ref = reference_fq(x, act, tensor_scale).astype(np.float64) @ t.dequantize().astype(np.float64)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(y, x.astype(np.float64) @ t.dequantize().astype(np.float64)) > 1e-3  # fq did happen


def cpu_isas() -> list[str]:
    """Every native build this CPU runs: each ISA_FLAGS entry whose CPU flags it has, and scalar."""
    flags = native.cpu_flags()
    return [isa for isa, need in native.ISA_CPU_FLAGS.items() if need <= flags] + ["scalar"]


def weight_bs(fmt_name: str, k: int, n: int, block_size: int, seed: int) -> storage.PackedTensor:
    fmt = dataclasses.replace(FORMATS[fmt_name], name=f"{fmt_name}_{block_size}", block_size=block_size)
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return storage.from_block(codec.quantize_block(w, fmt, axis=0), fmt)


# (weight format, weight block, act): blocks that coincide take the per-block integer path, the
# others the per-lane one; K = 192 leaves a short last group of 8 blocks, 100 a ragged block.
# act None: the float path (512-bit steps of 128 k on AVX512 builds; K = 192 ends in a half step).
ISA_CASES = [("mxfp4", 32, "mxfp4"), ("nvfp4", 16, "nvfp4"), ("nvfp4", 16, "mxfp4"), ("mxfp4", 32, "nvfp4"),
             ("mxfp4", 64, "mxfp4"), ("nvfp4", 128, "nvfp4"), ("mxfp4", 32, None), ("nvfp4", 16, None),
             ("mxfp4", 64, None)]


@pytest.mark.parametrize("isa", cpu_isas())
def test_every_isa_build_matches_numpy(lib, isa):
    """Each build this CPU runs (AVX2 vpmaddubsw, VNNI vpdpbusd, scalar) computes fq(x) @ W within
    1e-5 of float64 for coinciding and differing weight/activation blocks, ragged K, 1, 5, 9 and
    37 rows (GEMV, 4-row blocks, the GEMMs: W4A4 from 4 rows on AVX2 and 8 on AVX-512, float from
    16; 37 rows end in a short panel), and propagates a NaN in x to its row only."""
    library = lib if isa == native.detect_isa() else native.build(isa=isa)
    for (wfmt, bs, act), k in itertools.product(ISA_CASES, (192, 100)):
        t = weight_bs(wfmt, k, 11, bs, seed=k + bs)
        st = 0.0123 if act == "nvfp4" else None
        proto = model(t, ["M", k], act=act, act_tensor_scale=st)
        for rows in (1, 5, 9, 37):
            x = act_inputs(act or wfmt, rows, k, seed=rows * k, tensor_scale=st or 1.0, magnitudes=(-3, 0, 1))
            xq = x if act is None else reference_fq(x, act, st or 1.0)
            ref = xq.astype(np.float64) @ t.dequantize().astype(np.float64)
            y = native_session(library, proto).run(None, {"x": x})[0]
            assert rel_err(y, ref) <= 1e-5, (isa, wfmt, bs, act, k, rows)
        x[0, k // 2] = np.nan
        y = native_session(library, proto).run(None, {"x": x})[0]
        assert np.isnan(y[0]).all() and not np.isnan(y[1:]).any(), (isa, wfmt, bs, act, k)


def avx_builds() -> dict:
    """The vector (AVX2 / AVX2-VNNI / AVX-512 VNNI) builds this CPU runs, by name."""
    return {isa: native.build(isa=isa) for isa in cpu_isas() if isa != "scalar"}


# The cases the GEMMs take (weight and activation blocks coincide, or float activations).
GEMM_CASES = [("mxfp4", 32, "mxfp4"), ("nvfp4", 16, "nvfp4"), ("mxfp4", 32, None), ("nvfp4", 16, None),
              ("mxfp4", 64, None)]


def test_gemm_paths_give_the_same_bits_on_every_avx_build(lib):
    """Issue 9 (AVX2 GEMM paths): the prefill GEMMs (rows in the vector lanes: 16 per 512-bit
    vector, 8 per 256-bit one) run the same per-lane operations in the same order on every width,
    so from 16 rows on (where every build takes them) the avx2 (vpmaddubsw), avx2-vnni and
    avx512-vnni builds return identical bits for MatMulFp4 (W4A4 and weight-only) and MatMulF8.
    On e10cd69 the AVX2 builds had no GEMM (4-row blocks summed in another order): bits differed."""
    builds = avx_builds()
    if len(builds) < 2:
        pytest.skip(f"this CPU runs {len(builds)} AVX build(s)")
    protos = []
    for (wfmt, bs, act), k in itertools.product(GEMM_CASES, (1536, 100)):
        st = 0.0123 if act == "nvfp4" else None
        protos.append((model(weight_bs(wfmt, k, 13, bs, seed=k + bs), ["M", k], act=act, act_tensor_scale=st),
                       k, act or wfmt, st, (wfmt, bs, act, k)))
    rng = np.random.default_rng(9)
    for k in (1536, 83):
        codes = rng.integers(0, 256, (13, k)).astype(np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x11  # finite E4M3FN codes
        protos.append((f8_model(codes, rng.uniform(0.5, 2, 13).astype(np.float32), "e4m3fn", ["M", k]), k, "mxfp4",
                       None, ("e4m3fn", k)))
    for (proto, k, fmt, st, case), rows in itertools.product(protos, (16, 37)):
        x = act_inputs(fmt, rows, k, seed=rows + k, tensor_scale=st or 1.0, magnitudes=(-3, 0, 1))
        ys = {isa: native_session(b, proto).run(None, {"x": x})[0] for isa, b in builds.items()}
        first, y0 = next(iter(ys.items()))
        for isa, y in ys.items():
            assert_bits_equal(y, y0, f"{case} at {rows} rows: {isa} vs {first}")


@pytest.mark.parametrize("isa", [i for i in cpu_isas() if i != "scalar"])
def test_w4a4_extreme_blocks_are_exact(lib, isa):
    """No int16 saturation on any build (the AVX2 GEMM adds a block's vpmaddubsw pairs in int16):
    weights and activations all +-6 (u8 2w + 12 = 24 or 0, s8 2x = +-12) in sign patterns that
    drive every pair to +-576 and every 32-block to +-4608, at 1, 4, 9 and 37 rows (GEMV, 4-row
    blocks, both GEMMs). Every product is a small integer, so y must equal the float64 result exactly."""
    library = native.build(isa=isa)
    k, n = 256, 8
    signs = np.where(np.random.default_rng(3).random((k, n)) < 0.5, -1.0, 1.0)
    signs[:, 0], signs[:, 1] = 1.0, -1.0  # columns whose every product has the row's sign
    t = weight_bs("mxfp4", k, n, 32, seed=0)
    t = storage.from_block(codec.quantize_block((6.0 * signs).astype(np.float32), t.fmt, axis=0), t.fmt)
    assert np.array_equal(t.dequantize(), 6.0 * signs)
    proto = model(t, ["M", k], act="mxfp4")
    for rows in (1, 4, 9, 37):
        x = np.where(np.random.default_rng(rows).random((rows, k)) < 0.5, -6.0, 6.0).astype(np.float32)
        x[0], x[-1] = 6.0, -6.0
        y = native_session(library, proto).run(None, {"x": x})[0]
        np.testing.assert_array_equal(y, x.astype(np.float64) @ (6.0 * signs), err_msg=f"{isa} rows {rows}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_every_scale_code(lib, fmt, fused):
    """The vector paths decode scale codes arithmetically (not through the table): column n of the
    weight uses scale code n in all 8 blocks, so y[:, n] = (fq(x) @ e2m1 codes) * scale(n) checks
    each of the 256 codes on its own (E4M3 subnormals and NaN, E8M0 2**-127 and NaN), with the
    activation quantizer fused (integer path) and without (float path)."""
    t = weight(fmt, 8 * FORMATS[fmt].block_size, 256, seed=7)
    k = t.shape[0]
    scale_codes = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 8, axis=1)
    act = fmt if fused else None
    st = 0.0123 if act == "nvfp4" else None
    x = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    y = native_session(lib, model(t, [3, k], act=act, act_tensor_scale=st, w_scales=scale_codes)).run(None, {"x": x})[0]
    e2m1 = codec.decode(np.asarray(t.codes, np.uint8), FORMATS["e2m1"])  # [K, N] element values
    if fmt == "nvfp4":
        tensor_scale = np.float32(np.asarray(t.tensor_scale).reshape(-1)[0])
        values = codec.decode(np.arange(256, dtype=np.uint8), FORMATS["e4m3fn"]).astype(np.float32) * tensor_scale
    else:
        with np.errstate(over="ignore"):
            values = np.where(np.arange(256) == 255, np.nan, 2.0 ** (np.arange(256) - 127.0))
    xq = reference_fq(x, fmt, st or 1.0) if fused else x
    ref = (xq.astype(np.float64) @ e2m1.astype(np.float64)) * values.astype(np.float64)
    nan = np.isnan(values)
    assert np.isnan(y[:, nan]).all()
    finite = ~nan & (np.abs(ref).max(axis=0) < 1e37)  # E8M0 codes near 2**127 overflow float32 legitimately
    assert finite.sum() >= 240
    err = np.abs(y[:, finite] - ref[:, finite]) / np.maximum(np.abs(ref[:, finite]).max(axis=0), 1e-300)
    assert err.max() <= 1e-5


def test_act_nvfp4_with_mxfp4_weight_uses_an_empty_t():
    x = ir.Value(name="x", shape=ir.Shape([1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21})
    node = native.emit_matmul_fp4(graph, x, weight("mxfp4", 64, 4), "w", act=FORMATS["nvfp4"],
                                  act_tensor_scale=0.5).producer()
    assert node.inputs[3] is None and node.inputs[4].const_value.numpy() == np.float32(0.5)
    assert node.attributes["act"].value == "nvfp4"
    node = native.emit_matmul_fp4(graph, x, weight("nvfp4", 64, 4), "v", act=FORMATS["mxfp4"]).producer()
    assert len(node.inputs) == 4 and node.attributes["act"].value == "mxfp4"
    assert "act" not in native.emit_matmul_fp4(graph, x, weight("mxfp4", 64, 4), "u").producer().attributes


def test_act_errors(lib):
    t = weight("mxfp4", 64, 4)
    with pytest.raises(ORT_ERRORS, match="MatMulFp4: act must be"):
        native_session(lib, model(t, [1, 64], {"act": "int8"})).run(None, {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(ORT_ERRORS, match="needs the activation tensor scale"):
        native_session(lib, model(t, [1, 64], {"act": "nvfp4"}, act="mxfp4")).run(None, {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(ORT_ERRORS, match="A_T is only used"):
        proto = model(t, [1, 64], {"act": "mxfp4"}, act="nvfp4", act_tensor_scale=1.0)
        native_session(lib, proto).run(None, {"x": np.zeros((1, 64), np.float32)})
    x = ir.Value(name="x", shape=ir.Shape([1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21})
    with pytest.raises(ValueError, match="needs a static act_tensor_scale"):
        native.emit_matmul_fp4(graph, x, t, "w", act=FORMATS["nvfp4"])
    with pytest.raises(ValueError, match="only used with nvfp4"):
        native.emit_matmul_fp4(graph, x, t, "w", act=FORMATS["mxfp4"], act_tensor_scale=1.0)
    with pytest.raises(ValueError, match="fuses only mxfp4 or nvfp4"):
        native.emit_matmul_fp4(graph, x, t, "w", act=FORMATS["mxfp8_e4m3"])


# --- FakeQuantMX / FakeQuantNVFP4 ----------------------------------------------------------------

MX_ACTS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8"]
NVFP4_SCALES = [1.0, 2.0**-30, 0.0123, 1e3]


def fake_quant_model(shape, axis: int) -> ir.Model:
    """x -> every MX activation format's FakeQuantMX and NVFP4's FakeQuantNVFP4 (several tensor
    scales), as qcompile function ops along `axis`."""
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    graph.outputs.extend([functions.fake_quant(graph, x, FORMATS[f], f, axis=axis) for f in MX_ACTS])
    graph.outputs.extend([functions.fake_quant(graph, x, FORMATS["nvfp4"], f"nv{i}", tensor_scale=st, axis=axis)
                          for i, st in enumerate(NVFP4_SCALES)])
    model = ir.Model(graph, ir_version=10)
    functions.attach(model)
    return model


@pytest.mark.parametrize("axis, shape", [(-1, (2, 3, 5, 70)), (1, (2, 45, 3, 4)), (0, (37, 3, 4))])
def test_native_fake_quant_equals_the_function_ops(lib, axis, shape):
    """NativeFakeQuantPass moves every FakeQuant node to the native library, drops the function
    definitions and the qcompile opset, and the outputs stay bit for bit those of the function ops
    in stock onnxruntime (and of the codec): zero/ragged/non-finite blocks, ties, 2**-140..2**120."""
    x = block_probe(np.random.default_rng(8), shape, axis)
    x = np.where(np.abs(x) > 1e30, x * 1e-20, x).astype(np.float32)  # NVFP4 blocks within reach of the scale
    model = fake_quant_model(shape, axis)
    want = session(ir.to_proto(model), "all").run(None, {"x": x})
    result = NativeFakeQuantPass()(model)
    assert result.modified and not model.functions and functions.DOMAIN not in model.opset_imports
    assert {n.domain for n in model.graph} == {native.DOMAIN}
    for level in ("disable", "all"):
        got = native_session(lib, ir.to_proto(model), level).run(None, {"x": x})
        for name, g, w in zip([*MX_ACTS, *(f"nvfp4 {st}" for st in NVFP4_SCALES)], got, want):
            assert_bitwise(g, w, f"{name} axis {axis} @{level}")
    for f, g in zip(MX_ACTS, got):
        assert_bitwise(g, codec.fake_quant(x, FORMATS[f], axis), f"{f} vs codec")


def test_native_fake_quant_every_binade(lib):
    """Block amax = 2**k and its float32 neighbours for every k: the exact shared exponent."""
    amax = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    amax = np.concatenate([amax, np.nextafter(amax, np.float32(0)), np.nextafter(amax, np.float32(np.inf))])
    amax = amax[np.isfinite(amax) & (amax > 0)]
    x = (amax[:, None] * np.random.default_rng(6).uniform(-1, 1, (amax.size, 32))).astype(np.float32)
    x[:, 0] = amax
    model = fake_quant_model(x.shape, -1)
    NativeFakeQuantPass()(model)
    got = native_session(lib, ir.to_proto(model)).run(None, {"x": x})
    for f, g in zip(MX_ACTS, got):
        assert_bitwise(g, codec.fake_quant(x, FORMATS[f], -1), f)


def test_native_fake_quant_bad_input_is_a_clean_error(lib):
    model = fake_quant_model((4, 64), 1)
    NativeFakeQuantPass()(model)
    node = next(n for n in model.graph if n.op_type == "FakeQuantMX")
    node.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 5)
    with pytest.raises(ORT_ERRORS, match="FakeQuantMX: X must be float with axis 5"):
        native_session(lib, ir.to_proto(model)).run(None, {"x": np.zeros((4, 64), np.float32)})
    node.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 1)
    node.attributes["emin"] = ir.Attr("emin", ir.AttributeType.INT, -140)
    with pytest.raises(ORT_ERRORS, match="grid attributes out of range"):
        native_session(lib, ir.to_proto(model))


MINIFLOAT_GRIDS = ["e2m1", "e2m3", "e3m2", "e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e3m4", "int4", "int8", "uint4"]


def special_values(rng, n: int) -> np.ndarray:
    """Normals over 2**-140..2**40, exact ties of several grids, signed zeros, inf, NaN, subnormals."""
    x = rng.standard_normal(n) * 2.0 ** rng.integers(-140, 40, n)
    x[:64] = np.repeat([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38], 8)
    x[64:128] = (np.arange(64) - 32) * 0.25 + 0.125  # ties on quarter grids
    return x.astype(np.float32)


def test_native_fake_quant_minifloat_equals_the_function_op(lib):
    """FakeQuantMinifloat (per-tensor scale) natively, bit for bit with the function op, over the
    float and integer grids, scales 2**-20..2**20 and 0.037, on special values."""
    x = special_values(np.random.default_rng(3), 4096).reshape(4, 1024)
    xv = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([xv], [], nodes=[], opset_imports={"": 21}, name="g")
    cases = [(f, s) for f in MINIFLOAT_GRIDS for s in (2.0**-20, 0.037, 1.0, 2.0**20)]
    graph.outputs.extend([functions.fake_quant(graph, xv, parse_format(f), f"{f}_{i}", scale=s)
                          for i, (f, s) in enumerate(cases)])
    model = ir.Model(graph, ir_version=10)
    functions.attach(model)
    want = session(ir.to_proto(model), "all").run(None, {"x": x})
    NativeFakeQuantPass()(model)
    assert not model.functions and {n.domain for n in model.graph} == {native.DOMAIN}
    got = native_session(lib, ir.to_proto(model)).run(None, {"x": x})
    for (f, s), g, w in zip(cases, got, want):
        assert_bitwise(g, w, f"{f} scale {s}")


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2,
                                   ir.DataType.FLOAT8E5M2FNUZ])
def test_float8_cast_pair_becomes_native(lib, dtype):
    """LowerForOnnxruntimePass's float8 activation quantizer Mul(Cast(Cast(Div(x, s), F8), FLOAT), s)
    becomes one native FakeQuantMinifloat with the same output bits (saturation, NaN, signed zero)."""
    x = special_values(np.random.default_rng(4), 2048).reshape(2, 1024)
    xv = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    s = ir.Value(name="s", const_value=ir.tensor(np.array(0.037, np.float32), name="s"))
    div = ir.node("Div", [xv, s])
    cast = ir.node("Cast", [div.outputs[0]], {"to": dtype, "saturate": 1})
    back = ir.node("Cast", [cast.outputs[0]], {"to": ir.DataType.FLOAT})
    mul = ir.node("Mul", [back.outputs[0], s], name="fq")
    mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = "y", ir.DataType.FLOAT, xv.shape
    graph = ir.Graph([xv], [mul.outputs[0]], nodes=[div, cast, back, mul], initializers=[s],
                     opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    want = session(ir.to_proto(model), "disable").run(None, {"x": x})[0]
    assert_pass_contract(NativeFakeQuantPass(), model, expect_modified=True)  # a second run changes nothing
    assert [(n.domain, n.op_type) for n in model.graph] == [(native.DOMAIN, "FakeQuantMinifloat")]
    got = native_session(lib, ir.to_proto(model)).run(None, {"x": x})[0]
    assert_bitwise(got, want, str(dtype))


# --- MatMulF8 ------------------------------------------------------------------------------------


def f8_model(codes: np.ndarray, scales: np.ndarray, fmt: str, x_shape: list) -> onnx.ModelProto:
    """x -> MatMulF8(codes [N, K], scales [N]) -> y."""
    n, k = codes.shape
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21, native.DOMAIN: 1}, name="g")
    w = ir.Value(name="w", const_value=ir.tensor(codes, name="w"))
    sc = ir.Value(name="s", const_value=ir.tensor(scales, name="s"))
    graph.register_initializer(w)
    graph.register_initializer(sc)
    node = ir.node(native.F8_OP, [x, w, sc], {"K": k, "N": n, "fmt": fmt}, domain=native.DOMAIN, name="mm")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return ir.to_proto(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_matmul_f8_every_code_every_isa(lib, fmt, isa):
    """MatMulF8 = float64 x @ (ml_dtypes-decoded codes * scale) within 1e-5, for every one of the
    256 codes (each column holds one code and zeros, so each is checked on its own: subnormals, the
    extremes, NaN and E5M2 infinities) and for random weights, at 1, 5 and 37 rows (GEMV, columns
    decoded once, and on AVX builds the GEMM), K ragged against the vector width."""
    library = lib if isa == native.detect_isa() else native.build(isa=isa)
    dtype = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]
    rng = np.random.default_rng(12)
    k = 83
    every = np.zeros((256, k), np.uint8)
    every[np.arange(256), rng.integers(0, k, 256)] = np.arange(256)
    random = rng.integers(0, 256, (40, k)).astype(np.uint8)
    random[(random & 0x7F) >= (0x7C if fmt == "e5m2" else 0x7F)] = 0x11  # finite, for the random block
    codes = np.concatenate([every, random])
    scales = (2.0 ** rng.integers(-4, 4, codes.shape[0]) * rng.uniform(0.5, 1.5, codes.shape[0])).astype(np.float32)
    values = codes.view(dtype).astype(np.float64) * scales[:, None]
    proto = f8_model(codes, scales, fmt, ["M", k])
    for rows in (1, 5, 37):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        y = native_session(library, proto).run(None, {"x": x})[0]
        with np.errstate(invalid="ignore", over="ignore"):
            ref = x.astype(np.float64) @ values.T
        bad = ~np.isfinite(ref)
        assert np.array_equal(np.isnan(y), np.isnan(ref)), (isa, fmt, rows)
        assert np.array_equal(y[bad & ~np.isnan(ref)], ref[bad & ~np.isnan(ref)].astype(np.float32)), "infinities"
        col_max = np.abs(np.where(bad, 0, ref)).max(axis=0)
        with np.errstate(invalid="ignore"):  # inf - inf where `bad` masks it
            rel = (np.abs(np.where(bad, 0, y - ref)) / np.maximum(col_max, 1e-300)).max()
        assert rel <= 1e-5, (isa, fmt, rows, rel)


def test_fp8_native_lowering_runs_weights_in_matmul_f8():
    """`fp8 --lowering native`: every MatMul/Gemm weight runs in MatMulF8 (no weight
    DequantizeLinear is left) and the output stays within 1e-5 of the stock emission."""
    import tiny_models
    import qcompile
    from helpers import op_counts, run, session_options

    proto = tiny_models.mlp()
    calib, ev = tiny_models.inputs_for(proto, 32, seed=1), tiny_models.inputs_for(proto, 8, seed=2)
    stock = qcompile.compile(proto, "fp8", calib=calib, eval=ev)
    nat = qcompile.compile(proto, "fp8", calib=calib, eval=ev, lowering="native")
    out = ir.to_proto(nat.model)
    ops = op_counts(out)
    assert ops[native.F8_OP] == 2 and ops["DequantizeLinear"] == 0 and ops["FakeQuantMinifloat"] >= 1, ops
    x = next(iter(ev.values()))
    want = run(ir.to_proto(stock.model), {"x": x}, "all")[0]
    got = ort.InferenceSession(out.SerializeToString(), native.session_options(session_options("all")),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def test_prefill_bench_runs(lib, tmp_path):
    """bench/native_gemm.py (the README's per-ISA prefill table) runs end to end: every row has a
    positive median for the library and for onnxruntime's float MatMul."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "native_gemm.py"
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(script), "--isa", native.detect_isa(), "--configs", "mxfp4,fp8",
                        "--runs", "2", "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["config"], row["k"], row["n"]) for row in rows][:3] == [("mxfp4", 384, 384), ("mxfp4", 384, 1536),
                                                                        ("mxfp4", 1536, 384)]
    assert len(rows) == 6 and all(min(row["ms"].values()) > 0 for row in rows), rows


AVX2_SCRIPT = r"""
import sys
import numpy as np, onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__ as cpu

lib, out, *models = sys.argv[1:]
feeds = np.load("feeds.npz")
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.register_custom_ops_library(lib)
ys = {f"{i}_{r}": ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]).run(None, {"x": feeds[r]})[0]
      for i, m in enumerate(models) for r in feeds.files}
from qcompile import native
np.savez(out, avx512=cpu["AVX512F"], isa=native.detect_isa(), **ys)
"""


def test_avx2_build_runs_on_an_avx2_only_cpu(lib, tmp_path):
    """The avx2 build (the AVX2 GEMMs included) on an AVX2-only CPU (this one, or an emulated Haswell,
    `qemu-x86_64 -cpu Haswell`: no AVX-512, no VNNI; `helpers.avx2_command`) returns the same bits as on this CPU for W4A4, weight-only and float8
    weights at 1, 5 and 37 rows: it needs nothing beyond AVX2 + FMA + F16C. There `detect_isa()`
    says avx2, though qemu shows the host's /proc/cpuinfo (cpuid decides)."""
    import subprocess

    from helpers import avx2_command

    avx2 = native.build(isa="avx2")
    k = 200
    protos = [model(weight_bs("mxfp4", k, 11, 32, seed=1), ["M", k], act="mxfp4"),
              model(weight_bs("nvfp4", k, 11, 16, seed=2), ["M", k], act="nvfp4", act_tensor_scale=0.0123),
              model(weight_bs("nvfp4", k, 11, 16, seed=3), ["M", k]),
              f8_model(np.random.default_rng(4).integers(0, 0x7E, (11, k)).astype(np.uint8),
                       np.full(11, 0.5, np.float32), "e4m3fn", ["M", k])]
    feeds = {str(r): act_inputs("mxfp4", r, k, seed=r, magnitudes=(-3, 0, 1)) for r in (1, 5, 37)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    paths = []
    for i, p in enumerate(protos):
        paths.append(tmp_path / f"m{i}.onnx")
        onnx.save(p, paths[-1])
    (tmp_path / "run.py").write_text(AVX2_SCRIPT)
    r = subprocess.run([*avx2_command(), "run.py", str(avx2), "out.npz", *map(str, paths)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = dict(np.load(tmp_path / "out.npz"))
    assert not got.pop("avx512"), "the emulated CPU must hide AVX-512"
    assert str(got.pop("isa")) == "avx2"
    for i, p in enumerate(protos):
        for rows, x in feeds.items():
            assert_bits_equal(got[f"{i}_{rows}"], native_session(avx2, p).run(None, {"x": x})[0], f"model {i}, {rows} rows")


# --- BlockHadamard (the native emission of online rotations, passes/rotate.py) ----------------------
def _hadamard_model(block: int, shape: list, signs: np.ndarray | None):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(signs, "d")] if signs is not None else []
    node = helper.make_node("BlockHadamard", ["x", *(["d"] if signs is not None else [])], ["y"],
                            domain=native.DOMAIN, block=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native.DOMAIN, 1)],
                             ir_version=10)


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32, 128, 512])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_block_hadamard_matches_the_rotation(lib, block, kind):
    """Y = (X D)(I (x) H_b / sqrt b) with Sylvester's H_b: `Rotation.apply` (float64) to float32
    rounding, over rows of a 3-D input."""
    from qcompile.rotation import Rotation

    r = Rotation(1024, block, kind, seed=7)
    x = np.random.default_rng(block).standard_normal((2, 3, 1024)).astype(np.float32)
    x[..., 5] *= 50  # an outlier channel
    y = native_session(lib, _hadamard_model(block, [2, 3, 1024], r.signs())).run(None, {"x": x})[0]
    ref = r.apply(x.astype(np.float64))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_block_hadamard_errors(lib):
    with pytest.raises(ORT_ERRORS, match="power of two"):
        native_session(lib, _hadamard_model(24, [2, 48], None))
    sess = native_session(lib, _hadamard_model(32, [2, None], None))
    with pytest.raises(ORT_ERRORS, match="divisible by block 32"):
        sess.run(None, {"x": np.zeros((2, 40), np.float32)})


def _hadamard_quantize_models(block: int, k: int, signs: np.ndarray | None, scale: float, zp: np.ndarray):
    """(BlockHadamard -> QuantizeLinear, BlockHadamardQuantize[S8]) on x [rows, k]."""
    from onnx import TensorProto, helper, numpy_helper

    fused_op = "BlockHadamardQuantize" if zp.dtype == np.uint8 else "BlockHadamardQuantizeS8"
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(zp, "z")]
    if signs is not None:
        inits.append(numpy_helper.from_array(signs, "d"))
    d = ["d"] if signs is not None else [""]
    qtype = TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.INT8
    graphs = [
        [helper.make_node("BlockHadamard", ["x", *d[:1 if signs is not None else 0]], ["r"], domain=native.DOMAIN, block=block),
         helper.make_node("QuantizeLinear", ["r", "s", "z"], ["y"])],
        [helper.make_node(fused_op, ["x", *d, "s", "z"], ["y"], domain=native.DOMAIN, block=block)],
    ]
    return [helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                                [helper.make_tensor_value_info("y", qtype, None)], inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native.DOMAIN, 1)], ir_version=10)
            for nodes in graphs]


@pytest.mark.parametrize("zp", [np.uint8(128), np.uint8(3), np.int8(0), np.int8(-5)], ids=["u8-128", "u8-3", "s8-0", "s8-m5"])
@pytest.mark.parametrize("block,signed,k", [(32, False, 384), (128, True, 384), (8, False, 40)],
                         ids=["b32", "b128-signs", "b8-k40"])
def test_block_hadamard_quantize_is_quantize_linear_bit_for_bit(lib, zp, block, signed, k):
    """The fused op gives onnxruntime's QuantizeLinear of BlockHadamard's output, every code
    (saturating values included: a scale that clips ~5% of them; k = 40: the 32-code vector
    loop and the scalar tail)."""
    from qcompile.rotation import Rotation

    r = Rotation(k, block, "random" if signed else "hadamard", seed=2)
    x = np.random.default_rng(block).standard_normal((70, k)).astype(np.float32) * 3
    scale = float(np.quantile(np.abs(r.apply(x)), 0.95) / 127)
    ref_model, fused_model = _hadamard_quantize_models(block, k, r.signs(), scale, np.array(zp))
    ref = native_session(lib, ref_model).run(None, {"x": x})[0]
    got = native_session(lib, fused_model).run(None, {"x": x})[0]
    assert got.dtype == ref.dtype and np.array_equal(got, ref)
    lo, hi = np.iinfo(ref.dtype).min, np.iinfo(ref.dtype).max
    assert ((ref == lo) | (ref == hi)).mean() > 0.01, "the case saturates some codes"


@pytest.mark.parametrize("signed", [False, True], ids=["hadamard", "random"])
def test_rotation_quantize_pass(lib, signed):
    """NativeRotationQuantizePass turns BlockHadamard -> QuantizeLinear (read by a DequantizeLinear ->
    MatMul) into one BlockHadamardQuantize: the contract (a second run is a no-op), the same
    outputs bit for bit, and onnxruntime still fuses the DequantizeLinear -> MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    from qcompile.backends.onnxruntime.lower_native import NativeRotationQuantizePass
    from qcompile.rotation import Rotation

    rng = np.random.default_rng(3)
    r = Rotation(128, 32, "random" if signed else "hadamard", seed=1)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.integers(-100, 100, (128, 64)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    d = []
    if signed:
        inits.append(numpy_helper.from_array(r.signs(), "d"))
        d = ["d"]
    nodes = [helper.make_node("BlockHadamard", ["x", *d], ["xr"], domain=native.DOMAIN, block=32),
             helper.make_node("QuantizeLinear", ["xr", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native.DOMAIN, 1)], ir_version=10)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    ref = native_session(lib, proto).run(None, {"x": x})[0]
    model = ir.from_proto(proto)
    assert_pass_contract(NativeRotationQuantizePass(), model, expect_modified=True)
    assert [n.op_type for n in model.graph][:1] == ["BlockHadamardQuantize"]
    assert "BlockHadamard" not in [n.op_type for n in model.graph] and "QuantizeLinear" not in [n.op_type for n in model.graph]
    fused = ir.to_proto(model)
    np.testing.assert_array_equal(native_session(lib, fused).run(None, {"x": x})[0], ref)
