"""PairPermutationPass: renumbering reduction channels is exact in float, fixes the int16 pairs of
the chains it may touch, and leaves every other chain alone.

Tolerance: the pass only moves weights (no arithmetic changes), so the float model's outputs agree
to float32 summation-order noise: rtol 1e-5.
"""
from __future__ import annotations

import dataclasses
import numpy as np
import onnx_ir as ir
import pytest

import helpers
import tiny_models
from qcompile.analyze import PlanOptions, make_plan
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.normalize import NormalizePass
from qcompile.passes.pair_permute import META, PairPermutationPass, pairing
from qcompile.plan import PairBound
from qcompile.targets import get_target
from qcompile.weights import pair_sums, quantize_weight


def _prepared(name: str):
    proto = getattr(tiny_models, name)()
    m = ir.from_proto(proto)
    NormalizePass(21, 26)(m)
    FoldBatchNormPass()(m)
    return m, proto


def _plan(m, cpu="portable"):
    return make_plan(m, get_target("int8"), PlanOptions(cpu=cpu), CAPABILITIES)


def _violations(m, plan, name) -> int:
    """Saturating pairs of the planned int8 codes of `name` (unbounded quantization, kernel pairing)."""
    node = helpers.node_by_name(m, name)
    spec = plan.nodes[name].inputs[1].spec
    q = quantize_weight(node.inputs[1].const_value.numpy(), dataclasses.replace(spec, pairs=None)).codes
    rows = np.moveaxis(q.astype(np.int32), spec.pairs.axis, 0).reshape(q.shape[spec.pairs.axis], -1)
    rows = rows[: rows.shape[0] // 2 * 2]
    a, b = rows[0::2], rows[1::2]
    return int(np.sum((a * b > 0) & (np.abs(a + b) > spec.pairs.bound)))


@pytest.mark.parametrize("name, permuted", [("depthwise_cnn", {"project"}), ("mlp", {"fc2"})])
def test_permutation_is_exact_and_removes_saturating_pairs(name, permuted):
    m, proto = _prepared(name)
    plan = _plan(m)
    before = {n: _violations(m, plan, n) for n in permuted}
    assert all(v > 0 for v in before.values()), f"the test model must have saturating pairs: {before}"
    feeds = tiny_models.inputs_for(proto, 8, seed=3)
    ref = helpers.run(m, feeds, "disable")[0]
    helpers.assert_pass_contract(PairPermutationPass(plan), m, expect_modified=True)
    got = helpers.run(m, feeds, "disable")[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    marked = {n.name for n in m.graph if META in n.metadata_props}
    assert marked == permuted, f"permuted {marked}, expected {permuted}"
    for n in permuted:
        assert _violations(m, plan, n) < before[n], f"{n}: {before[n]} -> {_violations(m, plan, n)}"


def test_chains_that_leak_are_left_alone():
    """depthwise_cnn's expand conv reads the residual stream, which reaches GlobalAveragePool ->
    Flatten (no per-channel op); the MLP's fc1 reads a graph input: their input channels keep their
    order (their output channels may move, as producers of a chain that closes)."""
    m, _ = _prepared("depthwise_cnn")
    w = {n: helpers.node_by_name(m, n).inputs[1].const_value.numpy().copy() for n in ("stem", "expand", "fc")}
    PairPermutationPass(_plan(m))(m)
    for n in ("stem", "fc"):
        np.testing.assert_array_equal(helpers.node_by_name(m, n).inputs[1].const_value.numpy(), w[n], err_msg=n)
    # expand writes the project chain (its output channels move), but its input channels do not
    new = helpers.node_by_name(m, "expand").inputs[1].const_value.numpy()
    old_rows = {r.tobytes() for r in w["expand"]}
    assert {r.tobytes() for r in new} == old_rows and not np.array_equal(new, w["expand"])
    m, _ = _prepared("mlp")
    w1 = helpers.node_by_name(m, "fc1").inputs[1].const_value.numpy().copy()
    PairPermutationPass(_plan(m))(m)
    new = helpers.node_by_name(m, "fc1").inputs[1].const_value.numpy()  # [K=64 inputs, N=128]: columns move
    assert {c.tobytes() for c in new.T} == {c.tobytes() for c in w1.T} and not np.array_equal(new, w1)


def test_no_better_order_no_change():
    """convnet's conv2 reads 40 channels in 24 x 9 columns of Gaussian weights: nearly every channel
    pair saturates somewhere, no order is better, so nothing moves (the scales grow instead)."""
    m, _ = _prepared("convnet")
    plan = _plan(m)
    assert _violations(m, plan, "conv2") > 0
    helpers.assert_pass_contract(PairPermutationPass(plan), m, expect_modified=False)


def test_no_pair_bound_no_change():
    m, _ = _prepared("depthwise_cnn")
    helpers.assert_pass_contract(PairPermutationPass(_plan(m, cpu="vnni")), m, expect_modified=False)


def test_shared_weight_is_not_permuted():
    """A consumer weight another node also reads cannot take a row permutation in place."""
    m, _ = _prepared("mlp")
    fc2 = helpers.node_by_name(m, "fc2")
    other = ir.node("Identity", [fc2.inputs[1]], name="also_reads_w2")
    other.outputs[0].name = "w2_copy"
    m.graph.append(other)
    m.graph.outputs.append(other.outputs[0])
    plan = _plan(m)
    w = fc2.inputs[1].const_value.numpy().copy()
    PairPermutationPass(plan)(m)
    np.testing.assert_array_equal(fc2.inputs[1].const_value.numpy(), w)


def test_pairing_avoids_every_conflict_when_a_matching_exists():
    """A random conflict graph built around a hidden perfect matching: the order pairs channels
    (2i, 2i+1) that do not conflict, and is a permutation."""
    rng = np.random.default_rng(0)
    for c in (16, 64, 257):
        hidden = rng.permutation(c)
        bad = rng.random((c, c)) < 0.6
        bad = bad | bad.T
        for i in range(0, c - 1, 2):
            bad[hidden[i], hidden[i + 1]] = bad[hidden[i + 1], hidden[i]] = False
        np.fill_diagonal(bad, False)
        order = pairing(bad)
        assert sorted(order.tolist()) == list(range(c))
        pairs = order[: c // 2 * 2].reshape(-1, 2)
        conflicts = int(sum(bad[i, j] for i, j in pairs))
        assert conflicts <= max(1, c // 64), f"{c} channels: {conflicts} conflicting pairs left"


def test_weights_keep_the_bound_after_the_pass():
    """Whatever the permutation leaves, the weight quantizer grows the scales that still break it."""
    m, _ = _prepared("depthwise_cnn")
    plan = _plan(m)
    PairPermutationPass(plan)(m)
    for name, np_ in plan.nodes.items():
        spec = np_.inputs[1].spec
        if spec.pairs is None:
            continue
        q = quantize_weight(helpers.node_by_name(m, name).inputs[1].const_value.numpy(), spec)
        assert pair_sums(q.codes, spec.pairs, spec.granularity.axis).max() <= spec.pairs.bound, name
    assert plan.nodes["depthwise"].inputs[1].spec.pairs is None
    assert plan.nodes["project"].inputs[1].spec.pairs == PairBound(1, 128)


def test_a_column_that_saturates_every_pair_skips_the_search():
    """Every code of a column above bound / 2 with one sign: every pairing saturates there, so the
    pass does not search (the search is columns x channels^2 on such weights: onnx's light/ CNNs
    fill every weight with one value, and squeezenet's int8 compile spent 43 s in this pass)."""
    from qcompile.passes.pair_permute import _every_pair_saturates

    r = np.full((6, 3), 100, np.int32)
    assert _every_pair_saturates([r], 128)
    r[0, :] = 10  # one small channel in every column: a pairing can avoid the bound in each
    assert not _every_pair_saturates([r], 128)
    assert _every_pair_saturates([-np.full((4, 2), 127, np.int32)], 128)


def _conflicts_brute_force(rows, bound):
    c = rows[0].shape[0]
    bad = np.zeros((c, c), dtype=bool)
    for r in rows:
        for i in range(c):
            for j in range(c):
                same = r[i] * r[j] > 0
                bad[i, j] |= bool(np.any(same & (np.abs(r[i] + r[j]) > bound))) and i != j
    return bad


def test_conflicts_equal_the_definition():
    """The vectorized conflict graph: i, j conflict iff some column has same-signed codes whose sum
    exceeds the bound (codes near +-127 so that many, but not all, pairs conflict)."""
    from qcompile.passes.pair_permute import _conflicts

    rng = np.random.default_rng(4)
    rows = [rng.integers(-127, 128, (24, 7)).astype(np.int16), rng.integers(-127, 128, (24, 3)).astype(np.int16)]
    bad = _conflicts(rows, 128)
    assert np.array_equal(bad, _conflicts_brute_force(rows, 128))
    assert 0 < bad.sum() < bad.size - 24


def test_dense_random_weights_are_skipped_cheaply():
    """Random Gaussian int8 codes over many columns: every channel conflicts with (almost) every
    other, so no order helps; `_hopeless` says so from a sample, and a real chain of such layers is
    left as it is (the conflict graph of an 8192-channel layer cost minutes)."""
    from qcompile.passes.pair_permute import _hopeless

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    from qcompile.plan import PerChannel, QuantSpec
    q = quantize_weight(w, QuantSpec("int8", PerChannel(1))).codes.astype(np.int16)
    assert _hopeless([q], 128)
    small = (q // 4).astype(np.int16)  # |codes| <= 32: nothing conflicts
    assert not _hopeless([small], 128)
