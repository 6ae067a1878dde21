"""Offline weight quantization: scales per tensor, channel or block, then codes.

`quantize` is the entry point for every format and returns the stored form (`storage.PackedTensor`).
Block formats (OCP MX, NVFP4) take their specification's scale rule (`codec.quantize_block`), with
method="mse" the per-block candidate of least squared error around it;
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


def _fmt_top(fmt) -> float:
    return float(fmt.qmax) if isinstance(fmt, IntFormat) else float(fmt.max)


def _groups(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, int | None, int | None, tuple]:
    """w viewed so that every quantization group is one slot of a broadcastable scale.

    Returns (g, axis, block, reduce): per tensor g = w, per channel g = w with the scale broadcast
    along `axis`; per block g = w zero-padded along `axis` to whole blocks and reshaped
    [..., n_blocks, block, ...]. `reduce` are the axes of g a group spans (sum or max over them
    gives one value per group, keepdims-shaped so it broadcasts against g).
    """
    g = spec.granularity
    if isinstance(g, PerTensor):
        return w, None, None, tuple(range(w.ndim))
    axis = g.axis % w.ndim
    if isinstance(g, PerChannel):
        return w, axis, None, tuple(i for i in range(w.ndim) if i != axis)
    pad = (-w.shape[axis]) % g.size
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        w = np.pad(w, widths)
    shape = list(w.shape)
    shape[axis : axis + 1] = [shape[axis] // g.size, g.size]
    return w.reshape(shape), axis, g.size, (axis + 1,)


def _ungroup(g: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int | None) -> np.ndarray:
    """Inverse of `_groups` for an array shaped like its g (drops the block padding)."""
    if block is None:
        return g
    full = list(shape)
    full[axis] = g.shape[axis] * block
    return g.reshape(full).take(np.arange(shape[axis]), axis=axis) if full[axis] != shape[axis] else g.reshape(full)


def _onnx_scale(scale_g: np.ndarray, axis: int | None, block: int | None) -> np.ndarray:
    """A keepdims group scale in DequantizeLinear's shape: scalar, 1-D per axis, or blocked."""
    if axis is None:
        return scale_g.reshape(())
    if block is None:
        return scale_g.reshape(-1)
    return np.squeeze(scale_g, axis=axis + 1)


SLICE_ELEMENTS = 1 << 20  # a large weight is quantized in slices of about this many elements


def _slice_axis(w: np.ndarray, spec: QuantSpec) -> int | None:
    """An axis along which w splits into slices that no quantization group straddles: the channel
    axis per channel, the largest other axis per block; None per tensor."""
    g = spec.granularity
    if isinstance(g, PerTensor) or w.ndim == 0:
        return None
    axis = g.axis % w.ndim
    if isinstance(g, PerChannel):
        return axis
    others = [i for i in range(w.ndim) if i != axis]
    return max(others, key=lambda i: w.shape[i]) if others else None


def quantize_weight(w: np.ndarray, spec: QuantSpec, slice_elements: int = SLICE_ELEMENTS) -> QuantizedWeight:
    """Quantize a float weight with `spec` (symmetric; see the module doc).

    Every group (channel, block) is quantized on its own, so a weight larger than `slice_elements`
    is quantized one slice of whole groups at a time (`_slice_axis`): exactly the unsliced result,
    with the search's and the rounding's float64 temporaries bounded by the slice instead of ~10x
    the weight. Only the codes (the format's storage type) are allocated at the weight's size.
    """
    fmt = spec.fmt
    if not isinstance(fmt, (IntFormat, FloatFormat)):
        raise NotImplementedError(f"weight format {spec.format} needs the block-format lowering")
    w = np.asarray(w, dtype=np.float32)
    d = _slice_axis(w, spec)
    if d is None or w.size <= slice_elements:
        return _quantize_groups(w, spec)
    step = max(1, slice_elements // (w.size // w.shape[d]))
    codes = np.empty(w.shape, dtype=fmt.storage_dtype if isinstance(fmt, IntFormat) else fmt.ml_dtype)
    parts = []
    for j in range(0, w.shape[d], step):
        sl = (slice(None),) * d + (slice(j, j + step),)
        part = _quantize_groups(w[sl], spec)
        codes[sl], part.codes = part.codes, None  # keep only the slice's scales
        parts.append(part)
    cat = 0 if parts[0].block_size is None else d  # per-axis scales are 1-D along the channel axis
    scale = np.concatenate([p.scale for p in parts], axis=cat)
    zp = None if parts[0].zero_point is None else np.concatenate([p.zero_point for p in parts], axis=cat)
    return QuantizedWeight(codes, scale, zp, parts[0].axis, parts[0].block_size, sum(p.grown for p in parts))


def _squared_error(g: np.ndarray, s: np.ndarray, fmt) -> np.ndarray:
    """(g - DQ(Q(g, s)))**2 elementwise; for INT formats in place on one float32 temporary
    (clip(rint(g / s)) * s, the same arithmetic as `fake_quant`)."""
    if not isinstance(fmt, IntFormat):
        return (g - fake_quant(g, s, 0.0, fmt)) ** 2
    q = np.divide(g, s)
    np.rint(q, out=q)
    np.clip(q, fmt.qmin, fmt.qmax, out=q)
    q *= s
    q -= g
    return np.square(q, out=q)


def _quantize_groups(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """`quantize_weight` of one slice: group maxima, the MSE clip search, the pair fit, the codes."""
    fmt = spec.fmt
    g, axis, block, reduce = _groups(w, spec)
    amax = np.abs(g).max(axis=reduce, keepdims=True).astype(np.float32)
    ratio = np.ones_like(amax)
    if spec.method == "mse":
        best = np.full(amax.shape, np.inf)
        for r in LOW_BIT_RATIOS if fmt.bits <= 3 else MSE_RATIOS:
            s = np.where(amax > 0, amax * r / _fmt_top(fmt), 1.0).astype(np.float32)
            e = _squared_error(g, s, fmt).sum(axis=reduce, keepdims=True)
            better = e < best
            best = np.where(better, e, best)
            ratio = np.where(better, r, ratio)
    scale = np.where(amax > 0, amax * ratio / _fmt_top(fmt), 1.0).astype(np.float32)
    grown = 0
    if spec.pairs is not None and isinstance(fmt, IntFormat) and block is None:
        fitted = _fit_pairs(w, _onnx_scale(scale, axis, block), fmt, spec.pairs, axis)
        grown = int(np.sum(fitted != _onnx_scale(scale, axis, block)))
        scale = fitted.reshape(scale.shape)
    r = _ungroup(codec.round_to_grid(g / scale, fmt), w.shape, axis, block)
    if isinstance(fmt, IntFormat):
        codes, zp = r.astype(fmt.storage_dtype), np.zeros(_onnx_scale(scale, axis, block).shape, dtype=fmt.storage_dtype)
    else:
        codes, zp = r.astype(fmt.ml_dtype), None
    return QuantizedWeight(codes, _onnx_scale(scale, axis, block), zp, axis, block, grown)


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


def _pair_peaks(q: np.ndarray, pairs: PairBound, channel: int, fmt: IntFormat) -> np.ndarray:
    """`pair_sums` where it exceeds `pairs.bound`, and some value <= bound elsewhere (all `_fit_pairs`
    needs). For a 2-D weight whose bound is at least the largest |code|, the largest |q_a + q_b| over
    *all* pairs is that: a pair of opposite signs (or with a zero) has |q_a + q_b| <= max(|q_a|, |q_b|)
    <= bound, so it never exceeds the bound nor hides a same-signed pair that does. Computed on a
    strided view of the codes, without the int32 copy in the kernel's order."""
    if (q.ndim != 2 or pairs.axis is None or pairs.axis % 2 == channel % 2 or fmt.frac_bits
            or pairs.bound < max(-fmt.qmin, fmt.qmax)):
        return pair_sums(q, pairs, channel).astype(np.float64)
    v = np.moveaxis(q, pairs.axis, 0)
    k = v.shape[0] - v.shape[0] % 2  # an odd last code pairs with zero: never over the bound
    s = v[0:k:2] + v[1:k:2]
    return np.abs(s, out=s).max(axis=0, initial=0).astype(np.float64)


def _fit_pairs(w: np.ndarray, scale: np.ndarray, fmt: IntFormat, pairs: PairBound, axis: int | None) -> np.ndarray:
    """Grow the scale of each channel whose codes break the pair bound (see the module doc).

    Each round re-rounds only the channels the previous round grew: the others keep their scale,
    hence their codes and pair sums.
    """
    if axis is None:  # one scale for the tensor: its worst channel decides
        channel = pair_channel_axis(w.ndim, pairs, PerTensor())
        for _ in range(64):
            p = pair_sums(codec.round_to_grid(w / scale, fmt), pairs, channel).astype(np.float64).max(initial=0)
            if p <= pairs.bound:
                return scale
            scale = np.asarray(scale * (p / pairs.bound) * (1 + 1e-6), dtype=np.float32)
        raise AssertionError("pair bound not reached")  # P / B shrinks every step; unreachable
    scale = np.array(scale, dtype=np.float32)
    todo = np.arange(scale.size)
    for _ in range(64):
        part = w if todo.size == scale.size else np.take(w, todo, axis=axis)
        q = codec.round_to_grid(part / codec.expand_param(scale[todo], part.shape, axis, None), fmt)
        p = _pair_peaks(q, pairs, axis, fmt)
        over = p > pairs.bound
        if not np.any(over):
            return scale
        todo, p = todo[over], p[over]
        scale[todo] = (scale[todo] * (p / pairs.bound) * (1 + 1e-6)).astype(np.float32)
    raise AssertionError("pair bound not reached")  # P / B shrinks every step; unreachable


def quantize(w: np.ndarray, spec: QuantSpec, qw: QuantizedWeight | storage.PackedTensor | None = None) -> storage.PackedTensor:
    """Quantize a float weight with `spec`, any format, into its stored form (`qw`: the weight's
    `WeightCache` entry -- its `quantize_weight` result, or a block format's stored form --
    when already computed)."""
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat) and qw is not None:
        return qw
    w = np.asarray(w, dtype=np.float32)
    if isinstance(fmt, BlockFormat):
        g = spec.granularity
        if not isinstance(g, PerBlock) or g.size != fmt.block_size:
            raise ValueError(f"{spec.format} weights are blocked by {fmt.block_size} along the reduction axis, not {g}")
        return storage.from_block(codec.quantize_block(w, fmt, g.axis, search=spec.method == "mse"), fmt)
    qw = quantize_weight(w, spec) if qw is None else qw
    return storage.from_scalar(qw.codes, qw.scale, fmt, qw.axis, qw.block_size)


def dequantized(w: np.ndarray, spec: QuantSpec, qw: QuantizedWeight | storage.PackedTensor | None = None) -> np.ndarray:
    """DQ(Q(w)): the float32 weight the compiled model computes with (`quantize(w, spec).dequantize()`,
    without encoding and packing the codes for scalar formats)."""
    if isinstance(spec.fmt, BlockFormat):
        return quantize(w, spec, qw).dequantize()
    return (quantize_weight(w, spec) if qw is None else qw).dequantize()


class WeightCache:
    """`quantize_weight` results by (weight tensor, spec), so the passes that quantize the same
    constant weight (BiasCorrectionPass, then InsertQDQPass) search its scales once; the last user
    `take`s the entry (its codes then live only in the compiled graph). A block format's entry is
    its stored form (`quantize`), whose scale search is the costly part."""

    def __init__(self, keep: bool = False) -> None:
        self._entries: dict[tuple[int, QuantSpec], tuple[ir.TensorProtocol, QuantizedWeight | storage.PackedTensor]] = {}
        self.keep = keep  # entries outlive `take` (one cache across the many simulations of `qcompile.restore`)

    def get(self, tensor: ir.TensorProtocol, spec: QuantSpec, arr: np.ndarray | None = None,
            take: bool = False) -> QuantizedWeight | storage.PackedTensor:
        """quantize_weight(arr or tensor.numpy(), spec) (block formats: quantize), computed at most
        once per (tensor, spec)."""
        key = (id(tensor), spec)
        hit = self._entries.pop(key, None) if take and not self.keep else self._entries.get(key)
        if hit is not None and hit[0] is tensor:
            return hit[1]
        arr = tensor.numpy() if arr is None else arr
        qw = quantize(arr, spec) if isinstance(spec.fmt, BlockFormat) else quantize_weight(arr, spec)
        if not take or self.keep:
            self._entries[key] = (tensor, qw)
        return qw


def to_ir_tensor(a: np.ndarray, fmt, name: str) -> ir.Tensor:
    """An onnx_ir tensor of the format's ONNX dtype holding codes `a`."""
    return ir.Tensor(np.asarray(a).astype(fmt.onnx_dtype.numpy(), copy=False), dtype=fmt.onnx_dtype, name=name)
