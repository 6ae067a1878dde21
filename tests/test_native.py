"""The optional native custom-op library (`qcompile.native`): MatMulFp4 = x @ dequantize(FP4 weight).

Checks against float64 numpy `x @ t.dequantize()` (max |diff| / max |ref| <= 1e-5) for OCP MXFP4
(E8M0 scales per 32) and NVFP4 (E4M3 scales per 16 + tensor scale) at two optimization levels,
clean ORT errors for bad attributes and shapes, and that a stock session cannot load the op.
If the library cannot be built, the tests fail under CI (env CI set) and are skipped elsewhere.
"""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile import codec, native, storage
from qcompile.formats import FORMATS
from helpers import LEVELS, session

ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph)


@pytest.fixture(scope="module")
def lib():
    try:
        return native.build()
    except native.NativeUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"native library unavailable under CI: {e}")
        pytest.skip(f"native library unavailable: {e}")


def weight(fmt_name: str, k: int, n: int, seed: int = 0) -> storage.PackedTensor:
    fmt = FORMATS[fmt_name]
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return storage.from_block(codec.quantize_block(w, fmt, axis=0), fmt)


def model(t: storage.PackedTensor, x_shape: list, attrs: dict | None = None, w_codes: np.ndarray | None = None):
    """x -> MatMulFp4(t) -> y; `attrs` overrides node attributes, `w_codes` replaces the packed codes."""
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    y = native.emit_matmul_fp4(graph, x, t, "w")
    node = y.producer()
    for key, value in (attrs or {}).items():
        node.attributes[key] = ir.Attr(key, ir.AttributeType.STRING if isinstance(value, str) else ir.AttributeType.INT,
                                       value)
    if w_codes is not None:
        node.inputs[1].const_value = ir.tensor(w_codes, name=node.inputs[1].name)
        node.inputs[1].shape = ir.Shape(w_codes.shape)
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
