"""qcompile.weights on large weights: quantizing slice by slice gives exactly the unsliced result,
with bounded memory; the pair fit and the cached quantization give the same codes as before.

All comparisons are exact (bit-equal codes and scales): slicing, the pair fit's shortcut and the
cache change which elements are computed when, never the arithmetic.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from qcompile import codec, storage
from qcompile.plan import PairBound, PerBlock, PerChannel, PerTensor, QuantSpec
from qcompile.weights import WeightCache, _fit_pairs, pair_channel_axis, pair_sums, quantize, quantize_weight

SPECS = [
    QuantSpec("int8", PerChannel(1)),
    QuantSpec("int8", PerChannel(1), pairs=PairBound(0, 128)),
    QuantSpec("int8", PerChannel(0), method="mse"),
    QuantSpec("int4", PerBlock(0, 32), method="mse"),
    QuantSpec("int4", PerBlock(1, 16), method="mse"),
    QuantSpec("int3", PerBlock(0, 32), method="mse"),
    QuantSpec("e4m3fn", PerChannel(1)),
    QuantSpec("e2m1", PerBlock(0, 32), method="mse"),
]


def _weight(shape=(200, 150), seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[3, :] *= 20  # an outlier row: large same-signed pairs, clipped blocks
    return w


def _same(a, b):
    assert np.array_equal(a.codes.view(np.uint8), b.codes.view(np.uint8))
    assert np.array_equal(a.scale, b.scale) and a.scale.shape == b.scale.shape
    assert (a.zero_point is None) == (b.zero_point is None)
    assert (a.axis, a.block_size, a.grown) == (b.axis, b.block_size, b.grown)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}-{s.method}-{s.pairs is not None}")
def test_sliced_equals_unsliced(spec):
    w = _weight()
    whole = quantize_weight(w, spec, slice_elements=w.size)
    for n in (1000, 4096, 7777):  # slices of a few groups, not aligned to anything
        _same(quantize_weight(w, spec, slice_elements=n), whole)


def test_conv_weight_sliced_equals_unsliced():
    w = _weight((32, 16, 3, 3))
    for spec in (QuantSpec("int8", PerChannel(0), pairs=PairBound(1, 128)), QuantSpec("int4", PerBlock(1, 4), method="mse")):
        _same(quantize_weight(w, spec, slice_elements=500), quantize_weight(w, spec, slice_elements=w.size))


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerChannel(1), pairs=PairBound(0, 128)),
                                  QuantSpec("int4", PerBlock(0, 32), method="mse")], ids=["int8-pairs", "int4-mse"])
def test_memory_is_bounded_by_the_slice(spec):
    """Peak traced memory: the codes (1 byte per weight) plus one slice's temporaries, well below the
    weight's own float32 bytes (the unsliced search and rounding took 5-8x them)."""
    w = _weight((1024, 2048))
    tracemalloc.start()
    try:
        quantize_weight(w, spec, slice_elements=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * w.nbytes, f"peak {peak / w.nbytes:.2f}x the weight"


def _fit_pairs_reference(w, scale, fmt, pairs, axis):
    """The plain rule: re-round every channel each round, grow the ones over the bound."""
    channel = pair_channel_axis(w.ndim, pairs, PerChannel(axis))
    for _ in range(64):
        q = codec.round_to_grid(w / codec.expand_param(scale, w.shape, axis, None), fmt)
        p = pair_sums(q, pairs, channel).astype(np.float64)
        over = p > pairs.bound
        if not np.any(over):
            return scale
        scale = np.where(over, scale * (p / pairs.bound) * (1 + 1e-6), scale).astype(np.float32)
    raise AssertionError


def test_pair_fit_matches_the_plain_rule():
    spec = QuantSpec("int8", PerChannel(1), pairs=PairBound(0, 128))
    w = _weight((256, 64))
    w[:, ::3] = np.abs(w[:, ::3]) + 1  # many same-signed large pairs: several rounds of growth
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    got = _fit_pairs(w, scale, spec.fmt, spec.pairs, 1)
    ref = _fit_pairs_reference(w, scale, spec.fmt, spec.pairs, 1)
    assert np.array_equal(got, ref) and np.sum(got != scale) > 10


@pytest.mark.parametrize("shape,bound", [((256, 64), 128), ((257, 33), 128), ((256, 64), 100), ((5, 7), 128)])
def test_pair_peaks_decide_as_the_pair_sums(shape, bound):
    """The fast pair check (`_pair_peaks`, any-signed pairs on a strided view) grows exactly the
    channels the same-signed pair sums would, by the same factor; an odd reduction length and a bound
    below the largest code (where opposite-signed pairs could exceed it: the plain rule) included."""
    from qcompile.weights import _pair_peaks

    spec = QuantSpec("int8", PerChannel(1), pairs=PairBound(0, bound))
    w = _weight(shape)
    w[:, ::3] = np.abs(w[:, ::3]) + 1
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = codec.round_to_grid(w / scale, spec.fmt)
    ref = pair_sums(q, spec.pairs, 1).astype(np.float64)
    got = _pair_peaks(q, spec.pairs, 1, spec.fmt)
    over = ref > bound
    assert np.array_equal(got > bound, over) and np.array_equal(got[over], ref[over])
    assert np.array_equal(_fit_pairs(w, scale, spec.fmt, spec.pairs, 1),
                          _fit_pairs_reference(w, scale, spec.fmt, spec.pairs, 1))


def test_per_tensor_pair_fit():
    spec = QuantSpec("int8", PerTensor(), pairs=PairBound(0, 128))
    w = np.abs(_weight((64, 32))) + 0.5
    qw = quantize_weight(w, spec)
    assert qw.grown == 1 and pair_sums(qw.codes.astype(np.int32), spec.pairs, 1).max() <= 128


def test_cache_quantizes_once_and_take_releases():
    import onnx_ir as ir
    w = _weight()
    t = ir.tensor(w)
    spec = QuantSpec("int4", PerBlock(0, 32), method="mse")
    cache = WeightCache()
    first = cache.get(t, spec)
    assert cache.get(t, spec) is first  # a second user: no second search
    assert cache.get(t, spec, take=True) is first and not cache._entries
    _same(first, quantize_weight(w, spec))
    mx = QuantSpec("mxfp4", PerBlock(0, 32), method="mse")  # block formats: the stored form, searched once
    stored = cache.get(t, mx)
    assert cache.get(t, mx) is stored and quantize(w, mx, stored) is stored
    np.testing.assert_array_equal(stored.dequantize(), quantize(w, mx).dequantize())


def test_int8_codes_are_shared_not_reencoded():
    qw = quantize_weight(_weight(), QuantSpec("int8", PerChannel(1)))
    t = storage.from_scalar(qw.codes, qw.scale, QuantSpec("int8", PerChannel(1)).fmt, qw.axis, None)
    assert np.shares_memory(t.codes, qw.codes)
    assert np.array_equal(t.codes, codec.encode(qw.codes.astype(np.float64), QuantSpec("int8", PerChannel(1)).fmt))


def test_row_slices_of_a_per_channel_weight():
    """One scale block spans all rows (per channel): row_slices still slices (it dequantized the
    whole weight at once), and the pieces are dequantize()."""
    spec = QuantSpec("int8", PerChannel(1))
    qw = quantize_weight(_weight((400, 100)), spec)
    t = storage.from_scalar(qw.codes, qw.scale, spec.fmt, qw.axis, qw.block_size)
    parts = list(t.row_slices(chunk=4000))
    assert len(parts) == 10
    np.testing.assert_array_equal(np.concatenate([p for _, _, p in parts]), t.dequantize())
