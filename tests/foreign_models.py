"""Foreign-shaped test models: built the way users' exporters build them (TorchScript export of
scripted control flow, onnxruntime's float16 converter, onnx.helper for Scan and local functions),
not shaped around what qcompile handles. Each builder writes `path` and returns it; seeded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OPSET = 20  # the newest opset torch's TorchScript exporter writes


def _torch_export(module, args, path: Path, **kw) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False, **kw)
    return path


def vad(path: Path) -> Path:
    """A voice-activity-style model (the shape of Silero VAD): `if sr == 16000` picks one of two
    branches, each an STFT-like strided Conv1d, two Conv1d + ReLU, an LSTM over the frames and a
    Linear + Sigmoid head; the recurrent state [2, 1, batch, 64] goes in and out.

    Inputs: input [batch, samples] float, state [2, 1, batch, 64] float, sr int64 scalar.
    Outputs: prob [batch, 1], stateN [2, 1, batch, 64]."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Branch(nn.Module):
        def __init__(self, hop: int):
            super().__init__()
            self.stft = nn.Conv1d(1, 32, kernel_size=2 * hop, stride=hop, bias=False)
            self.enc1 = nn.Conv1d(32, 32, 3, padding=1)
            self.enc2 = nn.Conv1d(32, 64, 3, stride=2, padding=1)
            self.lstm = nn.LSTM(64, 64, batch_first=True)
            self.out = nn.Linear(64, 1)

        def forward(self, x, h0, c0):
            y = torch.relu(self.enc2(torch.relu(self.enc1(self.stft(x.unsqueeze(1))))))
            y, (h1, c1) = self.lstm(y.transpose(1, 2), (h0, c0))
            return torch.sigmoid(self.out(y)).mean(dim=1), torch.stack([h1, c1])

    class VAD(nn.Module):
        def __init__(self):
            super().__init__()
            self.b16, self.b8 = Branch(16), Branch(8)

        def forward(self, x, state, sr):
            if bool(sr == 16000):
                p, s = self.b16(x, state[0], state[1])
            else:
                p, s = self.b8(x, state[0], state[1])
            return p, s

    model = torch.jit.script(VAD().eval())
    args = (torch.randn(1, 512), torch.zeros(2, 1, 1, 64), torch.tensor(16000))
    return _torch_export(model, args, path, input_names=["input", "state", "sr"], output_names=["prob", "stateN"],
                         dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {2: "batch"}})


def vad_data(n: int, seed: int, srs=(8000, 16000)) -> dict[str, np.ndarray]:
    """n samples for `vad`: one 512-sample chunk each (rows along the batch axis), a state per
    sample (rows: [n, 2, 1, 64] along the state's batch axis 2) and a sampling rate per sample."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    tone = np.sin(2 * np.pi * rng.uniform(100, 2000, (n, 1)) * t) * rng.uniform(0, 1, (n, 1))
    return {"input": (tone + 0.1 * rng.standard_normal((n, 512))).astype(np.float32),
            "state": (0.5 * rng.standard_normal((n, 2, 1, 64))).astype(np.float32),
            "sr": rng.choice(np.array(srs, dtype=np.int64), n)}


def float16(src: Path, path: Path, keep_io_types: bool) -> Path:
    """`src` through onnxruntime's float16 converter (what users run to halve a model)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types), str(path))
    return path


def loop_rnn(path: Path) -> Path:
    """A scripted Elman RNN: `for t in range(x.size(1))` becomes an ONNX Loop whose body holds the
    input Gemm and the recurrent MatMul; a Linear head after it. x [batch, time, 16] -> y [batch, 4]."""
    import torch
    from torch import nn

    torch.manual_seed(1)

    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.out = nn.Linear(16, 32), nn.Linear(32, 32, bias=False), nn.Linear(32, 4)

        def forward(self, x):
            h = torch.zeros(x.size(0), 32)
            for t in range(x.size(1)):
                h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            return self.out(h)

    return _torch_export(torch.jit.script(RNN().eval()), (torch.randn(2, 5, 16),), path, input_names=["x"],
                         output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "time"}})


def scan_rnn(path: Path, seed: int = 2) -> Path:
    """An Elman RNN as an ONNX Scan over x [time, 16] (batch 1 per step): the body computes
    h' = Tanh(MatMul(x_t, Wx) + MatMul(h, Wh) + b), both weights body-local constants; y = h_T Wo."""
    rng = np.random.default_rng(seed)
    wx, wh = rng.standard_normal((16, 32)) / 4, rng.standard_normal((32, 32)) / np.sqrt(32)
    wo, b = rng.standard_normal((32, 4)) / np.sqrt(32), 0.1 * rng.standard_normal(32)
    f32 = lambda a, n: nh.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    body = h.make_graph(
        [h.make_node("Unsqueeze", ["x_t", "axes0"], ["x_row"], name="body_unsqueeze"),
         h.make_node("MatMul", ["x_row", "Wx"], ["a"], name="body_mm_x"),
         h.make_node("MatMul", ["h_in", "Wh"], ["r"], name="body_mm_h"),
         h.make_node("Add", ["a", "r"], ["s0"], name="body_add"), h.make_node("Add", ["s0", "b"], ["s"], name="body_bias"),
         h.make_node("Tanh", ["s"], ["h_out"], name="body_tanh"), h.make_node("Identity", ["h_out"], ["h_scan"], name="body_id")],
        "scan_body",
        [h.make_tensor_value_info("h_in", T.FLOAT, [1, 32]), h.make_tensor_value_info("x_t", T.FLOAT, [16])],
        [h.make_tensor_value_info("h_out", T.FLOAT, [1, 32]), h.make_tensor_value_info("h_scan", T.FLOAT, [1, 32])],
        [f32(wx, "Wx"), f32(wh, "Wh"), f32(b, "b"), nh.from_array(np.array([0], np.int64), "axes0")])
    g = h.make_graph(
        [h.make_node("Scan", ["h0", "x"], ["h_T", "hs"], name="scan", num_scan_inputs=1, body=body),
         h.make_node("MatMul", ["h_T", "Wo"], ["y"], name="head")],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["time", 16])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
        [f32(np.zeros((1, 32)), "h0"), f32(wo, "Wo")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def local_function_mlp(path: Path, seed: int = 3) -> Path:
    """An MLP whose layers are calls of a model-local function `local.Dense(x, W, b) = Relu(MatMul(x, W) + b)`
    (the weights are initializers passed to each call), as exporters write repeated blocks."""
    rng = np.random.default_rng(seed)
    dense = h.make_function(
        "local", "Dense", ["x", "W", "b"], ["y"],
        [h.make_node("MatMul", ["x", "W"], ["xw"]), h.make_node("Add", ["xw", "b"], ["z"]), h.make_node("Relu", ["z"], ["y"])],
        opset_imports=[h.make_opsetid("", 21)])
    w = [rng.standard_normal((32, 64)) / np.sqrt(32), rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 10)) / 8]
    inits = [nh.from_array(np.asarray(a, np.float32), f"W{i}") for i, a in enumerate(w)]
    inits += [nh.from_array((0.1 * rng.standard_normal(a.shape[1])).astype(np.float32), f"b{i}") for i, a in enumerate(w)]
    g = h.make_graph(
        [h.make_node("Dense", ["x", "W0", "b0"], ["h0"], domain="local", name="layer0"),
         h.make_node("Dense", ["h0", "W1", "b1"], ["h1"], domain="local", name="layer1"),
         h.make_node("MatMul", ["h1", "W2"], ["m2"], name="head"), h.make_node("Add", ["m2", "b2"], ["logits"], name="head_bias")],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])], [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("local", 1)], functions=[dense], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def bf16_mlp(path: Path, seed: int = 4) -> tuple[Path, onnx.ModelProto]:
    """A bfloat16 MLP (bf16 I/O, weights and compute), and the float32 model it was rounded from."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((64, 128)) / 8, rng.standard_normal((128, 10)) / np.sqrt(128)
    b1 = 0.1 * rng.standard_normal(128)

    def build(dtype, np_dtype):
        g = h.make_graph(
            [h.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), h.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             h.make_node("Relu", ["h1"], ["h2"], name="relu"), h.make_node("MatMul", ["h2", "w2"], ["logits"], name="fc2")],
            "g", [h.make_tensor_value_info("x", dtype, ["N", 64])], [h.make_tensor_value_info("logits", dtype, ["N", 10])],
            [nh.from_array(np.asarray(a).astype(np_dtype), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)

    bf = build(T.BFLOAT16, ml_dtypes.bfloat16)
    onnx.save(bf, str(path))
    # the float32 reference holds the bf16-rounded weights (onnxruntime's CPU provider has no bf16 MatMul to run `bf`)
    ref = build(T.FLOAT, np.float32)
    for t, src in zip(ref.graph.initializer, bf.graph.initializer):
        t.CopyFrom(nh.from_array(nh.to_array(src).astype(np.float32), t.name))
    return path, ref


# --- old and odd exports (onnx.helper, the shapes older exporters wrote) --------------------------------
def _f32(a, name: str) -> onnx.TensorProto:
    return nh.from_array(np.asarray(a, np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int, ir_version: int, inits_as_inputs: bool) -> onnx.ModelProto:
    """A checked model; with `inits_as_inputs` every initializer is also a graph input (IR 3 requires
    it; exporters of that time wrote the weights as overridable inputs)."""
    if inits_as_inputs:
        inputs = inputs + [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=ir_version, producer_name="foreign")
    onnx.checker.check_model(m, full_check=True)
    return m


def classic_cnn(path: Path, opset: int = 9, ir_version: int = 3, seed: int = 5) -> Path:
    """A CNN as classic exporters wrote it (opset <= 9, IR 3): every initializer also a graph input,
    unfused Conv -> BatchNormalization -> Relu, MaxPool, Upsample(scales input), an unnamed node and
    two nodes sharing a name, an unused initializer, Unsqueeze/Squeeze with `axes` attributes,
    GlobalAveragePool -> Flatten -> Gemm -> Softmax. x [1, 3, 16, 16] -> prob [1, 10]."""
    rng = np.random.default_rng(seed)
    inits = [_f32(rng.standard_normal((16, 3, 3, 3)) / 4, "conv1.W"), _f32(0.1 * rng.standard_normal(16), "conv1.b"),
             _f32(rng.standard_normal((32, 16, 3, 3)) / 12, "conv2.W")]
    for name, c in (("bn1", 16), ("bn2", 32)):
        inits += [_f32(rng.uniform(0.5, 1.5, c), f"{name}.scale"), _f32(0.1 * rng.standard_normal(c), f"{name}.bias"),
                  _f32(0.1 * rng.standard_normal(c), f"{name}.mean"), _f32(rng.uniform(0.5, 2, c), f"{name}.var")]
    inits += [_f32(rng.standard_normal((10, 32)) / 6, "fc.W"), _f32(0.1 * rng.standard_normal(10), "fc.b"),
              _f32(rng.standard_normal(7), "unused")] + ([_f32([1, 1, 2, 2], "up.scales")] if opset >= 9 else [])
    bn = lambda x, y, p: h.make_node("BatchNormalization", [x, f"{p}.scale", f"{p}.bias", f"{p}.mean", f"{p}.var"], [y],  # noqa: E731
                                     name=p, epsilon=1e-5)
    nodes = [h.make_node("Conv", ["x", "conv1.W", "conv1.b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), bn("c1", "b1", "bn1"),
             h.make_node("Relu", ["b1"], ["r1"]),  # unnamed
             h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             (h.make_node("Upsample", ["p1", "up.scales"], ["u1"], mode="nearest", name="pool") if opset >= 9  # duplicate name
              else h.make_node("Upsample", ["p1"], ["u1"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0], name="pool")),
             h.make_node("Conv", ["u1", "conv2.W"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"), bn("c2", "b2", "bn2"),
             h.make_node("Relu", ["b2"], ["r2"], name="relu2"),
             h.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             h.make_node("Squeeze", ["g"], ["sq"], axes=[2, 3], name="squeeze"),
             h.make_node("Unsqueeze", ["sq"], ["us"], axes=[2], name="unsqueeze"),
             h.make_node("Flatten", ["us"], ["f"], axis=1, name="flatten"),
             h.make_node("Gemm", ["f", "fc.W", "fc.b"], ["logits"], transB=1, name="fc"),
             h.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])], [h.make_tensor_value_info("prob", T.FLOAT, [1, 10])],
               inits, opset, ir_version, inits_as_inputs=ir_version < 4)
    onnx.save(m, str(path))
    return path


def reduce_attr_encoder(path: Path, opset: int = 17, seed: int = 6) -> Path:
    """A transformer block as a TorchScript exporter writes it at `opset` (< 18): LayerNorm decomposed
    into ReduceMean(axes attribute) / Sub / Pow / Sqrt / Div, a masked attention with the mask made by
    Unsqueeze (an `axes` attribute below opset 13, an input from 13), MatMul + Add projections, and an
    L2-normalized mean pooling with ReduceL2(axes attribute). x [batch, 8, 32], mask [batch, 8] -> y [batch, 32]."""
    rng = np.random.default_rng(seed)
    d = 32
    inits = [_f32(rng.standard_normal((d, d)) / np.sqrt(d), n) for n in ("Wq", "Wk", "Wv", "Wo")]
    inits += [_f32(rng.standard_normal((d, 64)) / np.sqrt(d), "W1"), _f32(rng.standard_normal((64, d)) / 8, "W2"),
              _f32(0.1 * rng.standard_normal(64), "b1"), _f32(rng.uniform(0.5, 1.5, d), "gamma"), _f32(0.1 * rng.standard_normal(d), "beta"),
              _f32(1e-5, "eps"), _f32(2.0, "two"), _f32(1 / np.sqrt(d), "inv_sqrt_d"), _f32(-1e4, "neg"), _f32(1.0, "one")]
    axes_attr = opset < 13
    unsq = lambda x, y, axes, name: (h.make_node("Unsqueeze", [x], [y], axes=axes, name=name) if axes_attr  # noqa: E731
                                    else h.make_node("Unsqueeze", [x, f"{name}.axes"], [y], name=name))
    if not axes_attr:
        inits += [nh.from_array(np.array([1], np.int64), "unsq1.axes")]
    red = lambda op, x, y, name: h.make_node(op, [x], [y], axes=[-1], keepdims=1, name=name)  # noqa: E731
    nodes = [h.make_node("MatMul", ["x", w], [w.lower()], name=f"proj_{w}") for w in ("Wq", "Wk", "Wv")]
    nodes += [h.make_node("Transpose", ["wk"], ["kt"], perm=[0, 2, 1], name="kt"),
              h.make_node("MatMul", ["wq", "kt"], ["s0"], name="scores"), h.make_node("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
              h.make_node("Sub", ["one", "mask"], ["m0"], name="mask_inv"), h.make_node("Mul", ["m0", "neg"], ["m1"], name="mask_neg"),
              unsq("m1", "m2", [1], "unsq1"), h.make_node("Add", ["s1", "m2"], ["s2"], name="masked"),
              h.make_node("Softmax", ["s2"], ["p"], axis=2, name="softmax"), h.make_node("MatMul", ["p", "wv"], ["ctx"], name="ctx"),
              h.make_node("MatMul", ["ctx", "Wo"], ["att"], name="proj_Wo"), h.make_node("Add", ["x", "att"], ["h0"], name="res"),
              red("ReduceMean", "h0", "mu", "ln_mean"), h.make_node("Sub", ["h0", "mu"], ["dx"], name="ln_sub"),
              h.make_node("Pow", ["dx", "two"], ["dx2"], name="ln_pow"), red("ReduceMean", "dx2", "var", "ln_var"),
              h.make_node("Add", ["var", "eps"], ["ve"], name="ln_eps"), h.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
              h.make_node("Div", ["dx", "sd"], ["n0"], name="ln_div"), h.make_node("Mul", ["n0", "gamma"], ["n1"], name="ln_gamma"),
              h.make_node("Add", ["n1", "beta"], ["n2"], name="ln_beta"),
              h.make_node("MatMul", ["n2", "W1"], ["f0"], name="ffn1"), h.make_node("Add", ["f0", "b1"], ["f1"], name="ffn1_bias"),
              h.make_node("Relu", ["f1"], ["f2"], name="ffn_relu"), h.make_node("MatMul", ["f2", "W2"], ["f3"], name="ffn2"),
              h.make_node("Add", ["n2", "f3"], ["h1"], name="res2"),
              h.make_node("ReduceMean", ["h1"], ["pool"], axes=[1], keepdims=0, name="pool"),
              h.make_node("ReduceL2", ["pool"], ["l2"], axes=[-1], keepdims=1, name="l2"),
              h.make_node("Div", ["pool", "l2"], ["y"], name="normalize")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8, d]), h.make_tensor_value_info("mask", T.FLOAT, ["batch", 8])],
               [h.make_tensor_value_info("y", T.FLOAT, ["batch", d])], inits, opset, 8, inits_as_inputs=False)
    onnx.save(m, str(path))
    return path


def reduce_attr_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(8)[None, :] < rng.integers(3, 9, (n, 1))).astype(np.float32)
    return {"x": rng.standard_normal((n, 8, 32)).astype(np.float32), "mask": mask}


def paddle_style(path: Path, seed: int = 7) -> Path:
    """An opset-11 OCR-style backbone as Paddle's exporter writes it: every weight and shape a Constant
    node (no initializers), a BatchNormalization after a Conv and one after an Add (no Conv to fold into),
    Clip(x, min, max) with its bounds as inputs (the opset-11 form; ReLU6), Pad with a pads input,
    Resize with roi/scales inputs and a Gemm head. x [1, 3, 16, 16] -> y [1, 8]."""
    rng = np.random.default_rng(seed)

    def const(name, a, dtype=np.float32):
        return h.make_node("Constant", [], [name], value=nh.from_array(np.asarray(a, dtype), name + "_t"), name=name)

    c = 8
    consts = [const("w1", rng.standard_normal((c, 3, 3, 3)) / 4), const("w2", rng.standard_normal((c, c, 3, 3)) / 8),
              const("lo", 0.0), const("hi", 6.0), const("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
              const("roi", np.zeros(0)), const("scales", [1, 1, 0.5, 0.5]),
              const("fcw", rng.standard_normal((c, 8)) / 3), const("fcb", 0.1 * rng.standard_normal(8)),
              const("shape", [1, -1], np.int64)]
    for p in ("bn1", "bn2"):
        consts += [const(f"{p}_s", rng.uniform(0.5, 1.5, c)), const(f"{p}_b", 0.1 * rng.standard_normal(c)),
                   const(f"{p}_m", 0.1 * rng.standard_normal(c)), const(f"{p}_v", rng.uniform(0.5, 2, c))]
    bn = lambda x, y, p: h.make_node("BatchNormalization", [x, f"{p}_s", f"{p}_b", f"{p}_m", f"{p}_v"], [y], name=p)  # noqa: E731
    nodes = consts + [
        h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), bn("c1", "b1", "bn1"),
        h.make_node("Clip", ["b1", "lo", "hi"], ["r1"], name="relu6"),
        h.make_node("Pad", ["r1", "pads"], ["pd"], mode="reflect", name="pad"),
        h.make_node("Conv", ["pd", "w2"], ["c2"], name="conv2"),
        h.make_node("Add", ["c2", "r1"], ["a"], name="res"), bn("a", "b2", "bn2"),  # BatchNorm without a Conv
        h.make_node("Clip", ["b2", "lo", "hi"], ["r2"], name="relu6_2"),
        h.make_node("Resize", ["r2", "roi", "scales"], ["rs"], mode="linear", name="resize"),
        h.make_node("GlobalAveragePool", ["rs"], ["g"], name="gap"), h.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "fcw", "fcb"], ["y"], name="fc")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])], [h.make_tensor_value_info("y", T.FLOAT, [1, 8])],
               [], 11, 6, inits_as_inputs=False)
    onnx.save(m, str(path))
    return path


def initializers_as_inputs(proto: onnx.ModelProto, ir_version: int = 3) -> onnx.ModelProto:
    """`proto` (copied) with every initializer also listed as a graph input, at `ir_version`."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m.ir_version = ir_version
    m.graph.input.extend([h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer])
    onnx.checker.check_model(m)
    return m
