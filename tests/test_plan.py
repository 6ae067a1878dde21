"""Quantization plans as data: the default plan of a target, JSON round trip, readable errors."""
from __future__ import annotations

import json

import onnx_ir as ir
import pytest

import tiny_models
from qcompile.analyze import PlanOptions, make_plan
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.errors import InputError
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.normalize import NormalizePass
from qcompile.plan import SCHEMA, InputQuant, NodePlan, PairBound, PerBlock, PerChannel, PerTensor, QuantPlan, QuantSpec
from qcompile.targets import TARGETS, get_target


def _prepared(name: str) -> ir.Model:
    m = ir.from_proto(getattr(tiny_models, name)())
    NormalizePass(21, 26)(m)
    FoldBatchNormPass()(m)
    return m


# --- the default plan --------------------------------------------------------------------------
def test_int8_plan_of_mlp():
    plan = make_plan(_prepared("mlp"), get_target("int8"))
    assert list(plan.nodes) == ["fc1", "fc2"]
    fc1, fc2 = plan.nodes["fc1"], plan.nodes["fc2"]
    # an asymmetric 8-bit grid is stored unsigned (faster onnxruntime kernels; exact u8 x u8 products)
    assert fc1.inputs[0] == InputQuant("x", "activation", QuantSpec("uint8", PerTensor(), False, "mse"))
    # MatMul B [K, N]: one scale per output column N (axis 1)
    assert fc1.inputs[1] == InputQuant("w1", "weight", QuantSpec("int8", PerChannel(1), True, "minmax"))
    assert not fc1.bias, "MatMul has no bias input (the bias is a separate Add)"
    # Gemm with transB=1: B is [N, K], output channel on axis 0; int32 bias for integer kernels
    assert fc2.inputs[1].spec.granularity == PerChannel(0)
    assert fc2.bias and fc2.output is None


@pytest.mark.parametrize("cpu", ["portable", "avx2", "avx512"])
def test_int8_plan_bounds_weight_pairs_for_cpus_without_vnni(cpu):
    """int8 weights read by u8 x s8 kernels carry the pair bound of their reduction axis."""
    plan = make_plan(_prepared("mlp"), get_target("int8"), PlanOptions(cpu=cpu), CAPABILITIES)
    assert plan.nodes["fc1"].inputs[1].spec.pairs == PairBound(0, 128)  # MatMul B [K, N]: pairs along K
    assert plan.nodes["fc2"].inputs[1].spec.pairs == PairBound(1, 128)  # Gemm transB: [N, K]
    cnn = make_plan(_prepared("cnn"), get_target("int8"), PlanOptions(cpu=cpu), CAPABILITIES)
    assert cnn.nodes["conv1"].inputs[1].spec.pairs == PairBound(1, 128)  # Conv [Cout, Cin, k, k]


def test_int8_plan_has_no_pair_bound_for_vnni_or_weight_only():
    plan = make_plan(_prepared("mlp"), get_target("int8"), PlanOptions(cpu="vnni"), CAPABILITIES)
    assert all(q.spec.pairs is None for n in plan.nodes.values() for q in n.inputs.values())
    for target in ("w8", "a16w8", "fp8", "w4"):  # no u8 x s8 integer kernel reads these weights
        plan = make_plan(_prepared("mlp"), get_target(target), PlanOptions(cpu="portable"), CAPABILITIES)
        assert all(q.spec.pairs is None for n in plan.nodes.values() for q in n.inputs.values()), target


def test_depthwise_conv_weights_have_no_pair_bound():
    """onnxruntime's depthwise kernels widen to 16 bits (tests/backends/test_pair_saturation.py)."""
    m = ir.from_proto(tiny_models.depthwise_cnn())
    NormalizePass(21, 26)(m)
    plan = make_plan(m, get_target("int8"), PlanOptions(cpu="portable"), CAPABILITIES)
    dw = [n.name for n in m.graph if n.op_type == "Conv" and "group" in n.attributes]
    assert dw and all(plan.nodes[name].inputs[1].spec.pairs is None for name in dw)
    assert any(n.inputs[1].spec.pairs is not None for name, n in plan.nodes.items() if name not in dw)


def test_w4_plan_blocks_along_the_reduction_axis():
    plan = make_plan(_prepared("mlp"), get_target("w4"))
    assert plan.nodes["fc1"].inputs[1].spec.granularity == PerBlock(0, 32)  # MatMul B [K=64, N]
    assert plan.nodes["fc2"].inputs[1].spec.granularity == PerBlock(1, 32)  # Gemm transB: [N, K=128]
    assert all(q.role == "weight" for n in plan.nodes.values() for q in n.inputs.values()), "weight-only"


def test_int8_plan_of_cnn_quantizes_conv_outputs_after_relu():
    plan = make_plan(_prepared("cnn"), get_target("int8"))
    assert plan.nodes["conv1"].output.value == "r1", "Q after Conv+Relu so onnxruntime builds QLinearConv"
    assert plan.nodes["conv2"].output.value == "r2"
    assert plan.nodes["conv1"].inputs[1].spec.granularity == PerChannel(0)
    assert plan.nodes["conv1"].bias and plan.nodes["fc"].bias


def test_plan_options_exclude_and_keep_last():
    m = _prepared("mlp")
    assert list(make_plan(m, get_target("int8"), PlanOptions(exclude_nodes=("fc1",))).nodes) == ["fc2"]
    assert list(make_plan(m, get_target("int8"), PlanOptions(exclude_ops=("Gemm",))).nodes) == ["fc1"]
    assert list(make_plan(m, get_target("int8"), PlanOptions(keep_last=True)).nodes) == ["fc1"]


# --- JSON round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("model", ["mlp", "cnn", "attention"])
def test_plan_json_round_trip(tmp_path, model, target):
    plan = make_plan(_prepared(model), get_target(target), PlanOptions(cpu="portable"), CAPABILITIES)
    assert plan.nodes
    # with calibrated clips on the activations
    plan = plan.with_clips({v: (-1.5, 2.25) for v in plan.activation_specs()})
    text = json.dumps(plan.to_json())
    back = QuantPlan.from_json(json.loads(text))
    assert back.to_json() == plan.to_json()
    assert back.nodes == plan.nodes and back.target == plan.target
    path = tmp_path / "plan.json"
    plan.save(path)
    assert QuantPlan.load(path).nodes == plan.nodes
    assert json.loads(path.read_text())["schema"] == SCHEMA


def test_with_clips_fills_only_missing_clips():
    spec = QuantSpec("int8", PerTensor(), False, "mse")
    plan = QuantPlan("int8", {
        "a": NodePlan("MatMul", {0: InputQuant("x", "activation", spec)}),
        "b": NodePlan("MatMul", {0: InputQuant("y", "activation", QuantSpec("int8", clip=(-1.0, 1.0)))}),
    })
    out = plan.with_clips({"x": (0.0, 3.0), "y": (-9.0, 9.0)})
    assert out.nodes["a"].inputs[0].spec.clip == (0.0, 3.0)
    assert out.nodes["b"].inputs[0].spec.clip == (-1.0, 1.0), "an existing (user-edited) clip is kept"
    assert plan.nodes["a"].inputs[0].spec.clip is None, "with_clips returns a copy"
    assert set(out.activation_specs()) == {"x", "y"}


# --- readable errors ---------------------------------------------------------------------------
def _plan_json():
    return {
        "schema": SCHEMA,
        "target": "int8",
        "nodes": {"fc1": {"op_type": "MatMul", "inputs": {"1": {"value": "w1", "role": "weight", "format": "int8",
                                                                 "granularity": {"kind": "channel", "axis": 1}}}}},
    }


def test_valid_minimal_plan_json_loads():
    plan = QuantPlan.from_json(_plan_json())
    assert plan.nodes["fc1"].inputs[1].spec == QuantSpec("int8", PerChannel(1), True, "minmax")


def test_unknown_schema_is_an_input_error():
    d = _plan_json() | {"schema": "qcompile.plan/999"}
    with pytest.raises(InputError, match=r"schema 'qcompile.plan/999' is not 'qcompile.plan/1'"):
        QuantPlan.from_json(d)
    with pytest.raises(InputError, match="schema None"):
        QuantPlan.from_json({k: v for k, v in _plan_json().items() if k != "schema"})


def test_unknown_format_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown format 'int99'.*int8"):
        QuantSpec("int99")
    d = _plan_json()
    d["nodes"]["fc1"]["inputs"]["1"]["format"] = "int99"
    with pytest.raises((InputError, KeyError), match=r"int99.*known.*e4m3fn"):
        QuantPlan.from_json(d)


def test_unknown_granularity_is_an_input_error():
    d = _plan_json()
    d["nodes"]["fc1"]["inputs"]["1"]["granularity"] = {"kind": "row"}
    with pytest.raises(InputError, match=r"unknown granularity kind 'row' \(tensor, channel, block\)"):
        QuantPlan.from_json(d)


def test_unknown_method_and_role_are_input_errors():
    d = _plan_json()
    d["nodes"]["fc1"]["inputs"]["1"]["method"] = "median"
    with pytest.raises(InputError, match=r"unknown scale method 'median' \(one of minmax, percentile, entropy, mse\)"):
        QuantPlan.from_json(d)
    d = _plan_json()
    d["nodes"]["fc1"]["inputs"]["1"]["role"] = "bias"
    with pytest.raises(InputError, match="role must be 'weight' or 'activation', got 'bias'"):
        QuantPlan.from_json(d)


def test_missing_key_is_an_input_error():
    d = _plan_json()
    del d["nodes"]["fc1"]["inputs"]["1"]["format"]
    with pytest.raises(InputError, match="missing or unknown key 'format'"):
        QuantPlan.from_json(d)


def test_unreadable_plan_file_is_an_input_error(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("{ not json")
    with pytest.raises(InputError, match="plan .*plan.json"):
        QuantPlan.load(p)
    with pytest.raises(InputError, match="plan .*missing.json"):
        QuantPlan.load(tmp_path / "missing.json")


def test_specs_are_typed_and_plans_frozen():
    """Typed specs (issue 10): the method is a `Method`, the format object is parsed once, plans
    and node plans are frozen (updated with dataclasses.replace), a bad method or lowering is an
    InputError."""
    import dataclasses

    import pytest

    from qcompile.errors import InputError
    from qcompile.pipeline import settings_for
    from qcompile.plan import Method, NodePlan, QuantPlan, QuantSpec

    spec = QuantSpec("int8", method="mse")
    assert spec.method is Method.MSE and spec.method == "mse" and spec.to_json()["method"] == "mse"
    assert spec.fmt is spec.fmt and spec.fmt.name == "int8"  # parsed once, not on every access
    assert {Method.MSE: 1}["mse"] == 1  # interchangeable with its name as a key
    with pytest.raises(InputError, match="unknown scale method"):
        QuantSpec("int8", method="median")
    plan = QuantPlan("int8", {"n": NodePlan("MatMul")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.smoothing = {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.nodes["n"].bias = True
    assert dataclasses.replace(plan, smoothing={"x": [1.0]}).smoothing == {"x": [1.0]} and plan.smoothing == {}
    assert settings_for("int8", lowering="integer").lowering == "integer"
    with pytest.raises(InputError, match="lowering must be one of"):
        settings_for("int8", lowering="fastest")
