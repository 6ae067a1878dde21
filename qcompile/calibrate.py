"""Bounded-memory statistics and format-aware range selection (pure numpy: the data arrive from
`qcompile.statistics`, which streams them out of the backend's sessions).

The float graph is instrumented once (the values to calibrate become extra outputs), calibration
batches stream through one onnxruntime session, and each value keeps only a `Histogram`: exact
running min/max plus a fixed number of bins over a symmetric power-of-two range [-R, R]. When a
batch exceeds R, R doubles and adjacent bin pairs merge (bin edges stay aligned, so merging is
exact). Peak memory is therefore O(values x bins + one batch), independent of the sample count.

Range selection from a histogram (`choose_clip`):
- minmax:     [min, max].
- percentile: the (p, 1-p) quantiles, p = (100 - percentile)/100 / 2 (symmetric: |x| quantile).
- entropy:    TensorRT's KL-divergence threshold on the |x| histogram (2**(bits-1) levels).
- mse:        the clip minimising E[(x - Q(x))^2] where Q is the *target format's* quantizer
              (INT grid with zero point, or the FP8/minifloat grid scaled by clip/max), with every
              bin represented by its centre. An FP8 grid is not an INT8 grid: for E4M3 the optimum
              is usually no clipping at all, for INT8 a clip of ~3-4 sigma.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import numpy as np

from qcompile import codec
from qcompile.formats import BlockFormat, FloatFormat, IntFormat, parse_format

log = logging.getLogger(__name__)

DEFAULT_BINS = 1 << 14
PERCENTILE = 99.999


@dataclass
class Histogram:
    """Streaming histogram over [-R, R] with R a power of two; `bins` even and fixed."""

    bins: int = DEFAULT_BINS
    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    radius: float = 0.0
    counts: np.ndarray = field(default=None, repr=False)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf present (min/max propagate them): drop those
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.size
        amax = max(abs(lo), abs(hi), 1e-30)
        if self.counts is None:
            self.radius = float(2.0 ** np.ceil(np.log2(amax)))
            self.counts = np.zeros(self.bins, dtype=np.int64)
        while amax > self.radius:
            self._double()
        _add_bin_counts(self.counts, x, self.radius)

    def _double(self) -> None:
        """[-R, R] -> [-2R, 2R]: old bin pairs merge into the central half of the new bins."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros_like(self.counts)
        q = self.bins // 4
        self.counts[q : q + merged.size] = merged
        self.radius *= 2

    def merge(self, other: Histogram) -> None:
        if other.counts is None:
            return
        if self.counts is None:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return
        other = Histogram(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
        while self.radius < other.radius:
            self._double()
        while other.radius < self.radius:
            other._double()
        self.counts += other.counts
        self.lo, self.hi, self.count = min(self.lo, other.lo), max(self.hi, other.hi), self.count + other.count

    @property
    def centers(self) -> np.ndarray:
        w = 2 * self.radius / self.bins
        return (-self.radius + w * (np.arange(self.bins) + 0.5)).astype(np.float64)


try:  # the optional C accelerator (setup.py), a leaf module importing nothing of qcompile (by name:
    # import-linter, which sees no source, would read `from qcompile._histogram` as an import of the
    # whole package); without it, numpy gives the same counts
    _add_counts = importlib.import_module("qcompile._histogram").add_counts
except ImportError:  # pragma: no cover - a build without a C compiler
    _add_counts = None


def _add_bin_counts(counts: np.ndarray, x: np.ndarray, radius: float, native: bool = True) -> None:
    """counts += np.histogram(x, counts.size, (-radius, radius))[0] for finite float32 |x| <=
    radius, exactly and ~3x faster (~6x with the C accelerator, `qcompile/_histogram.c`, which
    computes the same float32 arithmetic): the bin width w = 2 radius / bins is a power of two, so
    x / w is exact in float32 (barring a subnormal x that underflows) and the bin is
    floor(x / w) + bins / 2 (x = radius goes to the last bin, as in np.histogram)."""
    bins = counts.size
    k = np.float32(bins / (2 * radius))
    if native and _add_counts is not None:
        _add_counts(np.ascontiguousarray(x, dtype=np.float32), counts, k)
        return
    q = x * k
    np.floor(q, out=q)
    idx = q.astype(np.intp)
    idx += bins // 2
    np.minimum(idx, bins - 1, out=idx)
    counts += np.bincount(idx, minlength=bins)


def qparams_from_clip(lo: float, hi: float, fmt: IntFormat | FloatFormat, symmetric: bool) -> tuple[float, float]:
    """(scale, zero_point) that map [lo, hi] onto the format.

    INT symmetric:  s = max(|lo|,|hi|) / qmax, zp = 0.
    INT affine:     [lo, hi] is widened to contain 0; s = (hi - lo)/(qmax - qmin),
                    zp = round(qmin - lo/s) (so 0 is exactly representable).
    Float formats:  s = max(|lo|,|hi|) / fmt.max, zp = 0 (float grids are symmetric).
    """
    if isinstance(fmt, FloatFormat):
        amax = max(abs(lo), abs(hi))
        return (amax / fmt.max if amax > 0 else 1.0), 0.0
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return (amax / fmt.qmax if amax > 0 else 1.0), 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return 1.0, 0.0
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    zp = float(np.clip(np.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax))
    return scale, zp


def fake_quant(x: np.ndarray, scale, zero_point, fmt: IntFormat | FloatFormat) -> np.ndarray:
    """Q then DQ with broadcastable scale/zero point, in float64 for cost evaluation."""
    if isinstance(fmt, FloatFormat):
        return codec.round_to_grid(x / scale, fmt).astype(np.float64) * scale
    q = np.clip(np.round(x / scale) + zero_point, fmt.qmin, fmt.qmax)
    return (q - zero_point) * scale


def simulate(x: np.ndarray, spec) -> np.ndarray:
    """The float32 values the compiled model computes for activation `x` quantized with `spec`
    (bit-exact with the emitted QuantizeLinear/DequantizeLinear, Cast lowering or qcompile op).

    Scalar formats: Q/DQ with the calibrated per-tensor scale. Block formats: per block along
    the spec's axis at run time (`codec.fake_quant`); NVFP4's tensor scale comes from the
    calibrated amax (static), its block scales from the data.
    """
    fmt = spec.fmt
    x = np.asarray(x, dtype=np.float32)
    if isinstance(fmt, BlockFormat):
        st = None
        if fmt.tensor_scale is not None:
            st = codec.tensor_scale_from_amax(max(abs(spec.clip[0]), abs(spec.clip[1])), fmt)
        return codec.fake_quant(x, fmt, spec.granularity.axis, st)
    s, zp = qparams_from_clip(spec.clip[0], spec.clip[1], fmt, spec.symmetric)
    if isinstance(fmt, FloatFormat):
        return codec.round_to_grid(x / np.float32(s), fmt) * np.float32(s)
    return codec.dequantize_int(codec.quantize_int(x, np.float32(s), np.int64(zp), fmt), np.float32(s), np.int64(zp))


def _weighted_centers(h: Histogram) -> tuple[np.ndarray, np.ndarray]:
    keep = h.counts > 0
    return h.centers[keep], h.counts[keep].astype(np.float64)


def qparams_from_clips(lo: np.ndarray, hi: np.ndarray, fmt: IntFormat | FloatFormat,
                       symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """`qparams_from_clip` of many clips at once: the same float64 arithmetic, element by element."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if isinstance(fmt, FloatFormat) or symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        top = fmt.max if isinstance(fmt, FloatFormat) else fmt.qmax
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(amax > 0, amax / top, 1.0), np.zeros_like(amax)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    empty = hi - lo <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(empty, 1.0, (hi - lo) / (fmt.qmax - fmt.qmin))
        zp = np.where(empty, 0.0, np.clip(np.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax))
    return scale, zp


def _hist_errors(c: np.ndarray, w: np.ndarray, lo, hi, fmt, symmetric: bool) -> np.ndarray:
    """sum_i w_i (c_i - Q(c_i))^2 for each quantizer of [lo_k, hi_k] (arrays of candidates), the
    quantizer arithmetic of `qparams_from_clip` / `fake_quant` vectorized over candidates. Each
    candidate's sum is reduced on its own row exactly as a single evaluation would (np.dot for
    float grids, a plain pairwise sum for INT), so the search picks the same clip as one call per
    candidate did."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, np.float64), np.asarray(hi, np.float64))
    s, zp = qparams_from_clips(lo, hi, fmt, symmetric)
    s, zp = s[:, None], zp[:, None]
    if isinstance(fmt, FloatFormat):
        d = c[None, :] - fake_quant(c[None, :], s, zp, fmt)
        d **= 2
        return np.array([float(np.dot(w, row)) for row in d])
    q = c[None, :] / s
    np.round(q, out=q)
    q += zp
    np.clip(q, fmt.qmin, fmt.qmax, out=q)
    q -= zp
    q *= s
    q -= c[None, :]
    np.square(q, out=q)
    np.multiply(q, w[None, :], out=q)
    # per-row sums, not a BLAS product: multithreaded BLAS takes milliseconds for this size when
    # the cores are busy; a C-contiguous row reduced along axis 1 is summed exactly as row.sum()
    # (numpy's pairwise inner loop), so a row's sum is the one a single evaluation computes
    return q.sum(axis=1)


def _argmin_refined(costs, top: float) -> float:
    """argmin of cost(t) over t in (0, top]: 48 geometric points over 4 decades (21% apart), then
    24 linear points in the bracket around the best (a relative resolution of ~2%). `costs` maps
    an array of t to their costs."""
    grid = np.geomspace(top * 1e-4, top, 48)
    i = int(np.argmin(costs(grid)))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)], 24)
    return float(fine[int(np.argmin(costs(fine)))])


def _mse_symmetric(h: Histogram, fmt, lo: float, hi: float) -> tuple[float, float]:
    """The symmetric clip t minimising the histogram's squared error (symmetric INT or float formats)."""
    c, w = _weighted_centers(h)
    amax = max(abs(lo), abs(hi))
    if amax == 0:  # an all-zero value (a fully masked attention score): nothing to search
        return float(lo), float(hi)
    t = _argmin_refined(lambda t: _hist_errors(c, w, -t, t, fmt, True), amax)
    return float(max(lo, -t)), float(min(hi, t))


def _mse_affine(h: Histogram, fmt: IntFormat, lo: float, hi: float) -> tuple[float, float]:
    """Affine INT: coordinate descent on the two ends (each a refined 1-D search), two rounds."""
    c, w = _weighted_centers(h)
    a, b = min(lo, 0.0), max(hi, 0.0)
    for _ in range(2):
        if b > 0:
            b = _argmin_refined(lambda t: _hist_errors(c, w, a, t, fmt, False), max(hi, 0.0))
        if a < 0:
            a = -_argmin_refined(lambda t: _hist_errors(c, w, -t, b, fmt, False), -min(lo, 0.0))
    return float(a), float(b)


def _entropy_threshold(h: Histogram, levels: int) -> float:
    """TensorRT KL calibration on the |x| histogram.

    For each candidate threshold bin i: P = |x| bins [0, i) with the outlier mass added to bin
    i-1; Q = the same bins requantised to `levels` chunks (each chunk's mass spread evenly over its
    non-empty bins). The threshold minimising KL(P || Q) wins.
    """
    half = h.bins // 2
    absc = h.counts[half:].astype(np.float64) + h.counts[:half][::-1]
    width = h.radius / absc.size
    nz = np.nonzero(absc)[0]
    if nz.size == 0:
        return 0.0
    last = int(nz[-1]) + 1
    if last <= levels:
        return last * width
    best, best_i = np.inf, last
    for i in np.unique(np.linspace(levels, last, 256).astype(int)):
        p = absc[:i].copy()
        p[i - 1] += absc[i:].sum()
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        chunk = np.repeat(np.arange(starts.size), np.diff(np.append(starts, i)))
        nonempty = (absc[:i] > 0).astype(np.float64)
        mass = np.add.reduceat(absc[:i], starts)
        count = np.add.reduceat(nonempty, starts)
        q = np.where(nonempty > 0, (mass / np.maximum(count, 1))[chunk], 0.0)
        mask = p > 0
        pn = p[mask] / p.sum()
        qn = np.maximum(q[mask], 1e-12) / max(q.sum(), 1e-12)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, int(i)
    return best_i * width


def choose_clip(h: Histogram, fmt_name: str, symmetric: bool, method: str) -> tuple[float, float]:
    """The (lo, hi) range to quantize a value with, from its histogram (see the module doc)."""
    if h.counts is None:
        return 0.0, 0.0
    fmt = parse_format(fmt_name)
    lo, hi = h.lo, h.hi
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        cdf = np.cumsum(h.counts) / h.count
        p = (100.0 - PERCENTILE) / 100.0 / 2
        c = h.centers
        qlo = float(c[np.searchsorted(cdf, p)])
        qhi = float(c[min(np.searchsorted(cdf, 1 - p), h.bins - 1)])
        if symmetric:
            t = max(abs(qlo), abs(qhi))
            return max(lo, -t), min(hi, t)
        return max(lo, qlo), min(hi, qhi)
    if method == "entropy":
        bits = fmt.bits if isinstance(fmt, IntFormat) else 8
        levels = 2 ** (bits if (lo >= 0 and not symmetric) else bits - 1)
        t = _entropy_threshold(h, levels)
        return max(lo, -t), min(hi, t)
    if method == "mse":
        if isinstance(fmt, IntFormat) and not symmetric:
            return _mse_affine(h, fmt, lo, hi)
        return _mse_symmetric(h, fmt, lo, hi)
    raise ValueError(f"unknown calibration method {method!r}")
