"""Restoring the most sensitive layers to float when the compiled model misses its gate
(`qcompile.restore`), on real EfficientNet-Lite0 weights: its stem convolution (864 weights of
4.6M) alone takes weight-only int8 from 28 dB to 17.4 dB, below w8's 20 dB gate.
"""
from __future__ import annotations

import numpy as np
import pytest

import qcompile
import tiny_models
from qcompile import restore, zoo
from qcompile.errors import ValidationFailed

N = 16


@pytest.fixture(scope="module")
def eff():
    return (zoo.get_model("efficientnet-lite0"), zoo.get_data("efficientnet-lite0", "calib", N),
            zoo.get_data("efficientnet-lite0", "eval", N))


def _float_conv(model, name: str) -> bool:
    """Whether Conv `name` reads a plain float initializer (no dequantizing op in front of it)."""
    node = next(n for n in model.graph if n.name == name)
    return node.inputs[1].const_value is not None and node.inputs[1].producer() is None


@pytest.mark.slow
def test_w8_efficientnet_restores_its_stem_and_passes(eff):
    path, calib, held = eff
    with pytest.raises(ValidationFailed) as info:  # without the restore: below the gate
        qcompile.compile(str(path), "w8", calib=str(calib), eval=str(held), max_float=0)
    first = info.value.report["verdict"]["worst_output_sqnr_db"]
    assert first < 20 and "restored" not in info.value.report

    r = qcompile.compile(str(path), "w8", calib=str(calib), eval=str(held))
    rep = r.report
    assert r.passed and rep["verdict"]["worst_output_sqnr_db"] >= 20
    rest = rep["restored"]
    names = [layer["node"] for layer in rest["layers"]]
    # the stem (3 -> 32 channels, 3x3, stride 2) is the most sensitive layer: restored first
    assert names[0] == "node_Conv_797" and len(names) <= 3, rest
    assert rest["first_sqnr_db"] == pytest.approx(first, abs=1e-6)
    assert rest["weight_share"] <= restore.BUDGET and rest["samples"] == N
    assert rest["layers"][0]["alone_sqnr_db"] < 20  # measured alone, it is below the gate by itself
    for n in names:
        assert _float_conv(r.model, n), n
        assert n not in r.plan.nodes  # the saved plan leaves it float: a replay is exact
    rows = {row["node"]: row for row in rep["layers"]}
    assert all(rows[n]["kept_float"].startswith("restored to float") for n in names)
    assert sum(row.get("weight_format") == "int8" for row in rep["layers"]) >= 45  # the rest stays int8

    replay = qcompile.compile(str(path), "w8", calib=str(calib), eval=str(held), plan=r.plan)
    assert replay.passed and "restored" not in replay.report
    assert all(_float_conv(replay.model, n) for n in names)


@pytest.mark.parametrize("budget", [restore.BUDGET, 1.0])
def test_no_restore_within_the_budget_keeps_the_failure(budget):
    """A gate no layer set within the budget reaches (5%: no layer of this MLP is that small; the
    whole model: a quarter of its two layers, still far from 200 dB in simulation): the compile
    fails as before (exit 3), and nothing is restored."""
    proto = tiny_models.mlp()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, *[d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]))
    data = {proto.graph.input[0].name: x.astype(np.float32)}
    with pytest.raises(ValidationFailed) as info:
        qcompile.compile(proto, "w8", calib=data, min_sqnr=200.0, max_float=budget)
    assert info.value.exit_code == 3 and "restored" not in str(info.value)
    assert "restored" not in info.value.report


def test_max_float_is_checked():
    with pytest.raises(qcompile.InputError, match="max_float"):
        qcompile.compile(tiny_models.mlp(), "w8", max_float=1.5)


def test_cli_default_budget_is_the_library_default():
    from click.testing import CliRunner

    from qcompile.cli import main

    out = CliRunner().invoke(main, ["compile", "--help"]).output
    assert f"[default: {restore.BUDGET}" in out.replace("\n", " ").replace("  ", " ")
