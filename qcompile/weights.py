"""Offline weight quantization: scales per tensor, channel or block, then codes.

`quantize` is the entry point for every format and returns the stored form (`storage.PackedTensor`).
Block formats (OCP MX, NVFP4) follow their specification's scale rule (`codec.quantize_block`);
scalar formats (INT, FP8/FP6/FP4, any ExMy) use the rule below.

Symmetric only (zero point 0): s = clip / qmax for INT formats, clip / max for float formats,
where clip is the absolute maximum of each group (tensor, channel, or block of `size` along the
reduction axis) times a ratio r. method="minmax" takes r = 1; method="mse" searches r on a grid
per group and keeps the r that minimises the group's squared error ||w - DQ(Q(w))||^2.

Pair bound (`spec.pairs`, `plan.PairBound`): the integer kernels of x86 CPUs without VNNI add
the products of code pairs (q_2i, q_2i+1) in int16 with saturation. For an integer weight with a
pair bound B, every channel whose largest same-signed pair sum P = max |q_2i + q_2i+1| exceeds B
gets its scale multiplied by P / B (repeated until rounding agrees), so no pair can saturate;
channels that already fit keep their scale. `pair_sums` measures P.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile import codec, storage
from qcompile.calibrate import fake_quant
from qcompile.formats import BlockFormat, FloatFormat, IntFormat
from qcompile.plan import PairBound, PerBlock, PerChannel, PerTensor, QuantSpec

MSE_RATIOS = np.linspace(0.5, 1.0, 26)  # clip ratios tried (step 0.02)
LOW_BIT_RATIOS = np.linspace(0.2, 1.0, 41)  # 2- and 3-bit grids often want a clip below 0.5


@dataclass
class QuantizedWeight:
    """codes: integer or float codes in the format's numpy storage type, shaped like the weight.

    scale / zero_point: shaped for ONNX DequantizeLinear: scalar (per tensor), 1-D (per axis),
    or the weight shape with `axis` divided by `block_size` (blocked).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    block_size: int | None
    grown: int = 0  # channels whose scale the pair bound made larger (see the module doc)

    def dequantize(self) -> np.ndarray:
        s = codec.expand_param(self.scale, self.codes.shape, self.axis, self.block_size)
        q = self.codes.astype(np.float32)
        if self.zero_point is not None:
            q = q - codec.expand_param(self.zero_point, self.codes.shape, self.axis, self.block_size).astype(np.float32)
        return q * s


def _grouped_amax(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, int | None, int | None]:
    g = spec.granularity
    a = np.abs(w)
    if isinstance(g, PerTensor):
        return np.asarray(a.max(), dtype=np.float32), None, None
    axis = g.axis % w.ndim
    if isinstance(g, PerChannel):
        other = tuple(i for i in range(w.ndim) if i != axis)
        return a.max(axis=other).astype(np.float32), axis, None
    n = w.shape[axis]
    pad = (-n) % g.size
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        a = np.pad(a, widths)
    shape = list(a.shape)
    shape[axis : axis + 1] = [shape[axis] // g.size, g.size]
    return a.reshape(shape).max(axis=axis + 1).astype(np.float32), axis, g.size


def _fmt_top(fmt) -> float:
    return float(fmt.qmax) if isinstance(fmt, IntFormat) else float(fmt.max)


def _group_errors(w, amax, ratio, fmt, axis, block) -> np.ndarray:
    """Squared error of every group when its clip is `ratio` x amax."""
    s = np.where(amax > 0, amax * ratio / _fmt_top(fmt), 1.0).astype(np.float32)
    err = (w - fake_quant(w, codec.expand_param(s, w.shape, axis, block), 0.0, fmt)) ** 2
    if axis is None:
        return np.asarray(err.sum())
    if block is None:
        return err.sum(axis=tuple(i for i in range(w.ndim) if i != axis))
    pad = (-w.shape[axis]) % block
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        err = np.pad(err, widths)
    shape = list(err.shape)
    shape[axis : axis + 1] = [shape[axis] // block, block]
    return err.reshape(shape).sum(axis=axis + 1)


SEARCH_CHUNK = 1 << 22  # elements per slice of the MSE search (its float64 temporaries scale with it)


def _search_errors(w, amax, ratio, fmt, axis, block) -> np.ndarray:
    """`_group_errors`, computed over slices of at most ~SEARCH_CHUNK elements of w.

    Groups never straddle a slice: per channel, w is sliced along the channel axis itself; per
    block, along another axis (blocks run along `axis`). So the result is exactly the unsliced
    one, while the search's temporaries stay ~8 bytes x SEARCH_CHUNK instead of ~8x the weight.
    """
    if axis is None or w.size <= SEARCH_CHUNK or w.ndim < (1 if block is None else 2):
        return _group_errors(w, amax, ratio, fmt, axis, block)
    d = axis if block is None else max((i for i in range(w.ndim) if i != axis), key=lambda i: w.shape[i])
    step = max(1, SEARCH_CHUNK // (w.size // w.shape[d]))
    a_dim = 0 if block is None else d
    parts = []
    for j in range(0, w.shape[d], step):
        ws = np.take(w, np.arange(j, min(j + step, w.shape[d])), axis=d)
        am = np.take(amax, np.arange(j, min(j + step, w.shape[d])), axis=a_dim)
        parts.append(_group_errors(ws, am, ratio, fmt, axis, block))
    return np.concatenate(parts, axis=a_dim)


def quantize_weight(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Quantize a float weight with `spec` (symmetric; see the module doc)."""
    fmt = spec.fmt
    if not isinstance(fmt, (IntFormat, FloatFormat)):
        raise NotImplementedError(f"weight format {spec.format} needs the block-format lowering")
    w = np.asarray(w, dtype=np.float32)
    amax, axis, block = _grouped_amax(w, spec)
    ratio = np.ones_like(amax)
    if spec.method == "mse":
        best = np.full(amax.shape, np.inf)
        for r in LOW_BIT_RATIOS if fmt.bits <= 3 else MSE_RATIOS:
            e = _search_errors(w, amax, r, fmt, axis, block)
            better = e < best
            best = np.where(better, e, best)
            ratio = np.where(better, r, ratio)
    scale = np.where(amax > 0, amax * ratio / _fmt_top(fmt), 1.0).astype(np.float32)
    grown = 0
    if spec.pairs is not None and isinstance(fmt, IntFormat) and block is None:
        fitted = _fit_pairs(w, scale, fmt, spec.pairs, axis)
        grown, scale = int(np.sum(fitted != scale)), fitted
    full = codec.expand_param(scale, w.shape, axis, block)
    if isinstance(fmt, IntFormat):
        codes = _round_chunked(w, full, fmt, fmt.storage_dtype)
        zp = np.zeros(scale.shape, dtype=fmt.storage_dtype)
    else:
        codes = _round_chunked(w, full, fmt, fmt.ml_dtype)
        zp = None
    return QuantizedWeight(codes, scale, zp, axis, block, grown)


def _round_chunked(w: np.ndarray, full: np.ndarray, fmt, dtype) -> np.ndarray:
    """round_to_grid(w / full) cast to `dtype` (None: as rounded), elementwise over slices of
    ~SEARCH_CHUNK elements along axis 0 (the rounding's float64 temporaries stay small)."""
    if w.ndim == 0 or w.size <= SEARCH_CHUNK:
        r = codec.round_to_grid(w / full, fmt)
        return r.astype(dtype) if dtype is not None else r
    step = max(1, SEARCH_CHUNK // (w.size // w.shape[0]))
    full = np.broadcast_to(full, w.shape)
    parts = []
    for i in range(0, w.shape[0], step):
        r = codec.round_to_grid(w[i : i + step] / full[i : i + step], fmt)
        parts.append(r.astype(dtype) if dtype is not None else r)
    return np.concatenate(parts, axis=0)


def _pair_rows(q: np.ndarray, axis: int | None, channel: int) -> np.ndarray:
    """Codes as [channels, reduction] in the kernel's order (Conv: taps then input channel, the
    channel innermost); axis None: the channel's codes in any order."""
    if axis is None:
        return np.moveaxis(q, channel, 0).reshape(q.shape[channel], -1)
    r = np.moveaxis(q, axis, -1)
    r = np.moveaxis(r, channel if channel < axis else channel - 1, 0)
    return r.reshape(r.shape[0], -1)


def pair_channel_axis(w_ndim: int, pairs: PairBound, granularity) -> int:
    """The output-channel axis of a pair-bounded weight: the per-channel axis, else the axis the
    reduction is not (a 2-D weight), else 0 (Conv)."""
    if isinstance(granularity, PerChannel):
        return granularity.axis % w_ndim
    return 1 if pairs.axis == 0 else 0


def pair_sums(q: np.ndarray, pairs: PairBound, channel: int) -> np.ndarray:
    """Per output channel, the largest |q_a + q_b| over the same-signed code pairs the kernel adds:
    pairs (2i, 2i+1) of the reduction (see `_pair_rows`), or, for an unknown pairing (axis None),
    the two largest codes of each sign."""
    r = _pair_rows(np.asarray(q, dtype=np.int32), pairs.axis, channel)
    if pairs.axis is None:
        top = lambda a: np.sort(a, axis=1)[:, -2:].sum(axis=1) if a.shape[1] >= 2 else a.max(axis=1, initial=0)  # noqa: E731
        return np.maximum(top(np.maximum(r, 0)), top(np.maximum(-r, 0)))
    if r.shape[1] % 2:
        r = np.pad(r, ((0, 0), (0, 1)))
    a, b = r[:, 0::2], r[:, 1::2]
    return np.where(a * b > 0, np.abs(a + b), 0).max(axis=1, initial=0)


def _fit_pairs(w: np.ndarray, scale: np.ndarray, fmt: IntFormat, pairs: PairBound, axis: int | None) -> np.ndarray:
    """Grow the scale of each channel whose codes break the pair bound (see the module doc)."""
    channel = pair_channel_axis(w.ndim, pairs, PerChannel(axis) if axis is not None else PerTensor())
    for _ in range(64):
        q = codec.round_to_grid(w / codec.expand_param(scale, w.shape, axis, None), fmt)
        p = pair_sums(q, pairs, channel).astype(np.float64)
        if axis is None:
            p = p.max(initial=0)
        over = p > pairs.bound
        if not np.any(over):
            return scale
        scale = np.where(over, scale * (p / pairs.bound) * (1 + 1e-6), scale).astype(np.float32)
    raise AssertionError("pair bound not reached")  # P / B shrinks every step; unreachable


def quantize(w: np.ndarray, spec: QuantSpec) -> storage.PackedTensor:
    """Quantize a float weight with `spec`, any format, into its stored form."""
    fmt = spec.fmt
    w = np.asarray(w, dtype=np.float32)
    if isinstance(fmt, BlockFormat):
        g = spec.granularity
        if not isinstance(g, PerBlock) or g.size != fmt.block_size:
            raise ValueError(f"{spec.format} weights are blocked by {fmt.block_size} along the reduction axis, not {g}")
        return storage.from_block(codec.quantize_block(w, fmt, g.axis), fmt)
    qw = quantize_weight(w, spec)
    return storage.from_scalar(qw.codes, qw.scale, fmt, qw.axis, qw.block_size)


def to_ir_tensor(a: np.ndarray, fmt, name: str) -> ir.Tensor:
    """An onnx_ir tensor of the format's ONNX dtype holding codes `a`."""
    return ir.Tensor(np.asarray(a).astype(fmt.onnx_dtype.numpy()), dtype=fmt.onnx_dtype, name=name)
