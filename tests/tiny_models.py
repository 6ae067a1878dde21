"""Tiny seeded models built in code (onnx.helper), for unit and integration tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _init(name, arr):
    return nh.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def mlp(seed=0, d_in=64, hidden=128, d_out=10) -> onnx.ModelProto:
    """x[N,64] -> MatMul+Add -> Relu -> Gemm -> logits[N,10]."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)
    w2 = rng.standard_normal((d_out, hidden)) / np.sqrt(hidden)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        h.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        h.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        h.make_node("Gemm", ["h2", "w2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", d_in])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", d_out])],
        [_init("w1", w1), _init("b1", rng.standard_normal(hidden) * 0.1), _init("w2", w2), _init("b2", rng.standard_normal(d_out) * 0.1)],
    )


def cnn(seed=0) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv-BN-Relu -> MaxPool -> Conv-BN-Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c1, c2 = 8, 16
    inits = [
        _init("k1", rng.standard_normal((c1, 3, 3, 3)) / np.sqrt(27)),
        _init("k2", rng.standard_normal((c2, c1, 3, 3)) / np.sqrt(9 * c1)),
        _init("fc_w", rng.standard_normal((c2, 10)) / np.sqrt(c2)),
        _init("fc_b", rng.standard_normal(10) * 0.1),
    ]
    for i, c in ((1, c1), (2, c2)):
        inits += [
            _init(f"g{i}", 1 + 0.2 * rng.standard_normal(c)),
            _init(f"be{i}", 0.1 * rng.standard_normal(c)),
            _init(f"mu{i}", 0.1 * rng.standard_normal(c)),
            _init(f"var{i}", 0.5 + rng.random(c)),
        ]
    nodes = [
        h.make_node("Conv", ["x", "k1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["y1", "g1", "be1", "mu1", "var1"], ["z1"], name="bn1"),
        h.make_node("Relu", ["z1"], ["r1"], name="relu1"),
        h.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p1", "k2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["y2", "g2", "be2", "mu2", "var2"], ["z2"], name="bn2"),
        h.make_node("Relu", ["z2"], ["r2"], name="relu2"),
        h.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 16, 16])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10])],
        inits,
    )


def convnet(seed=0) -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv(+bias) -> Relu -> MaxPool -> Conv(+bias, 40 in-channels) -> Relu -> GlobalAveragePool
    -> Flatten -> Gemm. No BatchNorm, so the compiled weights are the initializers (for exact simulation)."""
    rng = np.random.default_rng(seed)
    c1, c2 = 40, 24
    inits = [
        _init("k1", rng.standard_normal((c1, 3, 3, 3)) / np.sqrt(27)), _init("kb1", 0.1 * rng.standard_normal(c1)),
        _init("k2", rng.standard_normal((c2, c1, 3, 3)) / np.sqrt(9 * c1)), _init("kb2", 0.1 * rng.standard_normal(c2)),
        _init("fc_w", rng.standard_normal((c2, 10)) / np.sqrt(c2)), _init("fc_b", rng.standard_normal(10) * 0.1),
    ]
    nodes = [
        h.make_node("Conv", ["x", "k1", "kb1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        h.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p1", "k2", "kb2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y2"], ["r2"], name="relu2"),
        h.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 12, 12])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10])],
        inits,
    )


def depthwise_cnn(seed=0, c=16, expand=3) -> onnx.ModelProto:
    """An inverted-residual (MobileNetV2 / EfficientNet-Lite) block: x[N,3,12,12] -> stem Conv 3x3 -> Relu ->
    expand Conv 1x1 -> Clip(0, 6) -> depthwise Conv 3x3 -> Clip(0, 6) -> project Conv 1x1 -> + stem ->
    GlobalAveragePool -> Flatten -> Gemm. Weights have heavy-tailed rows (a few large entries per output
    channel, as trained CNNs do), so many int8 reduction pairs are large."""
    rng = np.random.default_rng(seed)
    ce = c * expand

    def heavy(*s):
        return rng.standard_t(3, size=s) / np.sqrt(np.prod(s[1:]))

    inits = [
        _init("k0", heavy(c, 3, 3, 3)), _init("b0", 0.1 * rng.standard_normal(c)),
        _init("ke", heavy(ce, c, 1, 1)), _init("be", 0.1 * rng.standard_normal(ce)),
        _init("kd", heavy(ce, 1, 3, 3)), _init("bd", 0.1 * rng.standard_normal(ce)),
        _init("kp", heavy(c, ce, 1, 1)), _init("bp", 0.1 * rng.standard_normal(c)),
        _init("fc_w", heavy(c, 10)), _init("fc_b", 0.1 * rng.standard_normal(10)),
        _init("lo", np.array(0.0)), _init("hi", np.array(6.0)),
    ]
    nodes = [
        h.make_node("Conv", ["x", "k0", "b0"], ["y0"], name="stem", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["y0"], ["r0"], name="stem_relu"),
        h.make_node("Conv", ["r0", "ke", "be"], ["ye"], name="expand"),
        h.make_node("Clip", ["ye", "lo", "hi"], ["re"], name="expand_relu6"),
        h.make_node("Conv", ["re", "kd", "bd"], ["yd"], name="depthwise", group=ce, pads=[1, 1, 1, 1]),
        h.make_node("Clip", ["yd", "lo", "hi"], ["rd"], name="depthwise_relu6"),
        h.make_node("Conv", ["rd", "kp", "bp"], ["yp"], name="project"),
        h.make_node("Add", ["yp", "r0"], ["res"], name="residual"),
        h.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 12, 12])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10])],
        inits,
    )


def attention(seed=0, seq=16, d=32, heads=2) -> onnx.ModelProto:
    """One pre-norm self-attention block with residual: x[N,S,D] -> LN -> QKV -> softmax(QK^T/sqrt(dh))V -> proj + x."""
    rng = np.random.default_rng(seed)
    dh = d // heads

    def w(*s):
        return rng.standard_normal(s) / np.sqrt(s[0])

    inits = [
        _init("ln_g", 1 + 0.1 * rng.standard_normal(d)), _init("ln_b", 0.1 * rng.standard_normal(d)),
        _init("wq", w(d, d)), _init("wk", w(d, d)), _init("wv", w(d, d)), _init("wo", w(d, d)),
        _init("bq", 0.1 * rng.standard_normal(d)), _init("bk", 0.1 * rng.standard_normal(d)),
        _init("bv", 0.1 * rng.standard_normal(d)), _init("bo", 0.1 * rng.standard_normal(d)),
        _init("scale", np.array(1 / np.sqrt(dh))),
        nh.from_array(np.array([0, 0, heads, dh], dtype=np.int64), "split_shape"),
        nh.from_array(np.array([0, 0, d], dtype=np.int64), "merge_shape"),
    ]
    nodes = [h.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["xn"], name="ln", axis=-1)]
    for n in "qkv":
        nodes += [
            h.make_node("MatMul", ["xn", f"w{n}"], [f"{n}0"], name=f"{n}_proj"),
            h.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"], name=f"{n}_bias"),
            h.make_node("Reshape", [f"{n}1", "split_shape"], [f"{n}2"], name=f"{n}_split"),
            h.make_node("Transpose", [f"{n}2"], [f"{n}h"], name=f"{n}_heads", perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        h.make_node("MatMul", ["qh", "kh"], ["s0"], name="qk"),
        h.make_node("Mul", ["s0", "scale"], ["s1"], name="qk_scale"),
        h.make_node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
        h.make_node("MatMul", ["p", "vh"], ["o0"], name="pv"),
        h.make_node("Transpose", ["o0"], ["o1"], name="merge_heads", perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["o1", "merge_shape"], ["o2"], name="merge"),
        h.make_node("MatMul", ["o2", "wo"], ["o3"], name="o_proj"),
        h.make_node("Add", ["o3", "bo"], ["o4"], name="o_bias"),
        h.make_node("Add", ["o4", "x"], ["y"], name="residual"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", seq, d])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", seq, d])],
        inits,
    )


def inputs_for(model: onnx.ModelProto, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.dim_value else n for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(dims).astype(np.float32)
    return out
