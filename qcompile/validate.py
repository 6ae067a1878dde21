"""Validation: the compiled model against the float model on held-out inputs.

Both run in onnxruntime with its default optimizations (ENABLE_ALL, what users run), one after the
other: the float outputs are computed first and their session freed (`reference_outputs`), so peak
memory is the larger of the two models' sessions, not their sum. Metrics are accumulated per output:
- SQNR dB = 10 log10(sum ref^2 / sum (ref - out)^2) over all samples,
- cosine per sample (flattened), mean and min,
- max abs error,
- top-1 agreement when the output looks like class scores (rank 2, >= 2 columns, produced by a
  linear/softmax-like op), plus mean softmax KL(float || compiled).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile import external
from qcompile.backends.onnxruntime.session import compile_threads, make_session
from qcompile.data import Dataset

SCORE_PRODUCERS = {"Gemm", "MatMul", "Add", "Softmax", "LogSoftmax", "Sigmoid", "Flatten", "Reshape", "Squeeze"}


@dataclass
class OutputStats:
    signal: float = 0.0
    noise: float = 0.0
    cos: list = field(default_factory=list)
    max_abs: float = 0.0
    agree: int = 0
    kl: float = 0.0
    n: int = 0
    scores: bool = False

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        self.signal += float(np.sum(ref64**2))
        self.noise += float(np.sum((ref64 - out64) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(ref64 - out64))) if ref.size else 0.0)
        if ref.ndim == 0:
            ref64, out64 = ref64.reshape(1, 1), out64.reshape(1, 1)
        a, b = ref64.reshape(ref64.shape[0], -1), out64.reshape(out64.shape[0], -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.where(denom > 0, denom, 1), 1.0)
        self.cos.extend(cos.tolist())
        if self.scores:
            self.agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            p, q = _softmax(a), _softmax(b)
            self.kl += float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))
        self.n += a.shape[0]

    def summary(self) -> dict:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        d = {
            "sqnr_db": round(float(sqnr), 3),
            "cosine_mean": round(float(np.mean(self.cos)), 6) if self.cos else None,
            "cosine_min": round(float(np.min(self.cos)), 6) if self.cos else None,
            "max_abs_err": float(self.max_abs),
            "samples": self.n,
        }
        if self.scores:
            d["top1_agreement"] = round(self.agree / max(self.n, 1), 6)
            d["softmax_kl"] = self.kl / max(self.n, 1)
        return d


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def looks_like_scores(value: ir.Value) -> bool:
    shape = value.shape
    p = value.producer()
    return (
        shape is not None and len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] < 2)
        and p is not None and p.op_type in SCORE_PRODUCERS
    )


def reference_outputs(float_model: ir.Model, names: list[str], data: Dataset, batch_size: int = 8,
                      float_session=None) -> list[list[np.ndarray]]:
    """The float model's `names` outputs on every batch of `data`, from one session that is freed
    before returning (so a compiled model's session never coexists with a large float model's).

    Holds the outputs of the whole (held-out) data set: len(data) x the outputs' size. A large
    float model runs without prepacking (`external.prepack`: same results, half the memory).
    """
    sess = float_session or make_session(float_model, level="all", prepack=external.prepack(float_model))
    return [[np.asarray(r) for r in sess.run(names, batch)] for batch in data.batches(batch_size)]


def compare(float_model: ir.Model, compiled: ir.Model, data: Dataset, batch_size: int = 8,
            float_session=None, reference: list[list[np.ndarray]] | None = None, session=None) -> dict[str, dict]:
    """Per-output metrics of `compiled` against `float_model` on `data` (see module doc).

    `reference`: the float outputs of `output_names(float_model, compiled)` per batch
    (`reference_outputs`), computed here when not given; `session`: one of `compiled` already
    built (ENABLE_ALL, `compile_threads`), else made here."""
    names = output_names(float_model, compiled)
    stats = {v.name: OutputStats(scores=looks_like_scores(v)) for v in float_model.graph.outputs if v.name in names}
    if reference is None:
        reference = reference_outputs(float_model, names, data, batch_size, float_session)
    test_sess = session or make_session(compiled, level="all", threads=compile_threads())  # MLAS: the same results on any count
    for batch, refs in zip(data.batches(batch_size), reference, strict=True):
        outs = test_sess.run(names, batch)
        for name, r, o in zip(names, refs, outs):
            stats[name].update(np.asarray(r), np.asarray(o))
    return {name: s.summary() for name, s in stats.items()}


def output_names(float_model: ir.Model, compiled: ir.Model) -> list[str]:
    """The outputs both models have, in the float model's order."""
    have = {v.name for v in compiled.graph.outputs}
    return [v.name for v in float_model.graph.outputs if v.name in have]


def verdict(outputs: dict[str, dict], min_sqnr_db: float) -> dict:
    worst = min((m["sqnr_db"] for m in outputs.values()), default=float("inf"))
    return {"passed": bool(worst >= min_sqnr_db), "min_sqnr_db": min_sqnr_db, "worst_output_sqnr_db": worst}
