"""Capability facts: which int16 pairs onnxruntime's integer kernels saturate on AVX2, and that the
pair bound of `weights.py` (`plan.PairBound`) is exactly what keeps them from saturating.

The AVX2 kernels run here natively on a CPU without AVX-512/VNNI, else under `qemu-x86_64 -cpu
Haswell` (helpers.run_avx2). Each probe puts two weights of 127 at chosen reduction positions of one
output channel and activation codes of 255 under them: an exact kernel gives 127*255*2 = 64770, a
kernel that adds the two products in int16 gives 32767. The facts are recorded in
`Capabilities.int16_pair_saturation`; if onnxruntime changes its kernels, these tests say so.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import helpers
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.formats import parse_format
from qcompile.plan import PairBound, PerChannel, QuantSpec
from qcompile.weights import pair_sums, quantize_weight

EXACT, SATURATED = 127 * 255 * 2, 32767


def _matmul(w: np.ndarray, sw: np.ndarray, b_activation: bool = False):
    """y = DQ(Q(x)) @ DQ(W) with uint8 activations (scale 1, zero point 0): MatMulIntegerToFloat at ALL.
    b_activation: W is a second input quantized to uint8 at run time (activation x activation)."""
    k, n = w.shape
    nodes = [h.make_node("QuantizeLinear", ["x", "one", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "one", "z"], ["xd"])]
    inits = [nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(0, np.uint8), "z")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["M", k])]
    if b_activation:
        nodes += [h.make_node("QuantizeLinear", ["w", "one", "z"], ["wq"]), h.make_node("DequantizeLinear", ["wq", "one", "z"], ["wd"])]
        inputs.append(h.make_tensor_value_info("w", T.FLOAT, [k, n]))
    else:
        nodes.append(h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1))
        inits += [nh.from_array(w.astype(np.int8), "wq"), nh.from_array(sw.astype(np.float32), "sw")]
    nodes.append(h.make_node("MatMul", ["xd", "wd"], ["y"]))
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, ["M", n])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _conv(w: np.ndarray, group: int, cin: int):
    """QLinearConv at ALL: uint8 input (scale 1), int8 weights, uint8 output with a step of 4096."""
    k = w.shape[-1]
    nodes = [h.make_node("QuantizeLinear", ["x", "one", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "one", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0),
             h.make_node("Conv", ["xd", "wd"], ["c"], pads=[k // 2] * 4, group=group),
             h.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]), h.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    inits = [nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(0, np.uint8), "z"),
             nh.from_array(w.astype(np.int8), "wq"), nh.from_array(np.ones(w.shape[0], np.float32), "sw"),
             nh.from_array(np.array(4096.0, np.float32), "sy"), nh.from_array(np.array(128, np.uint8), "zy")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, cin, 5, 5])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, w.shape[0], 5, 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _conv_probe(cin, group, mult, k, taps):
    """Weights 127 at (channel in group, ky, kx) of output channel 0, activations 255 under them."""
    w = np.zeros((group * mult, cin // group, k, k))
    x = np.zeros((1, cin, 5, 5), np.float32)
    for c, ky, kx in taps:
        w[0, c, ky, kx] = 127
        x[0, c, 2 + ky - k // 2, 2 + kx - k // 2] = 255
    return _conv(w, group, cin), {"x": x}


# (what, model, feeds, index of the probed output, AVX2 result); the Conv output is requantized
# with a step of 4096, so 64770 reads 65536 and 32767 reads 32768.
K = 8


def _mm_probe(i, j, b_activation=False):
    w = np.zeros((K, 2))
    w[[i, j], 0] = 127
    x = np.zeros((1, K), np.float32)
    x[0, [i, j]] = 255
    feeds = {"x": x} | ({"w": w.astype(np.float32)} if b_activation else {})
    return _matmul(w, np.ones(2), b_activation), feeds


PROBES = [
    ("MatMul K pair (0,1)", *_mm_probe(0, 1), SATURATED),
    ("MatMul K pair (6,7)", *_mm_probe(6, 7), SATURATED),
    ("MatMul K positions (1,2): different pairs", *_mm_probe(1, 2), EXACT),
    ("activation x activation MatMul, u8 x u8 (pair (0,1))", *_mm_probe(0, 1, b_activation=True), EXACT),
    ("Conv 3x3, Cin 4: channels (0,1) of one tap", *_conv_probe(4, 1, 1, 3, [(0, 1, 1), (1, 1, 1)]), 32768),
    ("Conv 3x3, Cin 4: one channel, taps (1,1),(1,2)", *_conv_probe(4, 1, 1, 3, [(0, 1, 1), (0, 1, 2)]), 65536),
    ("Conv 3x3, Cin 3: channel 2 of tap (0,0) and channel 0 of tap (0,1)", *_conv_probe(3, 1, 1, 3, [(2, 0, 0), (0, 0, 1)]), 32768),
    ("Conv 1x1, Cin 5: channels (2,3)", *_conv_probe(5, 1, 1, 1, [(2, 0, 0), (3, 0, 0)]), 32768),
    ("Conv 1x1, Cin 5: channels (3,4)", *_conv_probe(5, 1, 1, 1, [(3, 0, 0), (4, 0, 0)]), 65536),
    ("grouped Conv 1x1 (2 groups of 4): channels (0,1)", *_conv_probe(8, 2, 2, 1, [(0, 0, 0), (1, 0, 0)]), 32768),
    ("depthwise Conv 3x3: taps (0,0),(0,1)", *_conv_probe(8, 8, 1, 3, [(0, 0, 0), (0, 0, 1)]), 65536),
    ("depthwise Conv 3x3, channel multiplier 2: taps (0,0),(0,1)", *_conv_probe(4, 4, 2, 3, [(0, 0, 0), (0, 0, 1)]), 32768),
]


def _value(out: np.ndarray) -> float:
    return float(out.reshape(-1)[0] if out.ndim == 2 else out[0, 0, 2, 2])


@pytest.fixture(scope="module")
def avx2_results(tmp_path_factory):
    outs = helpers.run_avx2([p[1] for p in PROBES], [p[2] for p in PROBES], tmp_path_factory.mktemp("pairs"))
    return [_value(o[0]) for o in outs]


@pytest.mark.parametrize("i", range(len(PROBES)), ids=[p[0] for p in PROBES])
def test_which_pairs_saturate_on_avx2(i, avx2_results):
    what, model, feeds, want = PROBES[i]
    assert avx2_results[i] == want, f"{what}: AVX2 kernels give {avx2_results[i]}, expected {want}"
    # The unfused reference computes in float on every CPU: never saturated.
    ref = _value(helpers.run(model, feeds, level="disable")[0])
    assert ref in (EXACT, 65536), f"{what}: DISABLE_ALL gives {ref}"


@pytest.mark.skipif(not helpers.host_has_avx512_or_vnni(), reason="this CPU runs the AVX2 kernels itself")
def test_vnni_kernels_do_not_saturate():
    """On this AVX-512/VNNI CPU the same probes are exact (VPDPBUSD sums in int32)."""
    for what, model, feeds, _ in PROBES:
        got = _value(helpers.run(model, feeds)[0])
        assert got in (EXACT, 65536), f"{what}: {got}"


def test_capability_table_states_the_fact():
    caps = CAPABILITIES
    u8, s8 = parse_format("uint8"), parse_format("int8")
    for cpu in ("portable", "avx2", "avx512"):
        assert caps.pair_bound(cpu, s8.onnx_dtype, u8) == 128  # 255 * 128 <= 32767 < 255 * 129
    assert caps.pair_bound("vnni", s8.onnx_dtype, u8) is None
    assert caps.pair_bound("arm64", s8.onnx_dtype, u8) is None
    assert caps.pair_bound("portable", parse_format("int4").onnx_dtype, u8) is None  # 4-bit weights: no int8 kernel


def test_pair_bound_is_exactly_what_keeps_the_kernel_exact(tmp_path):
    """Random weights quantized with the pair bound give on AVX2 exactly the int32 sums of the VNNI
    kernels (bit-identical outputs); the same weights without the bound saturate somewhere."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    w[::7] *= 6  # heavy rows, as after SmoothQuant: many large same-signed pairs
    spec = QuantSpec("int8", PerChannel(1))
    bounded = quantize_weight(w, QuantSpec("int8", PerChannel(1), pairs=PairBound(0, 128)))
    free = quantize_weight(w, spec)
    assert pair_sums(bounded.codes, PairBound(0, 128), 1).max() <= 128
    assert pair_sums(free.codes, PairBound(0, 128), 1).max() > 128
    assert bounded.grown > 0 and free.grown == 0
    x = (rng.integers(180, 256, size=(32, 96)) * 1.0).astype(np.float32)  # u8 codes with scale 1
    models = [_matmul(bounded.codes, bounded.scale), _matmul(free.codes, free.scale)]
    avx2 = helpers.run_avx2(models, {"x": x}, tmp_path)
    exact = [(x.astype(np.float64) @ (q.codes.astype(np.float64) * q.scale)) for q in (bounded, free)]
    np.testing.assert_allclose(avx2[0][0], exact[0], rtol=1e-6)  # int32 sums, one float scaling: exact
    assert helpers.rel_err(avx2[1][0], exact[1]) > 1e-3, "unbounded weights should saturate some pairs on AVX2"
