"""The compile pipeline: load -> normalize -> fold -> plan -> calibrate -> quantize -> lower -> emit -> validate.

Every stage is timed and listed in the report. The library never exits and never prints; the CLI
maps the typed exceptions of `qcompile.errors` to exit codes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from qcompile import __version__, external, restore
from qcompile.analyze import PlanOptions, has_compute, kept_in_float, make_plan, nothing_to_quantize, tie_heads
from qcompile.backends.onnxruntime.accuracy_level import choose_accuracy_level
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES, Capabilities
from qcompile.backends.onnxruntime.lower_native import NativeFakeQuantPass
from qcompile.backends.onnxruntime.lower_nbits import LowerToMatMulNBitsPass
from qcompile.backends.onnxruntime.lowering import LowerForOnnxruntimePass
from qcompile.backends.onnxruntime.session import FILE_SESSION_BYTES, is_runtime_error
from qcompile.calibrate import choose_clip, collect, simulate, stream_values
from qcompile.cpu import Cpu, host_description
from qcompile.data import ArrayDataset, Dataset, InputInfo, synthesize
from qcompile.errors import InputError, QCompileError, UnsupportedModelError, ValidationFailed
from qcompile.formats import parse_format
from qcompile.passes.convert_opset import ConvertOpsetPass, pop_record
from qcompile.passes.bias_correction import BiasCorrectionPass, channel_means, correctable
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.fold_constant_of_shape import FoldConstantOfShapePass
from qcompile.passes.insert_qdq import InsertQDQPass
from qcompile.passes.normalize import NormalizePass
from qcompile.passes.pair_permute import PairPermutationPass
from qcompile.passes.promote_float import HalfInterfacePass, PromoteFloatPass, StoreHalfPass
from qcompile.passes.smooth_quant import SmoothQuantPass, channel_stats, choose_scales, smoothable
from qcompile.plan import PerBlock, QuantPlan
from qcompile.subgraphs import all_values, location
from qcompile.targets import Target, get_target
from qcompile.validate import compare, output_names, reference_outputs, verdict
from qcompile.weights import WeightCache

log = logging.getLogger(__name__)
REPORT_SCHEMA = "qcompile.report/1"
HELD_OUT = 64  # samples held out of the calibration data when no --eval is given
SYNTH_SAMPLES = 64  # synthesized calibration samples when no data is given
CONVERSION_SAMPLES = 8  # calibration samples on which an opset conversion is checked


@dataclass
class CompileResult:
    model: ir.Model
    plan: QuantPlan
    report: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verdict", {}).get("passed", True))


def load_model(source: str | os.PathLike | ir.Model | onnx.ModelProto) -> ir.Model:
    """An onnx_ir model from a path (external data stays memory-mapped), a ModelProto or a Model."""
    if isinstance(source, ir.Model):
        return source.clone() if hasattr(source, "clone") else ir.from_proto(ir.to_proto(source))
    if isinstance(source, onnx.ModelProto):
        return ir.from_proto(source)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except (DecodeError, ValueError, RuntimeError, OSError, IndexError, TypeError) as e:
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(f"{path}: not an ONNX model (empty graph)")
    external.mark_input(model, path)
    return model


def _as_dataset(data, inputs: list[InputInfo]) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        return ArrayDataset(data, inputs)
    return Dataset(data, inputs)


def _required_opset(formats: list, blocked: bool, caps: Capabilities) -> int:
    """The lowest default-domain opset whose Q/DQ covers `formats` (blocked Q/DQ needs 21, and so
    do the qcompile function ops that formats without a native Q/DQ use)."""
    native = [caps.min_opset(f.onnx_dtype) for f in formats if caps.qdq_native(getattr(f, "onnx_dtype", None))]
    lacking = len(native) < len(formats)
    return max([13] + native + ([21] if blocked or lacking else []))


class Stages:
    """Runs named stages, timing each, for the report's pass list."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        # (stage name, onnxruntime exception) -> the exception to raise instead (`runtime_refusal`)
        self.on_runtime_error: Callable[[str, Exception], Exception] | None = None

    def run(self, name: str, fn: Callable, *args):
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:
            if self.on_runtime_error is None or not is_runtime_error(e):
                raise
            raise self.on_runtime_error(name, e) from None
        modified = getattr(out, "modified", None)
        self.entries.append({"name": name, "seconds": round(time.perf_counter() - t0, 4), **({"modified": modified} if modified is not None else {})})
        log.info("%-28s %.3fs", name, self.entries[-1]["seconds"])
        return out


def runtime_refusal(source, data: Dataset, stage: str, error: Exception) -> Exception:
    """What to raise when onnxruntime fails in a stage: if onnxruntime cannot run the *source*
    model either (on one sample of `data`), a one-line refusal; otherwise the failure is
    qcompile's (a model it prepared does not run), reported as an internal RuntimeError."""
    from qcompile.backends.onnxruntime.session import make_session

    def first(e: Exception) -> str:
        lines = str(e).strip().splitlines()
        return (lines[0] if lines else type(e).__name__)[:300]

    try:
        sess = make_session(load_model(source), level="all")
        batch = next(iter(data.batches(1)), None)
        if batch is not None:
            sess.run(None, batch)
    except Exception as e:
        if not is_runtime_error(e):
            raise
        return UnsupportedModelError(f"onnxruntime cannot run the source model: {first(e)}")
    return RuntimeError(f"onnxruntime fails on the model qcompile prepared (stage {stage}): {first(error)}")


def calibrate_plan(model: ir.Model, plan: QuantPlan, data: Dataset, batch_size: int = 8, progress=None,
                   caps: Capabilities = CAPABILITIES) -> QuantPlan:
    """Fill the clip of every activation spec without one, from histograms of the value itself or,
    when its scale propagates through shape ops (`caps.shape_op_qdq_drop`), of its tie heads.
    A value the data never computes (in an If branch no sample takes) keeps no clip (`uncalibrated`)."""
    specs = {v: s for v, s in plan.activation_specs().items() if s.clip is None and not s.dynamic}
    if not specs:
        return plan
    by_name = all_values(model.graph)
    heads = {
        v: [h.name for h in tie_heads(by_name[v])[1]] if getattr(s.fmt, "onnx_dtype", None) in caps.shape_op_qdq_drop else [v]
        for v, s in specs.items()
    }
    hists = collect(model, sorted({h for hs in heads.values() for h in hs}), data.batches(batch_size), progress)
    clips = {}
    for v, spec in specs.items():
        h = hists[heads[v][0]]
        for other in heads[v][1:]:
            h.merge(hists[other])
        if h.count:
            clips[v] = choose_clip(h, spec.format, spec.symmetric, spec.method)
    return plan.with_clips(clips)


def uncalibrated(model: ir.Model, plan: QuantPlan) -> dict[str, tuple[str, str]]:
    """Plan node -> (op type, reason) for nodes with an activation that calibration never saw."""
    out = {}
    for name, node in plan.nodes.items():
        quants = [*node.inputs.values(), *([node.output] if node.output else [])]
        if any(q.role == "activation" and q.spec.clip is None and not q.spec.dynamic for q in quants):
            where = next((location(n, model.graph) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == name), None)
            out[name] = (node.op_type, "not computed on the calibration data" + (f" (in {where})" if where else ""))
    return out


def _without(plan: QuantPlan, names) -> QuantPlan:
    return QuantPlan(plan.target, {k: v for k, v in plan.nodes.items() if k not in names}, plan.smoothing)


def smoothing_scales(model: ir.Model, plan: QuantPlan, data: Dataset, batch_size: int = 8) -> dict[str, list[float]]:
    """SmoothQuant scales per activation: per-channel maxima and sample rows from the calibration
    data, then a per-value search over candidate scales (`choose_scales`)."""
    names = sorted(smoothable(model.graph, plan))
    if not names:
        return {}
    amax, rows = channel_stats(stream_values(model, names, data.batches(batch_size)), names)
    return {k: v.tolist() for k, v in choose_scales(model.graph, plan, amax, rows).items()}


def apply_smoothing(model: ir.Model, plan: QuantPlan) -> QuantPlan:
    """Run SmoothQuantPass with the plan's scales; returns the plan naming the smoothed graph."""
    p = SmoothQuantPass(plan, {k: np.asarray(v, dtype=np.float32) for k, v in plan.smoothing.items()})
    p(model)
    return p.new_plan


def bias_means(model: ir.Model, plan: QuantPlan, data: Dataset, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per-channel means of the correctable layers' inputs on the calibration data (BiasCorrectionPass)."""
    targets = correctable(model.graph, plan)
    if not targets:
        return {}
    ops = {n.name: n.op_type for n in model.graph}
    axes = {}
    for node, value in targets.items():
        axes[value] = 1 if ops[node] == "Conv" else -1
    names = sorted(axes)
    return channel_means(stream_values(model, names, data.batches(batch_size)), names, axes)


def activation_sqnr(model: ir.Model, plan: QuantPlan, data: Dataset, batch_size: int = 8) -> dict[str, float]:
    """Quantization SQNR (dB) of every planned activation on `data`, measured in the float model."""
    specs = plan.activation_specs()
    if not specs:
        return {}
    acc = {v: [0.0, 0.0] for v in specs}
    for _, values in stream_values(model, list(specs), data.batches(batch_size)):
        for v, x in values.items():
            x64 = x.astype(np.float64)
            acc[v][0] += float(np.sum(x64**2))
            acc[v][1] += float(np.sum((x64 - simulate(x, specs[v])) ** 2))
    return {v: (float("inf") if n == 0 else round(10 * np.log10(max(sig, 1e-300) / n), 3)) for v, (sig, n) in acc.items()}


def _emit(model: ir.Model, caps: Capabilities) -> None:
    """Within onnxruntime's limits: IR version <= caps.max_ir_version, checked by onnx.checker."""
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    need = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = min(max(model.ir_version, need), caps.max_ir_version)


def check_model(model: ir.Model) -> None:
    """onnx.checker on the model's structure. A model with external weights or past
    FILE_SESSION_BYTES is checked as a file (`external.session_path`: weights referenced in place,
    never one protobuf of them in memory); a small one as a proto."""
    try:
        if external.external_tensors(model) or external.weight_bytes(model) > FILE_SESSION_BYTES:
            with external.session_path(model) as path:
                onnx.checker.check_model(str(path), full_check=False)
        else:
            onnx.checker.check_model(ir.to_proto(model), full_check=False)
    except onnx.checker.ValidationError as e:
        raise QCompileError(f"compiled model fails onnx.checker: {str(e).splitlines()[0]}") from None


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


model_bytes = external.weight_bytes


def compile(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    target: str | Target = "int8",
    calib=None,
    eval=None,
    plan: QuantPlan | str | os.PathLike | None = None,
    samples: int | None = None,
    seed: int = 0,
    validate: bool = True,
    min_sqnr: float | None = None,
    options: PlanOptions = PlanOptions(),
    batch_size: int = 8,
    caps: Capabilities = CAPABILITIES,
    progress: Callable | None = None,
    lowering: str = "auto",
    accuracy_level: int | str = "auto",
    cpu: str | Cpu = Cpu.PORTABLE,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    max_float: float = restore.BUDGET,
) -> CompileResult:
    """Quantize `model` for `target`; see the README for the data flow.

    lowering: how weights in formats onnxruntime lacks (and integer weights) are emitted:
    "function" (packed codes + a qcompile.Dequantize* function op), "integer" (exact MatMulNBits
    digit planes wherever possible), "auto" (integer for one plane, or two when the activation is
    one row per sample; `Capabilities.nbits_auto_max_planes*`), "native"
    (MXFP4/NVFP4 and float8 MatMul weights in the C++ ops of `qcompile.native`, built on demand,
    other weights as "auto"; every activation quantizer not fused into them as a native FakeQuant
    op; the compiled model then needs that library registered in its session).
    accuracy_level: MatMulNBits' accuracy_level: 0 computes in float (the output equals the
    simulation), 4 quantizes activations to int8 inside the kernel (faster, ~5e-3 relative error),
    "auto" is 4 where validation measures its change >= 20 dB below the weight error, else 0
    (`backends/onnxruntime/accuracy_level.py`; report["accuracy_level"] says which and why).
    cpu: the deployment CPU (`qcompile.cpu.Cpu`): "portable" (default) emits int8 layers whose
    integer results are the same on every CPU (no int16 pair of the non-VNNI x86 kernels can
    saturate: reduction channels renumbered where the graph allows, `PairPermutationPass`, else
    the scale of the few offending weight channels grown, `weights.py`); "vnni" drops the
    constraint; "native" is this machine's class.
    input_shapes: {input name: dims} fixing dims the model leaves free, for synthesized data
    (`qcompile.data`).

    calib / eval: an `.npz` path, a directory of them, a {input: array} dict, or a Dataset.
    Without calib, inputs are synthesized (and a warning is logged); without eval, the last
    `HELD_OUT` calibration samples are held out and never used for calibration.
    max_float: when the compiled model misses the gate, the share of the quantized weights (by
    float bytes) that may go back to float, most sensitive layers first, measured one layer at a
    time (`qcompile.restore`; report["restored"] lists them); 0 never restores.
    Raises ValidationFailed (carrying the report) when an output's SQNR is below the tolerance.
    """
    t0 = time.perf_counter()
    if not 0 <= max_float <= 1:
        raise InputError(f"max_float must be a share of the weights in [0, 1], got {max_float!r}")
    args = dict(model=model, target=target, calib=calib, eval=eval, plan=plan, samples=samples, seed=seed,
                validate=validate, min_sqnr=min_sqnr, batch_size=batch_size, caps=caps, progress=progress,
                lowering=lowering, accuracy_level=accuracy_level, cpu=cpu, input_shapes=input_shapes)
    attempt = _compile_once(options=options, probe=max_float > 0, **args)
    result = attempt.result
    if not result.passed and attempt.simulator is not None:
        result = _restore(attempt, options, max_float, args)
    result.report["compile_seconds"] = round(time.perf_counter() - t0, 3)
    result.report["peak_rss_bytes"] = _rss_peak()
    if not result.passed:
        v = result.report["verdict"]
        worst = ", ".join(f"{r['node']} ({_worst(r):.1f} dB)" for r in v["worst_layers"][:3])
        kept = result.report.get("restored", {}).get("layers", [])
        note = f" with {len(kept)} layers restored to float" if kept else ""
        raise ValidationFailed(
            f"output SQNR {v['worst_output_sqnr_db']:.2f} dB is below {v['min_sqnr_db']} dB "
            f"for target {result.report['target']}{note}; worst layers: {worst}",
            result.report,
            result,
        )
    return result


def _restore(attempt: "_Attempt", options: PlanOptions, budget: float, args: dict) -> CompileResult:
    """Recompile with the most sensitive layers in float (`qcompile.restore`) until the gate holds,
    at most `restore.MAX_ROUNDS` times; the last result (passed or not) carries report["restored"]."""
    t0 = time.perf_counter()
    first = attempt.result
    sim = attempt.simulator()
    sens = restore.measure(sim, attempt.float_bytes)
    gate = first.report["verdict"]["min_sqnr_db"]
    goal, result, kept, simulated = gate + restore.MARGIN_DB, first, (), None
    share = lambda names: sum(sens.float_bytes[n] for n in names) / max(sum(sens.float_bytes.values()), 1)  # noqa: E731
    for _ in range(restore.MAX_ROUNDS):
        pick = restore.choose(sim, sens, goal, budget, kept)
        if pick is None:
            log.info("restore: no layers within %g%% of the weights reach %.1f dB in simulation", budget * 100, goal)
            break
        kept, simulated = tuple(pick[0]), pick[1]
        log.warning("%s: output %.2f dB < %s dB; keeping %d of %d layers in float (the most sensitive, %.2f%% of the "
                    "weights): %s", first.report["target"], first.report["verdict"]["worst_output_sqnr_db"], gate,
                    len(kept), len(sens.noise), 100 * share(kept), ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else ""))
        result = _compile_once(options=dataclasses.replace(options, restored=options.restored + kept), probe=False,
                               **args).result
        if result.passed:
            break
        goal += simulated - result.report["verdict"]["worst_output_sqnr_db"]  # the held-out shortfall
    if kept:
        result.report["restored"] = {
            "first_sqnr_db": first.report["verdict"]["worst_output_sqnr_db"],
            "simulated_sqnr_db": simulated,
            "budget": budget,
            "weight_share": round(share(kept), 6),
            "samples": sim.samples,
            "simulations": sim.runs,
            "seconds": round(time.perf_counter() - t0, 3),
            "layers": [{"node": n, "alone_sqnr_db": sens.alone_sqnr_db(n), "float_bytes": sens.float_bytes[n]} for n in kept],
        }
    return result


@dataclass
class _Attempt:
    result: CompileResult
    simulator: Callable[[], restore.Simulator] | None = None  # offered when the result missed its gate
    float_bytes: dict[str, int] = field(default_factory=dict)  # per plan node: its weights' float bytes


def _compile_once(
    model, target, calib, eval, plan, samples, seed, validate, min_sqnr, options: PlanOptions, batch_size, caps,
    progress, lowering, accuracy_level, cpu, input_shapes, probe: bool,
) -> _Attempt:
    """One compile (`compile` without restoring). probe: when the result misses its gate, offer the
    per-layer sensitivity measurement of `qcompile.restore` (not for a replayed plan or a model past
    `restore.MAX_WEIGHT_BYTES`)."""
    t0 = time.perf_counter()
    if accuracy_level != "auto" and accuracy_level not in range(5):
        raise InputError(f"accuracy_level must be 'auto' or 0..4, got {accuracy_level!r}")
    tgt = get_target(target) if isinstance(target, str) else target
    try:
        deploy = Cpu(cpu).resolve()
    except ValueError:
        raise InputError(f"unknown cpu {cpu!r}; one of {', '.join(c.value for c in Cpu if c is not Cpu.ARM64)}") from None
    options = dataclasses.replace(options, cpu=deploy.value)
    if lowering == "native":
        from qcompile import native

        try:
            native.build()
        except native.NativeUnavailable as e:
            raise QCompileError(f"--lowering native: the native library is unavailable: {e}") from None
    stages = Stages()
    stages.on_runtime_error = lambda stage, e: runtime_refusal(model, calib_ds, stage, e)
    source = str(model) if isinstance(model, (str, os.PathLike)) else None
    m = stages.run("load", load_model, model)
    if not has_compute(m):  # refused before any pass runs (cheap on the many models with none)
        raise UnsupportedModelError(nothing_to_quantize(tgt, {}))
    inputs = InputInfo.of_model(m, input_shapes)

    calib_ds = _as_dataset(calib, inputs)
    synthesized = calib_ds is None
    eval_ds = _as_dataset(eval, inputs)
    if synthesized:
        n = samples or SYNTH_SAMPLES
        log.warning("no calibration data given: synthesizing %d random inputs from the model's input types; "
                    "ranges (and the validation verdict) will not reflect real data", n)
        calib_ds = ArrayDataset(synthesize(inputs, n, seed), inputs)
        if eval_ds is None:
            eval_ds = ArrayDataset(synthesize(inputs, HELD_OUT, seed + 1), inputs)
    if eval_ds is None:
        held = min(HELD_OUT, len(calib_ds) // 4)
        if held == 0 and validate:
            raise InputError("calibration data has too few samples to hold some out for validation; give --eval")
        eval_ds = calib_ds.take(len(calib_ds) - held)
        calib_ds = calib_ds.take(0, len(calib_ds) - held)
    if samples is not None:
        calib_ds = calib_ds.take(0, samples)

    if plan is not None and not isinstance(plan, QuantPlan):
        plan = QuantPlan.load(plan)
    if plan is None:
        opset = _required_opset(tgt.formats(), tgt.weights.granularity == "block", caps)
    else:
        specs = [q.spec for n in plan.nodes.values() for q in [*n.inputs.values(), *([n.output] if n.output else [])]]
        opset = _required_opset([s.fmt for s in specs], any(isinstance(s.granularity, PerBlock) for s in specs), caps)
    stages.run("InlinePass", common_passes.InlinePass(), m)  # model-local functions: their nodes become the graph's
    promote = PromoteFloatPass()
    stages.run(repr(promote), promote, m)
    check = calib_ds.take(0, CONVERSION_SAMPLES)
    stages.run("ConvertOpsetPass", ConvertOpsetPass(opset, caps.max_opset, check.batches(batch_size)), m)
    conversion = pop_record(m)  # {from, to, max_abs_err, max_rel_err} when the opset was raised
    if conversion is not None:
        conversion["samples"] = len(check)
    stages.run("NormalizePass", NormalizePass(opset, caps.max_opset), m)
    stages.run("FoldConstantOfShapePass", FoldConstantOfShapePass(), m)
    stages.run("FoldBatchNormPass", FoldBatchNormPass(), m)
    float_proto = ir.to_proto(m) if validate else None

    replay = plan is not None
    if not replay:
        plan = stages.run("plan", make_plan, m, tgt, options, caps)
    else:
        graph_nodes = {n.name for n in ir.traversal.RecursiveGraphIterator(m.graph)}
        unknown = [n for n in plan.nodes if n not in graph_nodes]
        if unknown:
            raise InputError(f"plan names nodes not in the model: {unknown[:3]}")
    if deploy is Cpu.VNNI and caps.pair_bound("portable", parse_format(tgt.weights.format).onnx_dtype,
                                             parse_format(tgt.activations.format) if tgt.activations else None):
        log.warning("--cpu vnni: the int8 layers are validated on this CPU's kernels only; on x86 CPUs without VNNI "
                    "their int16 pair sums can saturate (use --cpu portable for a model that runs the same everywhere)")
    kept = kept_in_float(m, tgt, options, plan)
    if not plan.nodes:
        raise UnsupportedModelError(nothing_to_quantize(tgt, kept))
    if tgt.smooth and not replay:
        plan.smoothing = stages.run("smoothing-search", smoothing_scales, m, plan, calib_ds, batch_size)
    work = stages.run("SmoothQuantPass", apply_smoothing, m, plan) if plan.smoothing else plan
    if any(q.spec.pairs is not None for n in work.nodes.values() for q in n.inputs.values()):
        stages.run("PairPermutationPass", PairPermutationPass(work), m)
    work = stages.run("calibrate", calibrate_plan, m, work, calib_ds, batch_size, progress, caps)
    unseen = uncalibrated(m, work)
    if unseen:
        kept.update(unseen)
        work, plan = _without(work, unseen), _without(plan, unseen)
        if not work.nodes:
            raise UnsupportedModelError(nothing_to_quantize(tgt, kept))
    snapshot = restore.snapshot(m) if probe and validate and not replay and model_bytes(m) <= restore.MAX_WEIGHT_BYTES else None
    quantized = WeightCache()  # each weight's scale search runs once (bias correction, then Q/DQ)
    means = stages.run("bias-means", bias_means, m, work, calib_ds, batch_size) if tgt.bias_correction else None
    if means:
        stages.run("BiasCorrectionPass", BiasCorrectionPass(work, means, quantized), m)
    plan = plan.with_specs_of(work)  # the plan to save names the original graph's values
    act_sqnr = stages.run("activation-sqnr", activation_sqnr, m, work, eval_ds, batch_size) if validate else {}

    insert = InsertQDQPass(work, caps, quantized)
    stages.run(repr(insert), insert, m)
    stages.run("LowerForOnnxruntimePass", LowerForOnnxruntimePass(caps), m)
    nb = LowerToMatMulNBitsPass(insert.stored, lowering, 0 if accuracy_level == "auto" else accuracy_level,
                                insert.block_activations, caps)
    stages.run(repr(nb), nb, m)
    insert.stored.clear()  # the weights' unpacked codes: the graph holds what is emitted
    if lowering == "native":
        stages.run("NativeFakeQuantPass", NativeFakeQuantPass(), m)
    if promote.source_type is not None:
        stages.run("StoreHalfPass", StoreHalfPass(promote.source_type), m)
    stages.run("emit", _emit, m, caps)
    stages.run("onnx.checker", check_model, m)

    layers = _layer_table(work, insert, act_sqnr, nb.lowered)
    layers += [{"node": name, "op_type": op, "kept_float": reason} for name, (op, reason) in kept.items()]
    report = {
        "schema": REPORT_SCHEMA,
        "qcompile": __version__,
        "input": source,
        "target": tgt.name,
        "cpu": deploy.value,
        "calibration": {"samples": len(calib_ds), "synthesized": synthesized},
        **({"opset_conversion": conversion} if conversion is not None else {}),
        "sizes": {"float_weight_bytes": None, "quantized_weight_bytes": model_bytes(m)},
        "layers": layers,
    }
    if validate:
        float_model = ir.from_proto(float_proto)
        if source is not None:  # weights left in the input's external data file
            ir.external_data.set_base_dir(float_model.graph, Path(source).resolve().parent)
        report["sizes"]["float_weight_bytes"] = model_bytes(float_model)
        reference = stages.run("float-reference", reference_outputs, float_model, output_names(float_model, m),
                               eval_ds, batch_size)
    if accuracy_level == "auto":
        report["accuracy_level"] = stages.run("accuracy-level", choose_accuracy_level,
                                              float_model if validate else None, m, eval_ds, batch_size,
                                              reference if validate else None)
    if validate:
        report["outputs"] = stages.run("validate", compare, float_model, m, eval_ds, batch_size, None, reference)
        report["validation"] = {"samples": len(eval_ds), "session": "onnxruntime ENABLE_ALL, 1 thread",
                                "host_cpu": host_description()}
        v = verdict(report["outputs"], tgt.min_sqnr_db if min_sqnr is None else min_sqnr)
        v["worst_layers"] = sorted(layers, key=_worst)[:5]
        report["verdict"] = v
    report["passes"] = stages.entries
    report["compile_seconds"] = round(time.perf_counter() - t0, 3)
    if promote.interface:
        stages.run("HalfInterfacePass", HalfInterfacePass(promote.interface), m)
    result = CompileResult(m, plan, report)
    if snapshot is None or report["verdict"]["passed"]:
        return _Attempt(result)
    float_bytes: dict[str, int] = {}
    for r in insert.records:
        float_bytes[r.node] = float_bytes.get(r.node, 0) + r.float_bytes
    return _Attempt(result, lambda: restore.Simulator(snapshot, work, means, calib_ds, batch_size, caps), float_bytes)


def _worst(row: dict) -> float:
    vals = [v for v in (row.get("activation_sqnr_db"), row.get("weight_sqnr_db")) if v is not None]
    return min(vals) if vals else float("inf")


def _layer_table(plan: QuantPlan, insert: InsertQDQPass, act_sqnr: dict[str, float], lowered: dict[str, int]) -> list[dict]:
    rows = []
    recs = {}
    for r in insert.records:
        recs.setdefault(r.node, r)
    for name, node in plan.nodes.items():
        row: dict = {"node": name, "op_type": node.op_type}
        r = recs.get(name)
        if r is not None:
            row.update(weight=r.value, weight_format=r.format, weight_granularity=r.granularity,
                       weight_sqnr_db=round(r.weight_sqnr_db, 3), float_bytes=r.float_bytes,
                       quant_bytes=int(lowered.get(name, r.quant_bytes)),  # a kernel's layout may store more
                       emission="com.microsoft.MatMulNBits" if name in lowered else r.emission)
            if r.pairs is not None:
                row["int16_pairs"] = r.pairs
        acts = [q for q in node.inputs.values() if q.role == "activation"]
        if acts:
            row["activation_format"] = acts[0].spec.format
            vals = [act_sqnr[q.value] for q in acts if q.value in act_sqnr]
            if vals:
                row["activation_sqnr_db"] = min(vals)
        rows.append(row)
    return rows


def save_model(model: ir.Model, path: str | os.PathLike, external_data: str = "auto",
               threshold: int = external.PROTO_LIMIT) -> int:
    """Write atomically; returns the bytes written (model file + external data file).

    external_data: "always" (tensors in `<path>.data`), "never" (one protobuf, refused past 2 GB)
    or "auto": external when the weights exceed `threshold` bytes or the input used external data
    (`qcompile.external.save`). The output never refers to the input's files and never overwrites them.
    """
    try:
        return external.save(model, path, external_data, threshold)
    except ValueError as e:
        raise InputError(str(e)) from None


__all__ = ["compile", "CompileResult", "load_model", "save_model", "calibrate_plan"]
