"""Library entry points besides `compile`: `validate`, `lower` (the backend stages alone, on a
saved Q/DQ model) and `explain` (the pipeline, the plan and each layer's kernel, without data)."""
from __future__ import annotations

import os

import onnx
import onnx_ir as ir

from qcompile.context import CompileContext
from qcompile.data import ArrayDataset, InputInfo, synthesize
from qcompile.pipeline import as_dataset as _as_dataset
from qcompile.pipeline import load_model, run_stages, settings_for
from qcompile.stages import BACKEND_GROUPS, pipeline_for, required_opset
from qcompile.validate import compare, verdict


def validate(float_model: str | os.PathLike | ir.Model | onnx.ModelProto,
             compiled: str | os.PathLike | ir.Model | onnx.ModelProto,
             eval, min_sqnr: float | None = None, batch_size: int = 8) -> dict:
    """Compare a compiled model against its float model on `eval` data (ENABLE_ALL sessions).

    Returns {"outputs": per-output metrics, "verdict": {...}} (verdict only when min_sqnr is given).
    """
    f, c = load_model(float_model), load_model(compiled)
    data = _as_dataset(eval, InputInfo.of_model(f))
    out = {"outputs": compare(f, c, data, batch_size)}
    if min_sqnr is not None:
        out["verdict"] = verdict(out["outputs"], min_sqnr)
    return out


def lower(model: str | os.PathLike | ir.Model | onnx.ModelProto, lowering: str = "auto", accuracy_level: int = 0,
          target: str = "int8") -> ir.Model:
    """Run only the backend stages (lowering, StoreHalfPass, emit, onnx.checker, the compile's
    metadata removed) on a Q/DQ model, e.g. one written by `--dump-after InsertQDQPass`: the result
    is the model the full compile emits with the same lowering and accuracy level. (`target` only
    names the settings; the backend stages read everything from the graph.)"""
    s = settings_for(target, validate=False, lowering=lowering, accuracy_level=accuracy_level)
    ctx = CompileContext(s, model)
    ctx.model = load_model(model)
    run_stages(ctx, [st for st in pipeline_for(s) if st.group in BACKEND_GROUPS])
    return ctx.model


def explain(model: str | os.PathLike | ir.Model | onnx.ModelProto, target: str = "int8", lowering: str = "auto",
            **settings) -> dict:
    """What a compile would do, without calibration data: {"pipeline": [{stage, group, when, doc}],
    "plan": the plan JSON, "layers": [{node, op_type, weight, activation, kernel, kernels_not_taken}]}.

    The front stages and the planner run on the model; the kernel of each layer is what the
    backend's lowering policy decides for its weights quantized as planned (activations get a
    placeholder range: kernels do not depend on it)."""
    from qcompile.analyze import plan_on
    from qcompile.backends.onnxruntime.backend import lowering_passes
    from qcompile.backends.onnxruntime.kernels import recorded
    from qcompile.backends.onnxruntime.lower_nbits import LAYER_KEY
    from qcompile.passes.insert_qdq import InsertQDQPass

    s = settings_for(target, lowering=lowering, **settings)
    stages = pipeline_for(s)
    ctx = CompileContext(s, model)
    front = [st for st in stages if st.group == "front" and st.name not in ("data", "float-snapshot") or st.name == "plan"]
    run_stages(ctx, front[:1])  # load: inputs known
    ctx.calib = ctx.eval = ArrayDataset(synthesize(ctx.inputs, 2, s.seed), ctx.inputs)
    ctx.opset = required_opset(ctx)
    run_stages(ctx, front[1:])
    plan = ctx.plan
    placeholder = {v: (-1.0, 1.0) for v, spec in plan.activation_specs().items() if spec.clip is None and not spec.dynamic}
    probe = ctx.model.clone()
    InsertQDQPass(plan_on(probe.graph, plan).with_clips(placeholder), s.caps)(probe)
    for p in lowering_passes(lowering, 0, s.caps):
        p(probe)
    decisions = {}
    for n in ir.traversal.RecursiveGraphIterator(probe.graph):
        d = recorded(n)
        if d is not None:
            decisions[n.metadata_props.get(LAYER_KEY, n.name)] = d
    layers = []
    for name, node in plan.nodes.items():
        row = {"node": name, "op_type": node.op_type}
        for q in node.inputs.values():
            row.setdefault(q.role, f"{q.spec.format} {q.spec.granularity.to_json()['kind']}")
        if name in decisions:
            row["kernel"] = decisions[name]["kernel"]
            row["kernels_not_taken"] = decisions[name]["rejected"]
        layers.append(row)
    return {
        "target": s.target.name,
        "lowering": lowering,
        "pipeline": [{"stage": st.name, "group": st.group, "conditional": st.when is not None, "doc": st.doc}
                     for st in stages],
        "plan": plan.to_json(),
        "kept_float": {k: {"op_type": op, "reason": why} for k, (op, why) in ctx.kept.items()},
        "layers": layers,
    }
