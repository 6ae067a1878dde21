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
