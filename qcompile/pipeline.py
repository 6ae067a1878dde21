"""The compile pipeline: `compile` resolves the settings, builds the declared stage list of the
target (`stages.pipeline_for`) and runs it over one `CompileContext` (`run_stages`); when the
result misses its gate, `_restore` recompiles with the most sensitive layers in float.

The library never exits and never prints; the CLI maps the typed exceptions of `qcompile.errors`
to exit codes.
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

import onnx
import onnx_ir as ir

from qcompile import external, restore
from qcompile.analyze import PlanOptions
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES, Capabilities
from qcompile.backends.onnxruntime.session import is_runtime_error
from qcompile.context import ROTATE_MODES, Allocation, CompileContext, Settings, Transforms
from qcompile.cpu import Cpu
from qcompile.data import Dataset
from qcompile.errors import (
    InputError,
    QCompileError,
    UnsupportedModelError,
    ValidationFailed,
)
from qcompile.passes.insert_qdq import layer_records
from qcompile.plan import QuantPlan
from qcompile.stages import (
    HELD_OUT,
    REPORT_SCHEMA,
    Stage,
    as_dataset,
    calibrate_plan,
    load_model,
    pipeline_for,
    required_opset,
    required_opset_for,
    worst_sqnr,
)
from qcompile.targets import Target, get_target

log = logging.getLogger(__name__)
__all__ = ["compile", "CompileResult", "load_model", "save_model", "calibrate_plan", "settings_for", "run_stages",
           "HELD_OUT", "REPORT_SCHEMA", "required_opset", "required_opset_for", "as_dataset"]


@dataclass
class CompileResult:
    model: ir.Model
    plan: QuantPlan
    report: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verdict", {}).get("passed", True))


def runtime_refusal(source, data: Dataset | None, stage: str, error: Exception) -> Exception:
    """What to raise when onnxruntime fails in a stage: if onnxruntime cannot run the *source*
    model either (on one sample of `data`), a one-line refusal; otherwise the failure is
    qcompile's (a model it prepared does not run), reported as an internal RuntimeError."""
    from qcompile.backends.onnxruntime.session import make_session

    def first(e: Exception) -> str:
        lines = str(e).strip().splitlines()
        return (lines[0] if lines else type(e).__name__)[:300]

    try:
        sess = make_session(load_model(source), level="all")
        batch = next(iter(data.batches(1)), None) if data is not None else None
        if batch is not None:
            sess.run(None, batch)
    except Exception as e:
        if not is_runtime_error(e):
            raise
        return UnsupportedModelError(f"onnxruntime cannot run the source model: {first(e)}")
    return RuntimeError(f"onnxruntime fails on the model qcompile prepared (stage {stage}): {first(error)}")


def run_stages(ctx: CompileContext, stages: list[Stage]) -> CompileContext:
    """Run `stages` in order on `ctx`: each timed and listed in ctx.entries (with the `modified` of
    a pass), skipped when its `when` says so, the model written after it when its name is in
    `settings.dump_after`; an onnxruntime failure becomes `runtime_refusal`'s error."""
    for stage in stages:
        if stage.when is not None and not stage.when(ctx):
            continue
        t0 = time.perf_counter()
        try:
            out = stage.run(ctx)
        except Exception as e:
            if not is_runtime_error(e):
                raise
            raise runtime_refusal(ctx.source, ctx.calib, stage.name, e) from None
        modified = getattr(out, "modified", None)
        ctx.entries.append({"name": stage.name, "seconds": round(time.perf_counter() - t0, 4),
                            **({"modified": modified} if modified is not None else {}),
                            "peak_rss_bytes": _rss_peak()})  # the process's peak so far
        log.info("%-28s %.3fs", stage.name, ctx.entries[-1]["seconds"])
        if stage.name in ctx.settings.dump_after and ctx.model is not None:
            _dump(ctx, stage.name)
    return ctx


def _dump(ctx: CompileContext, stage: str) -> None:
    out = Path(ctx.settings.dump_dir or ".") / f"after-{stage}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx.model.graph.sort()
    external.save(ctx.model, out, "auto", external.PROTO_LIMIT)
    ctx.report.setdefault("dumps", {})[stage] = str(out)
    log.info("wrote the model after %s to %s", stage, out)


def settings_for(target: str | Target = "int8", *, validate: bool = True, min_sqnr: float | None = None,
                 options: PlanOptions = PlanOptions(), batch_size: int = 8, caps: Capabilities = CAPABILITIES,
                 lowering: str = "auto", accuracy_level: int | str = "auto", cpu: str | Cpu = Cpu.PORTABLE,
                 samples: int | None = None, seed: int = 0, input_shapes: dict | None = None, probe: bool = True,
                 dump_after=(), dump_dir=None, rotate: str = "none", rotate_block: int | None = None,
                 smooth: str | float | None = None, cle: bool = False, budget_bits: float | None = None,
                 budget_mb: float | None = None, candidates: str | list[str] | None = None,
                 executor: str = "process", allocator: str = "ilp", budget_latency: float | None = None,
                 max_float: float | None = None) -> Settings:
    """Validated, resolved `Settings` (the one place a compile's arguments are checked); a
    `max_float` given sets `probe` (restore only when it is above 0)."""
    if max_float is not None:
        if not (isinstance(max_float, (int, float)) and 0 <= max_float <= 1):
            raise InputError(f"max_float must be a share of the weights in [0, 1], got {max_float!r}")
        probe = max_float > 0
    from qcompile.backends.onnxruntime.kernels import LOWERINGS, Lowering

    if accuracy_level != "auto" and accuracy_level not in range(5):
        raise InputError(f"accuracy_level must be 'auto' or 0..4, got {accuracy_level!r}")
    try:
        lowering = Lowering(lowering)
    except ValueError:
        raise InputError(f"lowering must be one of {', '.join(LOWERINGS)}, got {lowering!r}") from None
    tgt = get_target(target) if isinstance(target, str) else target
    if rotate not in ROTATE_MODES:
        raise InputError(f"rotate must be one of {', '.join(ROTATE_MODES)}, got {rotate!r}")
    if rotate_block is not None and not (isinstance(rotate_block, int) and rotate_block >= 2):
        raise InputError(f"rotate_block must be an integer >= 2, got {rotate_block!r}")
    if isinstance(smooth, str) and smooth not in ("auto", "off"):
        try:
            smooth = float(smooth)
        except ValueError:
            raise InputError(f"smooth must be 'auto', 'off' or an alpha in [0, 1], got {smooth!r}") from None
    if isinstance(smooth, (int, float)) and not isinstance(smooth, bool):
        if not 0 <= smooth <= 1:
            raise InputError(f"smooth alpha must be in [0, 1], got {smooth!r}")
        smooth = float(smooth)
    elif smooth not in (None, "auto", "off"):
        raise InputError(f"smooth must be 'auto', 'off' or an alpha in [0, 1], got {smooth!r}")
    if not isinstance(cle, bool):
        raise InputError(f"cle must be True or False, got {cle!r}")
    transforms = Transforms(rotate, rotate_block, smooth, cle)
    allocation = _allocation(tgt, budget_bits, budget_mb, candidates, executor, allocator, budget_latency)
    try:
        deploy = Cpu(cpu).resolve()
    except ValueError:
        raise InputError(f"unknown cpu {cpu!r}; one of {', '.join(c.value for c in Cpu if c is not Cpu.ARM64)}") from None
    stage_names = {st.name for st in pipeline_for(Settings(tgt, options, deploy, lowering, accuracy_level, validate,
                                                           caps=caps, transforms=transforms))}
    unknown = [d for d in dump_after if d not in stage_names]
    if unknown:
        raise InputError(f"--dump-after {unknown[0]}: no such stage; stages: {', '.join(sorted(stage_names))}")
    return Settings(tgt, dataclasses.replace(options, cpu=deploy.value), deploy, lowering, accuracy_level, validate,
                    min_sqnr, samples, seed, batch_size, caps, input_shapes, probe, tuple(dump_after), dump_dir, transforms,
                    allocation)


def _allocation(tgt: Target, bits, mb, candidates, executor, method="ilp", latency=None) -> Allocation:
    """The allocation's budgets, candidates and executor, checked: only for a target with
    candidates ("auto"), which needs a budget; every candidate a known fixed target."""
    from qcompile.sweep import EXECUTORS

    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if method not in ("ilp", "greedy"):
        raise InputError(f"allocator must be 'ilp' or 'greedy', got {method!r}")
    if candidates is not None:
        candidates = tuple(c.strip() for c in (candidates.split(";") if isinstance(candidates, str) else candidates) if c.strip())
    if not tgt.candidates:
        if bits is not None or mb is not None or latency is not None or candidates:
            raise InputError(f"--budget-bits, --budget-mb, --budget-latency and --candidates are for --target auto, "
                             f"not {tgt.name}")
        return Allocation(executor=executor, method=method)
    for name, v in (("budget_bits", bits), ("budget_mb", mb), ("budget_latency", latency)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")
    if bits is None and mb is None and latency is None:
        raise InputError("--target auto needs a budget: --budget-bits (average bits per weight), --budget-mb or "
                         "--budget-latency (a ratio of float)")
    for c in candidates or ():
        if c == "float":
            continue
        try:
            t = get_target(c)
        except KeyError as e:
            raise InputError(f"candidate {c!r}: {e.args[0]}") from None
        if t.candidates or not t.quantize:
            raise InputError(f"candidate {c!r}: a candidate is a fixed quantizing target")
    return Allocation(None if bits is None else float(bits), None if mb is None else float(mb),
                      None if latency is None else float(latency), None if candidates is None else tuple(c for c in candidates if c != "float") or None, executor,
                      method)


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
    dump_after: tuple[str, ...] = (),
    dump_dir: str | os.PathLike | None = None,
    rotate: str = "none",
    rotate_block: int | None = None,
    smooth: str | float | None = None,
    cle: bool = False,
    budget_bits: float | None = None,
    budget_mb: float | None = None,
    candidates: str | list[str] | None = None,
    executor: str = "process",
    allocator: str = "ilp",
    budget_latency: float | None = None,
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
    (`qcompile/accuracy_level.py`; report["accuracy_level"] says which and why).
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
    dump_after: stage names (`qcompile explain` lists them) after which the model is written to
    `dump_dir`/after-STAGE.onnx (report["dumps"] says where).
    rotate / rotate_block: the online rotation of the activations MatMul/Gemm layers read
    (`qcompile.context.Transforms`, `qcompile/passes/rotate.py`): "none", "hadamard" or "random",
    with a power-of-two Hadamard block (None: the target's). The plan records every rotation, and
    report["transforms"] which nodes each touched.
    smooth: SmoothQuant, before the rotations (x W = ((x / s) R)(R^T diag(s) W)): None (the target's default: int8 searches), "auto"
    (the per-activation search, any target), "off", or a fixed alpha in [0, 1].
    cle: cross-layer equalization of Conv/MatMul -> (Relu|Relu6) -> Conv/MatMul chains
    (`qcompile/passes/equalize.py`), before the other transforms; the plan records its scales.
    budget_bits / budget_mb / budget_latency / candidates: target "auto" only (`qcompile.mixed`):
    the layers' average stored bits per weight, the stored weights in MB, the latency as a ratio
    of float's (measured per layer, `qcompile.latency`) the allocation must fit, and
    the candidate targets (default: the target's; float is always one); executor: where its
    sensitivity sweep runs, "process" (a local pool), "serial" or "ray" (`qcompile.sweep`);
    allocator: "ilp" (optimal) or "greedy" (the AIMET-style baseline, for comparisons).
    Raises ValidationFailed (carrying the report) when an output's SQNR is below the tolerance.
    """
    t0 = time.perf_counter()
    settings = settings_for(target, validate=validate, min_sqnr=min_sqnr, options=options, batch_size=batch_size,
                            caps=caps, lowering=lowering, accuracy_level=accuracy_level, cpu=cpu, samples=samples,
                            seed=seed, input_shapes=input_shapes, max_float=max_float, dump_after=dump_after,
                            dump_dir=dump_dir, rotate=rotate, rotate_block=rotate_block, smooth=smooth, cle=cle,
                            budget_bits=budget_bits, budget_mb=budget_mb, budget_latency=budget_latency,
                            candidates=candidates, executor=executor, allocator=allocator)
    if plan is not None and not isinstance(plan, QuantPlan):
        plan = QuantPlan.load(plan)
    if lowering == "native":
        _need_native()
    compile_once = lambda s: _run(CompileContext(s, model, calib, eval, plan, progress))  # noqa: E731
    ctx = compile_once(settings)
    result = _result(ctx)
    if not result.passed and ctx.snapshot is not None:
        result = _restore(ctx, compile_once, max_float)
    result.report["compile_seconds"] = round(time.perf_counter() - t0, 3)
    result.report["peak_rss_bytes"] = _rss_peak()
    if not result.passed:
        _fail(result)
    return result


def _run(ctx: CompileContext) -> CompileContext:
    t0 = time.perf_counter()
    run_stages(ctx, pipeline_for(ctx.settings))
    ctx.report["passes"] = ctx.entries
    ctx.report["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return ctx


def _result(ctx: CompileContext) -> CompileResult:
    return CompileResult(ctx.model, ctx.plan, ctx.report)


def _need_native() -> None:
    from qcompile import native

    try:
        native.build()
    except native.NativeUnavailable as e:
        raise QCompileError(f"--lowering native: the native library is unavailable: {e}") from None


def _fail(result: CompileResult) -> None:
    v = result.report["verdict"]
    worst = ", ".join(f"{r['node']} ({worst_sqnr(r):.1f} dB)" for r in v["worst_layers"][:3])
    kept = result.report.get("restored", {}).get("layers", [])
    note = f" with {len(kept)} layers restored to float" if kept else ""
    raise ValidationFailed(
        f"output SQNR {v['worst_output_sqnr_db']:.2f} dB is below {v['min_sqnr_db']} dB "
        f"for target {result.report['target']}{note}; worst layers: {worst}",
        result.report,
        result,
    )


def _restore(first_ctx: CompileContext, compile_once: Callable[[Settings], CompileContext], budget: float) -> CompileResult:
    """Recompile with the most sensitive layers in float (`qcompile.restore`) until the gate holds,
    at most `restore.MAX_ROUNDS` times; the last result (passed or not) carries report["restored"]."""
    t0 = time.perf_counter()
    first = _result(first_ctx)
    s = first_ctx.settings
    float_bytes: dict[str, int] = {}
    for r in layer_records(first_ctx.model.graph):
        float_bytes[r.node] = float_bytes.get(r.node, 0) + r.float_bytes
    sim = restore.Simulator(first_ctx.snapshot, first_ctx.work, first_ctx.means, first_ctx.calib, s.batch_size, s.caps)
    sens = restore.measure(sim, float_bytes)
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
        again = dataclasses.replace(s, options=dataclasses.replace(s.options, restored=s.options.restored + kept),
                                    probe=False)
        result = _result(compile_once(again))
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
