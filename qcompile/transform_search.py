"""Scoring a float-exact transform of one activation by the quantized error it leaves (pure numpy).

SmoothQuant's scales (`passes.smooth_quant.choose_scales`) and the rotation choice
(`passes.rotate.choose_rotations`) both pick, per activation x read by consumers c with weights
W_c, the transform T (x -> x T, W_c -> T^-1 W_c, exact in float) of least

    E(T) = sum_c || X W_c - Q_a(X T) Q_w(T^-1 W_c) ||^2

with the target's own activation quantizer Q_a (its clip fitted on other rows than it is scored
on) and weight quantizer Q_w. `Scorer` holds what every candidate shares: the sample rows split in
fit rows (even: the clip, the candidates' statistics) and test rows (every other odd row: a quarter,
which bounds the scoring MatMuls), the consumers' weights as [K, N] and the reference products.
"""
from __future__ import annotations

import numpy as np

from qcompile.calibrate import Histogram, choose_clip, fake_quant, qparams_from_clip, simulate
from qcompile.formats import BlockFormat
from qcompile.weights import dequantized

SEARCH_BINS = 1 << 11  # histogram bins of the search's activation clip (1024 fit rows: ~200 values a bin)
SEARCH_ELEMENTS = 1 << 22  # weights larger than this are searched on a subset of their output columns


def search_columns(w: np.ndarray) -> np.ndarray:
    """W [K, N] itself, or SEARCH_ELEMENTS // K evenly spaced columns of it when W is larger.

    A column's quantized values depend only on that column for per-output-channel and
    K-blocked weights, so the search's error on the kept columns is their exact error: the sum
    over all N columns estimated from an even sample, at a bounded cost per candidate (each
    candidate quantizes the whole searched weight). Weights up to SEARCH_ELEMENTS (4.2M, e.g.
    2048 x 2048; every MatMul of MiniLM-L6) are searched whole.
    """
    k, n = w.shape
    if k * n <= SEARCH_ELEMENTS:
        return w
    keep = max(1, SEARCH_ELEMENTS // k)
    return np.ascontiguousarray(w[:, np.linspace(0, n - 1, keep).round().astype(np.int64)])


class Scorer:
    """E(T) of the module doc for one activation: `rows` [R, K] of it, `ws` the consumers' weights
    as [K, N] (`search_columns`), `aspec` the activation's spec, `wspecs` the weights' specs, and
    `transposed` per consumer (a Gemm with transB quantizes W^T, its stored form)."""

    def __init__(self, rows: np.ndarray, ws: list[np.ndarray], aspec, wspecs: list, transposed: list[bool]) -> None:
        self.fit, self.test = rows[0::2].astype(np.float32), rows[1::4].astype(np.float32)
        self.ws, self.aspec, self.wspecs, self.transposed = ws, aspec, wspecs, transposed
        self.refs = [self.test @ w for w in ws]

    def quantize_activation(self, fit: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Q_a(test) with the clip chosen on `fit` (a block format: per block at run time, NVFP4's
        tensor scale from the fit rows' range), float32."""
        a = self.aspec
        if isinstance(a.fmt, BlockFormat):
            import dataclasses

            return simulate(test, dataclasses.replace(a, clip=(float(fit.min()), float(fit.max()))))
        h = Histogram(bins=SEARCH_BINS)
        h.update(fit)
        sc, zp = qparams_from_clip(*choose_clip(h, a.format, a.symmetric, a.method), a.fmt, a.symmetric)
        return fake_quant(test, sc, zp, a.fmt).astype(np.float32)

    def error(self, fit: np.ndarray, test: np.ndarray, ws: list[np.ndarray]) -> float:
        """sum_c ||refs_c - Q_a(test) Q_w(ws_c)||^2 for transformed rows `fit`, `test` and weights `ws`."""
        xq = self.quantize_activation(fit, test)
        err = 0.0
        for w, ref, spec, t in zip(ws, self.refs, self.wspecs, self.transposed):
            q = dequantized(w.T if t else w, spec)
            d = xq @ (q.T if t else q)
            np.subtract(ref, d, out=d)
            err += float(np.sum(np.square(d, out=d)))
        return err
