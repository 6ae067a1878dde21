"""A small Llama-architecture decoder with random weights, as one self-contained ONNX file.

The model is ``transformers.LlamaForCausalLM`` built from :data:`CONFIG` (4 layers, hidden 512,
8 heads, SwiGLU MLP of 1408, RMSNorm, rotary attention, untied LM head, vocab 8192, 512
positions) with weights drawn by the transformers initialiser under ``torch.manual_seed(SEED)``,
except the RMSNorm weights, drawn ~N(1, 0.1) so that each norm has its own distinct weight.
Nothing is downloaded. The weights are random: the model is for speed and exactness tests (ONNX
vs torch, quantized vs float) only, never for quality claims.

Graph: ``input_ids``, ``attention_mask`` (int64, [batch, sequence]) -> the full prefill forward
pass (eager attention, so attention is plain MatMul/Softmax; no KV cache) -> ``logits``
(float32, [batch, sequence, 8192]). Exported with the torch.export-based exporter
(``dynamo=True``, opset 18) with the ~85 MB of weights as initializers in the one file, and
verified against the torch model on two shapes (max abs diff <= ``TOLERANCE``). Rebuilding with
the same torch/transformers versions gives the same bytes.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from qcompile.zoo import ZooBuildError, check_interface, export_token_model, require

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
OPSET = 18
TOLERANCE = 1e-4
SEED = 0
NORM_STD = 0.1  # RMSNorm weights ~N(1, NORM_STD), the other weights: transformers' initialiser
CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,  # ~ 4 * 512 * 2/3, rounded up to a multiple of 128
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    use_cache=False,
)
VOCAB = CONFIG["vocab_size"]
SPLITS = ("calib", "eval")
# Shapes (batch, sequence) of the tracing input and of the two verification runs.
TRACE_SHAPE = (2, 16)
VERIFY_SHAPES = ((1, 7), (3, 40))


def model():
    """The torch module that is exported: Llama forward pass returning the logits only."""
    require("torch", "transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    config = LlamaConfig(**CONFIG, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leaves the caller's RNG alone
        torch.manual_seed(SEED)
        lm = LlamaForCausalLM(config)
        # transformers initialises every RMSNorm weight to ones; the exporter would then share
        # one initializer between all the norms (identical constants are deduplicated) and a
        # norm weight of ones is a special case. Draw them ~N(1, NORM_STD) like a trained model.
        for name, module in lm.named_modules():
            if name.endswith("norm"):
                module.weight.normal_(1.0, NORM_STD)
    return Logits(lm).eval()


def feeds(batch: int, seq: int, seed: int, pad: bool = True) -> dict[str, np.ndarray]:
    """Random token ids (int64) and an attention mask; with ``pad``, row ``i`` of a batch of more
    than one sample is right-padded by ``i * seq // (2 * batch)`` tokens (mask 0, token id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad and batch > 1:
        for i in range(batch):
            n_pad = i * seq // (2 * batch)
            if n_pad:
                mask[i, seq - n_pad:] = 0
                ids[i, seq - n_pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def write_npz(path: str | Path, split: str, n: int, seq: int = 32, seed: int = 0) -> Path:
    """Write ``n`` random token sequences of length ``seq`` as an .npz keyed by graph input name.

    ``input_ids`` (uniform in [0, vocab)) and ``attention_mask`` (all ones), int64, shape [n, seq].
    Deterministic in (split, n, seq, seed); the splits use disjoint seed streams. Random tokens:
    for speed and exactness tests only, never for quality claims.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([SPLITS.index(split), seed])
    ids = rng.integers(0, VOCAB, size=(n, seq), dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a str path without it
        np.savez(f, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def export(path: Path, module=None) -> None:
    """Export :func:`model` (or ``module``) to ``path``; deterministic (see minilm.export)."""
    import torch

    module = model() if module is None else module
    args = tuple(torch.from_numpy(v) for v in feeds(*TRACE_SHAPE, seed=SEED).values())
    export_token_model(module, args, path, INPUTS, OUTPUT, OPSET)


def _check_structure(path: Path) -> dict:
    """onnx.checker plus the interface contract (names, dtypes, dynamic axes, versions)."""
    import onnx

    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    m, info = check_interface(path, [(name, i64, ["batch", "sequence"]) for name in INPUTS],
                              [(OUTPUT, f32, ["batch", "sequence", VOCAB])])
    missing = {"MatMul", "Softmax"} - {n.op_type for n in m.graph.node}
    if missing:
        raise ZooBuildError(f"expected eager attention ops, missing {sorted(missing)}")
    return info


def verify(path: Path, module=None) -> float:
    """Max abs diff of the logits between onnxruntime and torch on :data:`VERIFY_SHAPES`
    (padded batches, different batch and sequence sizes); raises ZooBuildError above
    ``TOLERANCE``."""
    import onnxruntime as ort
    import torch

    module = model() if module is None else module
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for i, shape in enumerate(VERIFY_SHAPES):
        feed = feeds(*shape, seed=SEED + 1 + i)
        got = session.run([OUTPUT], feed)[0]
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in feed.values())).numpy()
        if got.shape != want.shape or want.shape != (*shape, VOCAB):
            raise ZooBuildError(f"ONNX logits shape {got.shape} != torch {want.shape}")
        max_diff = max(max_diff, float(np.abs(got - want).max()))
    if not max_diff <= TOLERANCE:
        raise ZooBuildError(f"llama ONNX differs from torch: max abs diff {max_diff:.3g} > "
                            f"{TOLERANCE:g}")
    return max_diff


def build(path: Path) -> dict:
    """Export, check and verify the model at ``path``; return the build figures."""
    require("torch", "transformers")
    import torch
    import transformers

    path = Path(path)
    module = model()
    t0 = time.perf_counter()
    export(path, module)
    export_s = time.perf_counter() - t0
    info = _check_structure(path)
    t0 = time.perf_counter()
    max_diff = verify(path, module)
    return {
        "model": "random-init LlamaForCausalLM (speed/exactness tests only)",
        "config": CONFIG,
        "seed": SEED,
        "parameters": sum(p.numel() for p in module.parameters()),
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "export_seconds": round(export_s, 2),
        "verify_seconds": round(time.perf_counter() - t0, 2),
        "file_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "verify_shapes": [list(s) for s in VERIFY_SHAPES],
        **info,
    }
