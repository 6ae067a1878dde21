"""The compile as data: every stage a compile can run, and `pipeline_for`, which declares the list a
given target and settings run, top to bottom.

A stage is a name, a function of the `CompileContext` and an optional condition read at run time
(`when`: e.g. SmoothQuantPass only when the search chose any scales). `qcompile.pipeline.run_stages`
runs the list: timing, progress, `--dump-after STAGE`, the report's pass list. `qcompile explain`
prints it without running it.

    front      load, data, InlinePass, PromoteFloatPass, ConvertOpsetPass, NormalizePass,
               FoldConstantOfShapePass, FoldBatchNormPass, float-snapshot
    plan       plan, equalization, CrossLayerEqualizationPass, fused-rotation, LayerNormToRMSNormPass,
               FusedResidualRotationPass, smoothing-search, SmoothQuantPass, rotation, OnlineRotationPass,
               PairPermutationPass, calibrate, restore-snapshot, BiasCorrectionPass
               (target "none": the transforms only, then emit and validate)
    quantize   InsertQDQPass
    backend    the backend's lowering passes (`qcompile.backends.onnxruntime.backend.lowering_passes`)
    emit       StoreHalfPass, emit, onnx.checker
    validate   float-reference, layer-table, accuracy-level, validate
    finish     HalfInterfacePass, finish
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile import __version__, external, restore
from qcompile.analyze import (
    has_compute,
    kept_in_float,
    make_plan,
    nothing_to_quantize,
    plan_on,
    tie_heads,
)
from qcompile.calibrate import Histogram, choose_clip, simulate
from qcompile.context import CompileContext, Settings
from qcompile.cpu import Cpu
from qcompile.data import ArrayDataset, Dataset, InputInfo, synthesize
from qcompile.errors import InputError, QCompileError, UnsupportedModelError
from qcompile.formats import BlockFormat, parse_format
from qcompile.passes import equalize, residual_rotate
from qcompile.passes.bias_correction import (
    BiasCorrectionPass,
    channel_means,
    correctable,
)
from qcompile.passes.convert_opset import ConvertOpsetPass, pop_record
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.fold_constant_of_shape import FoldConstantOfShapePass
from qcompile.passes.insert_qdq import InsertQDQPass, layer_records
from qcompile.passes.layernorm_to_rmsnorm import LayerNormToRMSNormPass
from qcompile.passes.normalize import NormalizePass
from qcompile.passes.pair_permute import PairPermutationPass
from qcompile.passes.promote_float import (
    INTERFACE_KEY,
    SOURCE_TYPE_KEY,
    HalfInterfacePass,
    PromoteFloatPass,
    StoreHalfPass,
    interface,
    source_type,
)
from qcompile.passes.rotate import (
    ROTATED_KEY,
    ROTATION_IN_VALUES_KEY,
    ROTATION_KEY,
    OnlineRotationPass,
    choose_rotations,
    emitted_rotation,
    order_free,
    rotatable,
    rotated_name,
)
from qcompile.passes.smooth_quant import (
    SMOOTHED_KEY,
    SMOOTHING_KEY,
    SmoothQuantPass,
    channel_stats,
    channel_weight_maxima,
    choose_scales,
    smoothable,
    smoothing_scales,
)
from qcompile.plan import PerBlock, PerChannel, PerTensor, QuantPlan
from qcompile.targets import get_target
from qcompile.rotation import DEFAULT_BLOCK, Rotation, block_for
from qcompile.statistics import collect, histogrammed, release_memory, stream_values
from qcompile.streams import find_streams
from qcompile.sweep import sweep
from qcompile.subgraphs import all_values, location
from qcompile.validate import compare, output_names, verdict

log = logging.getLogger(__name__)
REPORT_SCHEMA = "qcompile.report/1"
HELD_OUT = 64  # samples held out of the calibration data when no --eval is given
SYNTH_SAMPLES = 64  # synthesized calibration samples when no data is given
CONVERSION_SAMPLES = 8  # calibration samples on which an opset conversion is checked
# held-out samples the per-layer activation SQNR (a diagnostic of the report) is measured on: an
# energy ratio, steady well before 64 samples, while simulating every activation of a CNN on all
# held-out images costs more than the rest of validation (EfficientNet-Lite0, 256 images: ~20 s)
ACTIVATION_SQNR_SAMPLES = 64
# The smoothing search reads this many calibration samples (spread over the data), or more when they
# do not fill SEARCH_ROWS rows (`_smoothing_stats`): the rows fill from ~24 MiniLM sentences, and
# outlier channels, which decide the scales, are systematic, so the channel maxima of 32 samples set
# them about as well as those of every sample (MiniLM int8, 256 + 256 sentences: 22.64 dB, against
# 21.66 dB reading all 256) for an eighth of the forward passes.
SMOOTH_SAMPLES = 32
SEARCH_ROWS = 2048  # sample rows of each smoothable activation the search scores candidates on


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[CompileContext], object]  # may return a PassResult (its `modified` goes to the report)
    when: Callable[[CompileContext], bool] | None = None  # checked just before running; None: always
    doc: str = ""
    group: str = ""  # front / plan / quantize / backend / emit / report / validate (set by pipeline_for)

    def __repr__(self) -> str:
        return self.name


def pass_stage(name: str, make: Callable[[CompileContext], ir.passes.PassBase], when=None, doc: str = "") -> Stage:
    """A stage running the pass `make(ctx)` builds (from settings and what earlier stages learned)."""
    return Stage(name, lambda ctx: make(ctx)(ctx.model), when, doc)


BACKEND_GROUPS = ("backend", "emit", "finish")  # what `qcompile.lower` runs on a saved Q/DQ model


# --- front: load, data, exact normalizations ----------------------------------------------------
def load_model(source) -> ir.Model:
    """An onnx_ir model from a path (external data stays memory-mapped), a ModelProto or a Model."""
    from google.protobuf.message import DecodeError

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


def as_dataset(data, inputs: list[InputInfo]) -> Dataset | None:
    """A Dataset from what a caller may pass as data: None, a Dataset, {input: array} or a path."""
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        return ArrayDataset(data, inputs)
    return Dataset(data, inputs)


def _load(ctx: CompileContext) -> None:
    ctx.model = load_model(ctx.source)
    if not has_compute(ctx.model):  # refused before any pass runs (cheap on the many models with none)
        raise UnsupportedModelError(nothing_to_quantize(ctx.settings.target, {}))
    ctx.inputs = InputInfo.of_model(ctx.model, ctx.settings.input_shapes)


def _data(ctx: CompileContext) -> None:
    """Calibration and held-out data: given, synthesized (with a warning), or held out of calib."""
    s = ctx.settings
    calib, held = as_dataset(ctx.calib_arg, ctx.inputs), as_dataset(ctx.eval_arg, ctx.inputs)
    ctx.synthesized = calib is None
    if ctx.synthesized:
        n = s.samples or SYNTH_SAMPLES
        log.warning("no calibration data given: synthesizing %d random inputs from the model's input types; "
                    "ranges (and the validation verdict) will not reflect real data", n)
        calib = ArrayDataset(synthesize(ctx.inputs, n, s.seed), ctx.inputs)
        if held is None:
            held = ArrayDataset(synthesize(ctx.inputs, HELD_OUT, s.seed + 1), ctx.inputs)
    if held is None:
        n_held = min(HELD_OUT, len(calib) // 4)
        if n_held == 0 and s.validate:
            raise InputError("calibration data has too few samples to hold some out for validation; give --eval")
        held = calib.take(len(calib) - n_held)
        calib = calib.take(0, len(calib) - n_held)
    if s.samples is not None:
        calib = calib.take(0, s.samples)
    ctx.calib, ctx.eval = calib, held
    ctx.opset = required_opset(ctx)


def required_opset_for(formats: list, blocked: bool, caps) -> int:
    """The lowest default-domain opset whose Q/DQ covers `formats` (blocked Q/DQ needs 21, and so
    do the qcompile function ops that formats without a native Q/DQ use)."""
    native = [caps.min_opset(f.onnx_dtype) for f in formats if caps.qdq_native(getattr(f, "onnx_dtype", None))]
    lacking = len(native) < len(formats)
    return max([13] + native + ([21] if blocked or lacking else []))


def required_opset(ctx: CompileContext) -> int:
    """`required_opset_for` the formats of the target, or of the replayed plan."""
    if ctx.plan_arg is None:
        tgt = ctx.settings.target
        blocked = any(get_target(c).weights.granularity == "block" for c in tgt.candidates) if tgt.candidates \
            else tgt.weights.granularity == "block"
        return required_opset_for(tgt.formats(), blocked, ctx.settings.caps)
    specs = [q.spec for n in ctx.plan_arg.nodes.values() for q in [*n.inputs.values(), *([n.output] if n.output else [])]]
    return required_opset_for([s.fmt for s in specs], any(isinstance(s.granularity, PerBlock) for s in specs),
                              ctx.settings.caps)


def _convert_opset(ctx: CompileContext):
    check = ctx.calib.take(0, CONVERSION_SAMPLES)
    from qcompile.backends.onnxruntime.session import make_session

    result = ConvertOpsetPass(ctx.opset, ctx.settings.caps.max_opset, check.batches(ctx.settings.batch_size),
                              session=make_session)(ctx.model)
    ctx.conversion = pop_record(ctx.model)
    if ctx.conversion is not None:
        ctx.conversion["samples"] = len(check)
    return result


def _float_snapshot(ctx: CompileContext) -> None:
    ctx.float_proto = ir.to_proto(ctx.model)


# --- plan ---------------------------------------------------------------------------------------
def _plan(ctx: CompileContext) -> None:
    s, m = ctx.settings, ctx.model
    if ctx.plan_arg is None:
        ctx.plan = make_plan(m, s.target, s.options, s.caps)
    else:
        ctx.replay, ctx.plan = True, ctx.plan_arg
        graph_nodes = {n.name for n in ir.traversal.RecursiveGraphIterator(m.graph)}
        unknown = [n for n in ctx.plan.nodes if n not in graph_nodes]
        if unknown:
            raise InputError(f"plan names nodes not in the model: {unknown[:3]}")
    tgt = s.target
    if s.deploy is Cpu.VNNI and s.caps.pair_bound("portable", parse_format(tgt.weights.format).onnx_dtype,
                                                  parse_format(tgt.activations.format) if tgt.activations else None):
        log.warning("--cpu vnni: the int8 layers are validated on this CPU's kernels only; on x86 CPUs without VNNI "
                    "their int16 pair sums can saturate (use --cpu portable for a model that runs the same everywhere)")
    ctx.kept = kept_in_float(m, tgt, s.options, ctx.plan)
    if not ctx.plan.nodes and tgt.quantize:
        raise UnsupportedModelError(nothing_to_quantize(tgt, ctx.kept))
    ctx.work = ctx.plan


def _choose_equalization(ctx: CompileContext) -> None:
    """Cross-layer equalization scales of every chain `passes.equalize.chains` finds between
    planned layers, balancing the channel ranges each quantizer sees: the producer's weights when
    they are per tensor, the consumer's, and the activation between them when it is quantized per
    tensor (its channel maxima over SMOOTH_SAMPLES calibration samples). Target "none" quantizes
    nothing, so it equalizes every chain (to check exactness)."""
    graph, plan = ctx.model.graph, ctx.plan
    found = [c for c in equalize.chains(graph) if c.producer in plan.nodes and c.consumer in plan.nodes]
    nodes = {n.name: n for n in graph}

    def absorbs(node: str, axis: int) -> bool:  # a per-channel weight quantizer along the scaled axis
        q = plan.nodes[node].inputs.get(1)
        return q is not None and isinstance(q.spec.granularity, PerChannel) and q.spec.granularity.axis == axis

    absorbed = set()
    if ctx.settings.target.quantize:  # target "none" equalizes every chain
        for c in found:
            absorbed |= {n for n, axis in ((c.producer, equalize.out_axis(nodes[c.producer])),
                                           (c.consumer, equalize.in_axis(nodes[c.consumer]))) if absorbs(n, axis)}
    reads = {nodes[c.consumer].inputs[0].name: c.consumer for c in found
             if 0 in plan.nodes[c.consumer].inputs and isinstance(plan.nodes[c.consumer].inputs[0].spec.granularity, PerTensor)}
    act_max: dict[str, np.ndarray] = {}
    if reads and plan.activation_specs():
        for _, values in stream_values(ctx.model, sorted(reads), ctx.calib.spread(SMOOTH_SAMPLES).batches(ctx.settings.batch_size)):
            for name, x in values.items():
                consumer = reads[name]
                axis = equalize.channel_axis(nodes[consumer]) % x.ndim
                m = np.abs(np.moveaxis(np.asarray(x, np.float32), axis, 0)).reshape(x.shape[axis], -1).max(axis=1)
                act_max[consumer] = np.maximum(act_max.get(consumer, 0), m)
    scales = equalize.equalization_scales(graph, found, act_max, absorbed)
    ctx.plan = dataclasses.replace(plan, equalization={k: v.tolist() for k, v in scales.items() if np.any(v != 1)})
    ctx.work = dataclasses.replace(ctx.work, equalization=ctx.plan.equalization)


def _equalize(ctx: CompileContext):
    """CrossLayerEqualizationPass with the plan's scales; the report names each chain's nodes, its
    activation (a Clip becomes Relu + a per-channel Min) and the range of its scales."""
    scales = {k: np.asarray(v, dtype=np.float32) for k, v in ctx.plan.equalization.items()}
    nodes = {n.name: n for n in ctx.model.graph}
    found = [c for c in equalize.chains(ctx.model.graph) if c.producer in scales]
    result = equalize.CrossLayerEqualizationPass(scales)(ctx.model)
    ctx.work = plan_on(ctx.model.graph, ctx.work)
    entries = ctx.report.setdefault("transforms", [])
    for c in found:
        entries.append({"transform": "equalize", "nodes": [c.producer, c.consumer],
                        "activation": nodes[c.activation].op_type if c.activation else None,
                        "scale_range": [float(scales[c.producer].min()), float(scales[c.producer].max())]})
    return result


def _choose_fused_rotations(ctx: CompileContext) -> None:
    """QuaRot R1 (+ R2) on every pre-norm residual stream `streams.find_streams` finds: R a
    Walsh-Hadamard over the largest power-of-two block of the width up to --rotate-block
    (default: the whole width), with random signs for "random"; a LayerNorm stream is first
    centered into an RMSNorm one ("layernorm"). The report gives the reason for every stream it
    refuses (online rotation then covers what it can)."""
    t = ctx.settings.transforms
    streams, reasons = find_streams(ctx.model.graph)
    chosen = {}
    for s in streams:
        block = block_for(s.width, t.rotate_block or s.width)
        if block < 2:
            reasons.append(f"{s.gather.name}: width {s.width} has no power-of-two factor")
            continue
        if len(s.kinds) > 1:
            reasons.append(f"{s.gather.name}: both RMSNorms and LayerNorms read the stream")
            continue
        seed = (ctx.settings.seed * 7919 + zlib.crc32(s.gather.name.encode())) % 2**31 if t.rotate == "random" else 0
        chosen[s.gather.name] = {"rotation": Rotation(s.width, block, t.rotate, seed).to_json(), "heads": True,
                                 **({"layernorm": True} if s.kinds == {"layer"} else {})}
    entries = ctx.report.setdefault("transforms", [])
    entries.extend({"transform": "fused-rotation", "applied": False, "reason": r} for r in reasons)
    ctx.plan = dataclasses.replace(ctx.plan, fused_rotations=chosen)
    ctx.work = dataclasses.replace(ctx.work, fused_rotations=chosen)


def _layernorm_to_rmsnorm(ctx: CompileContext):
    """LayerNormToRMSNormPass on the streams the plan's fused rotations mark "layernorm"."""
    p = LayerNormToRMSNormPass({k for k, v in ctx.plan.fused_rotations.items() if v.get("layernorm")})
    result = p(ctx.model)
    ctx.work = plan_on(ctx.model.graph, ctx.work)
    ctx.report.setdefault("transforms", []).extend(p.applied)
    return result


def _fuse_rotations(ctx: CompileContext):
    """FusedResidualRotationPass with the plan's rotations; the report lists what each touched."""
    plan = ctx.plan.fused_rotations
    streams = {s.gather.name: s for s in find_streams(ctx.model.graph)[0]}
    todo = {k: v for k, v in plan.items() if k in streams}
    p = residual_rotate.FusedResidualRotationPass({k: Rotation.from_json(v["rotation"]) for k, v in todo.items()},
                                                  {k for k, v in todo.items() if v.get("heads")})
    result = p(ctx.model)
    ctx.work = plan_on(ctx.model.graph, ctx.work)
    ctx.report.setdefault("transforms", []).extend(p.applied)
    return result


def _choose_rotations(ctx: CompileContext) -> None:
    """The rotation of every activation whose consumers all fold it (`passes.rotate.rotatable`):
    a block-diagonal Hadamard with the largest block dividing its width (`rotation.block_for`), up
    to the requested block (`Transforms.rotate_block`, else the activation format's block for block
    formats, else `rotation.DEFAULT_BLOCK`), as emitted fastest (`emitted_rotation`); a width with no
    block above 1 is left. (`OnlineRotationPass` folds a block within a head of an attention's
    merged heads into the value projection: no online op.) "auto":
    per value, none or the block (up to --rotate-block, default 128) of least quantized output error on
    the smoothing search's sample rows (`choose_rotations`). The report says what was chosen and
    why."""
    t = ctx.settings.transforms
    native = ctx.settings.lowering == "native"
    found = rotatable(ctx.model.graph, ctx.work)  # the graph's values now (smoothed ones after SmoothQuant)
    measured = {}
    if t.rotate == "auto" and found:
        from qcompile.backends.onnxruntime.session import compile_threads

        _, rows = _smoothing_stats(ctx, sorted(found))
        measured = choose_rotations(ctx.model.graph, ctx.work, rows, compile_threads(), native)
    chosen, entries = {}, ctx.report.setdefault("transforms", [])
    graph_nodes = {n.name: n for n in ctx.model.graph}
    for value, (width, consumers) in sorted(found.items()):
        fmt = ctx.work.nodes[consumers[0]].inputs[0].spec.fmt
        free = order_free(ctx.work, graph_nodes, consumers)
        requested = t.rotate_block or (fmt.block_size if isinstance(fmt, BlockFormat) else DEFAULT_BLOCK)
        block = block_for(width, requested)
        if t.rotate == "auto":  # it measures, so it tries every block up to --rotate-block (default 128)
            r, gains = measured.get(value, (None, {}))
            gains = {k: g for k, g in gains.items() if int(k.split("@")[1]) <= (t.rotate_block or DEFAULT_BLOCK)}
            best = max(gains, key=gains.get, default=None)
            r = emitted_rotation(width, int(best.split("@")[1]), native=native, order_free=free) if best is not None and gains[best] > 0 else None
            entries.append({"transform": "rotate-choice", "value": value, "nodes": consumers,
                            "chosen": f"hadamard@{r.block}" if r else "none", "gain_db": gains})
        elif block < 2:
            r = None
            entries.append({"transform": "rotate", "value": value, "nodes": consumers, "applied": False,
                            "reason": f"width {width} has no rotation block up to {requested}"})
        else:
            seed = (ctx.settings.seed * 7919 + zlib.crc32(value.encode())) % 2**31 if t.rotate == "random" else 0
            r = emitted_rotation(width, block, t.rotate, seed, native, free)
        if r is not None:
            chosen[value] = r.to_json()
    ctx.plan = dataclasses.replace(ctx.plan, rotations=chosen)
    ctx.work = dataclasses.replace(ctx.work, rotations=chosen)


def _rotate(ctx: CompileContext):
    """OnlineRotationPass with the plan's rotations; the plan is then re-read from the graph."""
    rotations = {v: Rotation.from_json(d) for v, d in ctx.plan.rotations.items()}
    quantized = None if ctx.settings.target.quantize else set()  # target "none" quantizes nothing
    result = OnlineRotationPass(ctx.work, rotations, native=ctx.settings.lowering == "native", quantized=quantized)(ctx.model)
    ctx.work = plan_on(ctx.model.graph, ctx.work)
    entries = ctx.report.setdefault("transforms", [])
    graph = list(ctx.model.graph)
    for value, d in sorted(ctx.plan.rotations.items()):
        entries.append({"transform": "rotate", "value": value, "rotation": d,
                        "nodes": sorted(n.name for n in graph if n.metadata_props.get(ROTATED_KEY) == value),
                        "emitted": [n.name for n in graph if n.metadata_props.get(ROTATION_KEY) == value],
                        "folded_into_values": [n.name for n in graph if n.metadata_props.get(ROTATION_IN_VALUES_KEY) == value]})
    return result


def _smoothing_search(ctx: CompileContext) -> None:
    """SmoothQuant scales per activation: per-channel maxima and sample rows from SMOOTH_SAMPLES
    calibration samples spread over the data, then a per-value search over candidate scales
    (`choose_scales`)."""
    from qcompile.backends.onnxruntime.session import compile_threads

    names = sorted(smoothable(ctx.model.graph, ctx.work))
    alpha = ctx.settings.transforms.smooth
    scales = {}
    if names:
        amax, rows = _smoothing_stats(ctx, names)
        if isinstance(alpha, float):  # the paper's rule with a fixed alpha, unsearched
            wmax = channel_weight_maxima(ctx.model.graph, ctx.work)
            scales = {v: smoothing_scales(amax[v], wmax[v], alpha).tolist() for v in names if v in amax and v in wmax}
        else:
            scales = {k: v.tolist() for k, v in choose_scales(ctx.model.graph, ctx.work, amax, rows, compile_threads()).items()}
    ctx.plan = dataclasses.replace(ctx.plan, smoothing=scales)
    ctx.work = dataclasses.replace(ctx.work, smoothing=scales)


def _smoothing_stats(ctx: CompileContext, names: list[str]) -> tuple[dict, dict]:
    """`channel_stats` of SMOOTH_SAMPLES spread calibration samples, or, when these give an
    activation fewer than SEARCH_ROWS rows (a model with few rows per sample: an MLP, a CNN's
    classifier), of as many samples as fill them (at most all): a second, final pass."""
    n, stats = SMOOTH_SAMPLES, None
    for _ in range(2):
        data = ctx.calib.spread(n)
        stats = channel_stats(stream_values(ctx.model, names, data.batches(ctx.settings.batch_size)), names, SEARCH_ROWS)
        have = min(len(stats[1].get(v, ())) for v in names)  # rows of the poorest activation
        if have >= SEARCH_ROWS or len(data) >= len(ctx.calib):
            break
        n = -(-len(data) * SEARCH_ROWS // max(have, 1))
    return stats


def _smooth(ctx: CompileContext):
    """SmoothQuantPass with the plan's scales; the plan is then re-read from the graph. The report
    names, per value, the consumers whose weights took diag(s) and the nodes that compute x / s."""
    scales = {k: np.asarray(v, dtype=np.float32) for k, v in ctx.plan.smoothing.items()}
    result = SmoothQuantPass(ctx.work, scales)(ctx.model)
    ctx.work = plan_on(ctx.model.graph, ctx.work)
    alpha = ctx.settings.transforms.smooth
    rule = "replayed" if ctx.replay else f"alpha {alpha}" if isinstance(alpha, float) else "searched"
    entries, graph = ctx.report.setdefault("transforms", []), list(ctx.model.graph)
    for value in sorted(ctx.plan.smoothing):
        entries.append({"transform": "smooth", "value": value, "rule": rule,
                        "nodes": sorted(n.name for n in graph if n.metadata_props.get(SMOOTHED_KEY) == value),
                        "emitted": [n.name for n in graph if n.metadata_props.get(SMOOTHING_KEY) == value]})
    return result


def _has_pairs(ctx: CompileContext) -> bool:
    return any(q.spec.pairs is not None for n in ctx.work.nodes.values() for q in n.inputs.values())


def calibration_heads(model: ir.Model, plan: QuantPlan, caps) -> dict[str, list[str]]:
    """Activation value without a clip -> the values whose histograms give its range: itself or,
    when its scale propagates through shape ops (`caps.shape_op_qdq_drop`), its tie heads."""
    specs = {v: s for v, s in plan.activation_specs().items() if s.clip is None and not s.dynamic}
    by_name = all_values(model.graph) if specs else {}
    return {
        v: [h.name for h in tie_heads(by_name[v])[1]] if getattr(s.fmt, "onnx_dtype", None) in caps.shape_op_qdq_drop else [v]
        for v, s in specs.items()
    }


def clips_from(plan: QuantPlan, heads: dict[str, list[str]], hists: dict) -> QuantPlan:
    """`plan` with the clip of every value in `heads` chosen from its heads' merged histogram (a
    value the data never computed, in an If branch no sample takes, keeps none: `uncalibrated`)."""
    specs = plan.activation_specs()
    clips = {}
    for v, hs in heads.items():
        h = hists[hs[0]]
        for other in hs[1:]:
            h.merge(hists[other])
        if h.count:
            clips[v] = choose_clip(h, specs[v].format, specs[v].symmetric, specs[v].method)
    return plan.with_clips(clips)


def calibrate_plan(model: ir.Model, plan: QuantPlan, data: Dataset, batch_size: int = 8, progress=None,
                   caps=None) -> QuantPlan:
    """Fill the clip of every activation spec without one, from histograms of the calibration data
    (`calibration_heads`, `clips_from`)."""
    if caps is None:
        from qcompile.backends.onnxruntime.capabilities import CAPABILITIES as caps
    heads = calibration_heads(model, plan, caps)
    if not heads:
        return plan
    hists = collect(model, sorted({h for hs in heads.values() for h in hs}), data.batches(batch_size), progress)
    return clips_from(plan, heads, hists)


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
    return dataclasses.replace(plan, nodes={k: v for k, v in plan.nodes.items() if k not in names})


def _calibrate(ctx: CompileContext) -> None:
    """Histograms of every uncalibrated activation, and, in the same pass over the calibration data,
    the per-channel input means bias correction needs (both measure the graph as it is now)."""
    s = ctx.settings
    heads = calibration_heads(ctx.model, ctx.work, s.caps)
    axes = _mean_axes(ctx) if s.target.bias_correction else {}
    names = sorted({h for hs in heads.values() for h in hs} | set(axes))
    if names:
        hists = {h: Histogram() for hs in heads.values() for h in hs}
        stream = histogrammed(stream_values(ctx.model, names, ctx.calib.batches(s.batch_size)), hists, ctx.progress)
        means = channel_means(stream, sorted(axes), axes)
        ctx.work = clips_from(ctx.work, heads, hists)
        ctx.means = means
    unseen = uncalibrated(ctx.model, ctx.work)
    if unseen:
        ctx.kept.update(unseen)
        ctx.work, ctx.plan = _without(ctx.work, unseen), _without(ctx.plan, unseen)
        if not ctx.work.nodes:
            raise UnsupportedModelError(nothing_to_quantize(s.target, ctx.kept))
    ctx.plan = ctx.plan.with_specs_of(ctx.work)  # the plan to save names the original graph's values


def _allocate(ctx: CompileContext) -> None:
    """Target "auto" (`qcompile.mixed`): every candidate's plan of the graph as it is now,
    calibrated in one pass; each (layer, candidate) simulated alone on calibration samples
    (`restore.Simulator`); the ILP (`allocate.solve`) under the budgets; the work plan becomes the
    merged choice (calibrated, so `calibrate` only measures the bias-correction means again), the
    plan to save names the original graph's values. report["allocation"] holds the candidate
    table, the budgets and the solver's status, objective, bound, gap and time."""
    import time

    from qcompile import allocate, mixed

    s, graph = ctx.settings, ctx.model.graph
    t0 = time.perf_counter()
    plans = {c: p for c in (s.allocation.candidates or s.target.candidates)
             if (p := make_plan(ctx.model, get_target(c), s.options, s.caps)).nodes}
    heads = {c: calibration_heads(ctx.model, p, s.caps) for c, p in plans.items()}
    union = QuantPlan("auto", {n: np_ for p in reversed(list(plans.values())) for n, np_ in p.nodes.items()})
    ops = {n.name: n.op_type for n in graph}
    axes = {v: 1 if ops[n] == "Conv" else -1 for n, v in correctable(graph, union).items()}
    hists = {h: Histogram() for hs in heads.values() for h_list in hs.values() for h in h_list}
    stream = histogrammed(stream_values(ctx.model, sorted(set(hists) | set(axes)), ctx.calib.batches(s.batch_size)),
                          hists, ctx.progress)
    means = channel_means(stream, sorted(axes), axes)
    plans = {c: clips_from(p, heads[c], hists) for c, p in plans.items()}
    plans = {c: _without(p, uncalibrated(ctx.model, p)) for c, p in plans.items()}  # a value no sample computed
    batches = list(ctx.calib.take(0, min(restore.SAMPLES, len(ctx.calib))).batches(s.batch_size))
    sens = sweep(restore.snapshot(ctx.model), plans, means if s.target.bias_correction else None, batches,
                 s.batch_size, s.caps, restore.RANKING_SAMPLES, s.allocation.executor)
    t1 = time.perf_counter()
    layers = {n for p in plans.values() for n in p.nodes}
    layer_bits = sum(8 * v.const_value.nbytes for n in graph if n.name in layers and len(n.inputs) > 1
                     for v in [n.inputs[1]] if v is not None and v.const_value is not None)
    table = mixed.build_table(graph, plans, sens, 8.0 * external.weight_bytes(ctx.model) - layer_bits,
                              {"loss": "output noise / signal, worst output", "samples": min(restore.RANKING_SAMPLES, len(ctx.calib)),
                               "seconds": round(t1 - t0, 3)})
    if s.allocation.latency is not None:
        _latency_costs(ctx, table, plans)
    budgets = allocate.budgets_from(table, s.allocation.bits, s.allocation.mb, s.allocation.latency)
    sol = (allocate.solve if s.allocation.method == "ilp" else allocate.greedy)(table, budgets)
    if sol.choice is None:
        raise InputError(f"no allocation fits the budgets ({sol.status}): " + "; ".join(_least(table, b) for b in budgets))
    work = mixed.merge(plans, table, sol.choice)
    original = ctx.plan.nodes

    def renamed(name, np_):  # the original graph's value names, input by input (the transforms renamed some)
        o = original.get(name)
        if o is None:
            return np_
        ins = {i: dataclasses.replace(q, value=o.inputs[i].value) if i in o.inputs else q for i, q in np_.inputs.items()}
        return dataclasses.replace(np_, inputs=ins)

    ctx.work = dataclasses.replace(ctx.work, nodes=work.nodes, target="auto")
    record = {"table": table.to_json(), "budgets": [dataclasses.asdict(b) for b in budgets], "solution": sol.to_json(table)}
    ctx.plan = dataclasses.replace(ctx.plan, nodes={n: renamed(n, np_) for n, np_ in work.nodes.items()}, target="auto",
                                   allocation=record)
    ctx.report["allocation"] = {**record, "sensitivity_seconds": round(t1 - t0, 3)}
    log.info("allocation: %s, objective %.4g, %d of %d layers quantized, %.1f s measuring", sol.status, sol.objective,
             len(work.nodes), len(table.layers), t1 - t0)


def _least(table, budget) -> str:
    """What a budget asked against the least any allocation needs (ties aside), in its own units."""
    from qcompile.allocate import WEIGHT_BITS

    least = np.where(table.allowed, table.costs[budget.cost], np.inf).min(axis=1).sum() + table.fixed.get(budget.cost, 0.0)
    if budget.cost == WEIGHT_BITS:
        params = max(sum(table.meta["params"]), 1)
        fixed = table.fixed.get(WEIGHT_BITS, 0.0)
        return (f"the candidates need at least {(least - fixed) / params:.2f} bits per weight ({least / 8e6:.3f} MB), "
                f"the budget allows {(budget.limit - fixed) / params:.2f} ({budget.limit / 8e6:.3f} MB)")
    return f"{budget.cost} needs at least {least:.4g}, the budget allows {budget.limit:.4g}"


def _latency_costs(ctx: CompileContext, table, plans: dict[str, QuantPlan]) -> None:
    """Cost "latency" of the table (`qcompile.latency`): every (layer, candidate) timed as a
    one-layer model at the first calibration sample's shapes; fixed: the float model's latency
    beyond its layers'."""
    from qcompile import latency
    from qcompile.allocate import FLOAT, LATENCY

    graph = ctx.model.graph
    nodes = {n.name: n for n in graph}
    acts = sorted({v.name for layer in table.layers for v in nodes[layer].inputs if v is not None and v.const_value is None})
    first = next(ctx.calib.take(0, 1).batches(1))
    (_, feed), = list(stream_values(ctx.model, acts, [first]))
    cands = {layer: [FLOAT, *(c for c, p in plans.items() if layer in p.nodes)] for layer in table.layers}
    lat = latency.measure(graph, ctx.opset, table.layers, cands, feed, ctx.settings.lowering.value)
    cost = np.zeros_like(table.sensitivity)
    for i, layer in enumerate(table.layers):
        for j, c in enumerate(table.candidates):
            cost[i, j] = lat.get((layer, c), 0.0)
    table.costs[LATENCY] = cost
    whole = latency.model_seconds(ctx.model, first)
    table.fixed[LATENCY] = max(0.0, whole - cost[:, table.candidates.index(FLOAT)].sum())
    table.meta["latency"] = {"float_model_seconds": whole, "runs": latency.RUNS, "threads": 1, "batch": 1}


def _mean_axes(ctx: CompileContext) -> dict[str, int]:
    """Input value of each layer whose bias can absorb a correction -> its channel axis."""
    ops = {n.name: n.op_type for n in ctx.model.graph}
    return {value: 1 if ops[node] == "Conv" else -1 for node, value in correctable(ctx.model.graph, ctx.work).items()}


def _restore_snapshot(ctx: CompileContext) -> None:
    ctx.snapshot = restore.snapshot(ctx.model)


def _wants_snapshot(ctx: CompileContext) -> bool:
    s = ctx.settings
    return s.probe and s.validate and not ctx.replay and external.weight_bytes(ctx.model) <= restore.MAX_WEIGHT_BYTES


def activation_sources(ctx: CompileContext) -> dict[str, tuple[str, Callable | None]]:
    """Planned activation (as the working graph names it) -> (the float model's value it is
    computed from, the transform from that value to it, or None): the division by its
    cross-layer equalization scales along its channel axis where its reader was equalized, by its
    SmoothQuant scales where it was smoothed, then the rotation x -> x R where it was rotated. A
    channel permutation (`PairPermutationPass`) is left out: per-tensor SQNR does not depend on the
    order. Readers of a fused residual-stream rotation are left out (their float counterpart also
    carries the folded norm gain), and so are the values between a value projection and its
    attention output when a rotation was folded into the values: the layer table shows no
    activation SQNR for them."""
    out: dict[str, tuple[str, Callable | None]] = {}
    specs = ctx.work.activation_specs()
    rotated = {rotated_name(k): k for k in ctx.plan.rotations}  # x R's name -> the rotation's key
    graph = {n.name: n for n in ctx.model.graph}
    equalized = {n.metadata_props[equalize.EQUALIZED_KEY]: n.name for n in graph.values()
                 if equalize.EQUALIZED_KEY in n.metadata_props and n.name in ctx.plan.equalization}
    for name, wnode in ctx.work.nodes.items():
        pnode = ctx.plan.nodes.get(name)
        if "R1" in graph[name].metadata_props.get(residual_rotate.FUSED_KEY, "") if name in graph else False:
            continue
        pairs = [(q, pnode.inputs.get(i) if pnode else None, i) for i, q in wnode.inputs.items()]
        if wnode.output is not None:
            pairs.append((wnode.output, pnode.output if pnode else None, None))
        in_values = name in graph and residual_rotate.IN_VALUES_KEY in graph[name].metadata_props
        for q, p, i in pairs:
            if q.role != "activation" or q.value not in specs or q.value in out:
                continue
            if in_values and (i is None or (i == 1 and graph[name].op_type == "MatMul")):
                continue  # in the values: a rotation of the merged heads went into W_v
            orig = p.value if p is not None else q.value
            cle = None
            if i == 0 and name in equalized:
                cle = (np.asarray(ctx.plan.equalization[equalized[name]], np.float32), equalize.channel_axis(graph[name]))
            out[q.value] = (orig, _transform_of(ctx.plan, orig, rotated.get(q.value), cle))
    return out


def _transform_of(plan: QuantPlan, value: str, rotation: str | None,
                  cle: tuple[np.ndarray, int] | None = None) -> Callable | None:
    """x -> ((x / e) / s) R for cross-layer equalization scales e along `cle`'s axis, the plan's
    smoothing scales s of float value `value` and its rotation `plan.rotations[rotation]` (each
    only where there is one), or None when there is none."""
    r = Rotation.from_json(plan.rotations[rotation]) if rotation is not None else None
    s = plan.smoothing.get(value)
    if r is None and s is None and cle is None:
        return None
    inv = None if s is None else (1.0 / np.asarray(s, dtype=np.float32)).astype(np.float32)

    def transform(x: np.ndarray) -> np.ndarray:
        if cle is not None:
            shape = [1] * x.ndim
            shape[cle[1]] = -1
            x = x / cle[0].reshape(shape)
        y = x if inv is None else x * inv
        return y if r is None else r.apply(y)

    return transform


# --- emit ---------------------------------------------------------------------------------------
def _emit(ctx: CompileContext) -> None:
    """Within the backend's limits: IR version <= caps.max_ir_version, checked by onnx.checker."""
    model = ctx.model
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    need = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = min(max(model.ir_version, need), ctx.settings.caps.max_ir_version)


def check_model(model: ir.Model) -> None:
    """onnx.checker on the model's structure. A model with external weights or past the backend's
    file-session size is checked as a file (`external.session_path`: weights referenced in place,
    never one protobuf of them in memory); a small one as a proto."""
    from qcompile.backends.onnxruntime.session import FILE_SESSION_BYTES

    try:
        if external.external_tensors(model) or external.weight_bytes(model) > FILE_SESSION_BYTES:
            with external.session_path(model) as path:
                onnx.checker.check_model(str(path), full_check=False)
        else:
            onnx.checker.check_model(ir.to_proto(model), full_check=False)
    except onnx.checker.ValidationError as e:
        raise QCompileError(f"compiled model fails onnx.checker: {str(e).splitlines()[0]}") from None


def worst_sqnr(row: dict) -> float:
    """A layer row's worst SQNR (weight or activation): the verdict ranks layers by it."""
    vals = [v for v in (row.get("activation_sqnr_db"), row.get("weight_sqnr_db")) if v is not None]
    return min(vals) if vals else float("inf")


def layer_table(model: ir.Model, plan: QuantPlan, act_sqnr: dict[str, float]) -> list[dict]:
    """The report's row per planned node, read from what the passes wrote on the graph: the weight
    records of InsertQDQPass, the kernel decisions and bytes of the lowering."""
    from qcompile.backends.onnxruntime import kernels
    from qcompile.backends.onnxruntime.lower_nbits import KERNEL_BYTES_KEY, LAYER_KEY

    recs, kernel_bytes, decisions = {}, {}, {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        layer = n.metadata_props.get(LAYER_KEY, n.name)
        if KERNEL_BYTES_KEY in n.metadata_props:
            kernel_bytes[layer] = int(n.metadata_props[KERNEL_BYTES_KEY])
        d = kernels.recorded(n)
        if d is not None:
            decisions[layer] = d
    for r in layer_records(model.graph):
        recs.setdefault(r.node, r)
    rows = []
    for name, node in plan.nodes.items():
        row: dict = {"node": name, "op_type": node.op_type}
        r = recs.get(name)
        if r is not None:
            lowered = name in kernel_bytes
            row.update(weight=r.value, weight_format=r.format, weight_granularity=r.granularity,
                       weight_sqnr_db=round(r.weight_sqnr_db, 3), float_bytes=r.float_bytes,
                       quant_bytes=int(kernel_bytes.get(name, r.quant_bytes)),  # a kernel's layout may store more
                       emission=decisions[name]["kernel"] if lowered else r.emission)
            if r.pairs is not None:
                row["int16_pairs"] = r.pairs
        if name in decisions:
            row["kernel"] = decisions[name]["kernel"]
            if decisions[name]["rejected"]:
                row["kernels_not_taken"] = decisions[name]["rejected"]
        acts = [q for q in node.inputs.values() if q.role == "activation"]
        if acts:
            row["activation_format"] = acts[0].spec.format
            vals = [act_sqnr[q.value] for q in acts if q.value in act_sqnr]
            if vals:
                row["activation_sqnr_db"] = min(vals)
        rows.append(row)
    return rows


def _layer_table(ctx: CompileContext) -> None:
    ctx.layers = layer_table(ctx.model, ctx.work, ctx.activation_sqnr) if ctx.settings.target.quantize else []
    ctx.layers += [{"node": name, "op_type": op, "kept_float": reason} for name, (op, reason) in ctx.kept.items()]
    s = ctx.settings
    ctx.report.update({
        "schema": REPORT_SCHEMA,
        "qcompile": __version__,
        "input": ctx.source_path,
        "target": s.target.name,
        "cpu": s.deploy.value,
        "calibration": {"samples": len(ctx.calib), "synthesized": ctx.synthesized},
        **({"opset_conversion": ctx.conversion} if ctx.conversion is not None else {}),
        "sizes": {"float_weight_bytes": ctx.report.get("sizes", {}).get("float_weight_bytes"),
                  "quantized_weight_bytes": external.weight_bytes(ctx.model)},
        "layers": ctx.layers,
    })


# --- validate -----------------------------------------------------------------------------------
_FLOAT_REFERENCE: dict = {}  # `_reference_key` -> the float outputs per held-out batch (the last compile's)
REFERENCE_CACHE_BYTES = 256 << 20  # larger references (e.g. a decoder's logits) are not kept


def _reference_key(ctx: CompileContext, outputs: list[str]) -> tuple | None:
    """What the float outputs on the held-out data depend on, when it can be named: the input
    model file and the held-out files (path, size, mtime), the sample range, the batch size, the
    output names and the float graph's interface; None for in-memory models or data (no reuse).
    Compiles of one model on one held-out set in a process (sweeps, tests) then run the float
    model over all of it once."""
    files = getattr(ctx.eval, "files", None)  # file-backed datasets only
    if ctx.source_path is None or not files:
        return None
    try:
        stamp = lambda p: (str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns)  # noqa: E731
        io = tuple((v.name, v.dtype) for v in (*ctx.float_model.graph.inputs, *ctx.float_model.graph.outputs))
        return (stamp(ctx.source_path), tuple(stamp(f) for f in files), ctx.eval.start, ctx.eval.stop,
                ctx.settings.batch_size, tuple(outputs), io)
    except OSError:
        return None


def _float_reference(ctx: CompileContext) -> None:
    """One pass of the float model over the held-out data: its outputs (the reference validation
    compares against; reused from the previous compile of the same files, `_reference_key`) and,
    on the first ACTIVATION_SQNR_SAMPLES samples, the quantization SQNR of
    every planned activation, measured on the value the float model computes (divided by its
    SmoothQuant scales where it was smoothed)."""
    ctx.float_model = ir.from_proto(ctx.float_proto)
    if ctx.source_path is not None:  # weights left in the input's external data file
        ir.external_data.set_base_dir(ctx.float_model.graph, Path(ctx.source_path).resolve().parent)
    outputs = output_names(ctx.float_model, ctx.model)
    sources = activation_sources(ctx) if ctx.settings.target.quantize else {}
    specs = ctx.work.activation_specs()
    names = outputs + sorted({o for o, _ in sources.values()} - set(outputs))
    acc = {v: [0.0, 0.0] for v in sources}
    key = _reference_key(ctx, outputs)
    cached = _FLOAT_REFERENCE.get(key) if key is not None else None
    ctx.reference = [] if cached is None else cached
    batches = ctx.eval.batches(ctx.settings.batch_size)
    if cached is not None:  # the outputs are known: only the samples the activation SQNR reads
        batches = itertools.islice(batches, -(-ACTIVATION_SQNR_SAMPLES // ctx.settings.batch_size) if sources else 0)
    seen = 0
    for batch, values in stream_values(ctx.float_model, names, batches):
        if cached is None:
            ctx.reference.append([values[n] for n in outputs])
        if seen >= ACTIVATION_SQNR_SAMPLES:
            continue
        seen += next(iter(batch.values())).shape[0]
        for v, (orig, transform) in sources.items():
            x = values[orig] if transform is None else transform(values[orig])
            x64 = x.astype(np.float64)
            acc[v][0] += float(np.sum(x64**2))
            acc[v][1] += float(np.sum((x64 - simulate(x, specs[v])) ** 2))
    ctx.activation_sqnr = {v: (float("inf") if n == 0 else round(10 * np.log10(max(sig, 1e-300) / n), 3))
                           for v, (sig, n) in acc.items()}
    if key is not None:
        _FLOAT_REFERENCE.clear()  # one entry: the last model and held-out set, up to a size
        if sum(a.nbytes for batch in ctx.reference for a in batch) <= REFERENCE_CACHE_BYTES:
            _FLOAT_REFERENCE[key] = ctx.reference
    # what validation needs of the float model from here on is its interface: its weights go now
    ctx.report.setdefault("sizes", {})["float_weight_bytes"] = external.weight_bytes(ctx.float_model)
    ctx.float_proto = None
    for v in ctx.float_model.graph.initializers.values():
        v.const_value = None
    release_memory()


def _accuracy_level(ctx: CompileContext) -> None:
    from qcompile.accuracy_level import choose_accuracy_level

    keep = {}
    ctx.report["accuracy_level"] = choose_accuracy_level(ctx.float_model, ctx.model, ctx.eval, ctx.settings.batch_size,
                                                         ctx.reference, keep)
    ctx.session = keep.get("session")


def _validate(ctx: CompileContext) -> None:
    from qcompile.backends.onnxruntime.session import compile_threads
    from qcompile.cpu import host_description

    r = ctx.report
    r["outputs"] = compare(ctx.float_model, ctx.model, ctx.eval, ctx.settings.batch_size, None, ctx.reference, ctx.session)
    ctx.session = None
    r["validation"] = {"samples": len(ctx.eval), "session": f"onnxruntime ENABLE_ALL, {compile_threads()} threads", "host_cpu": host_description()}
    v = verdict(r["outputs"], ctx.settings.gate_db)
    v["worst_layers"] = sorted(ctx.layers, key=worst_sqnr)[:5]
    r["verdict"] = v


def _finish(ctx: CompileContext) -> None:
    for key in (SOURCE_TYPE_KEY, INTERFACE_KEY):
        ctx.model.metadata_props.pop(key, None)


# --- the declared pipeline ----------------------------------------------------------------------
def lowering_stages(s: Settings) -> list[Stage]:
    """The backend's lowering passes as stages (accuracy level 0 until `accuracy-level` decides)."""
    from qcompile.backends.onnxruntime.backend import lowering_passes

    level = 0 if s.accuracy_level == "auto" else s.accuracy_level
    return [pass_stage(type(p).__name__, lambda c, p=p: p) for p in lowering_passes(s.lowering, level, s.caps)]


def pipeline_for(s: Settings) -> list[Stage]:
    """The stages a compile with settings `s` runs, in order (conditions are read at run time)."""

    tgt = s.target
    quantizing = (lambda stages: stages) if tgt.quantize else (lambda stages: [])  # "none": the transforms only
    validate = [Stage("float-reference", _float_reference,
                      doc="float outputs and activation SQNR on the held-out data, one pass")] if s.validate else []
    validate.append(Stage("layer-table", _layer_table))
    if s.accuracy_level == "auto" and tgt.quantize:
        validate.append(Stage("accuracy-level", _accuracy_level, doc="MatMulNBits accuracy level 4 where it is harmless"))
    if s.validate:
        validate.append(Stage("validate", _validate))
    groups = {
        "front": [
            Stage("load", _load),
            Stage("data", _data, doc="calibration and held-out data (given, held out, or synthesized)"),
            pass_stage("InlinePass", lambda c: common_passes.InlinePass(), doc="model-local functions become the graph's"),
            pass_stage("PromoteFloatPass", lambda c: PromoteFloatPass()),
            Stage("ConvertOpsetPass", _convert_opset),
            pass_stage("NormalizePass", lambda c: NormalizePass(c.opset, s.caps.max_opset)),
            pass_stage("FoldConstantOfShapePass", lambda c: FoldConstantOfShapePass()),
            pass_stage("FoldBatchNormPass", lambda c: FoldBatchNormPass()),
            *([Stage("float-snapshot", _float_snapshot)] if s.validate else []),
        ],
        "plan": [
            Stage("plan", _plan),
            *([Stage("equalization", _choose_equalization, when=lambda c: not c.replay,
                     doc="cross-layer equalization scales of Conv/MatMul chains (weights only)")]
              if s.transforms.cle else []),
            Stage("CrossLayerEqualizationPass", _equalize, when=lambda c: bool(c.plan.equalization)),
            *([Stage("fused-rotation", _choose_fused_rotations, when=lambda c: not c.replay,
                     doc="QuaRot R1 + R2 on pre-norm residual streams, where the graph allows")]
              if s.transforms.rotate in ("hadamard", "random") else []),
            Stage("LayerNormToRMSNormPass", _layernorm_to_rmsnorm,
                  when=lambda c: any(v.get("layernorm") for v in c.plan.fused_rotations.values())),
            Stage("FusedResidualRotationPass", _fuse_rotations, when=lambda c: bool(c.plan.fused_rotations)),
            *([Stage("smoothing-search", _smoothing_search, when=lambda c: not c.replay,
                     doc=f"SmoothQuant scales: {'alpha ' + str(s.transforms.smooth) if isinstance(s.transforms.smooth, float) else 'searched per activation'}")]
              if s.transforms.smooths(tgt.smooth) else []),
            Stage("SmoothQuantPass", _smooth, when=lambda c: bool(c.plan.smoothing)),
            *([Stage("rotation", _choose_rotations, when=lambda c: not c.replay,
                     doc=f"a {s.transforms.rotate} rotation of every activation its consumers fold")]
              if s.transforms.rotate != "none" else []),
            Stage("OnlineRotationPass", _rotate, when=lambda c: bool(c.plan.rotations)),
            *quantizing([
                *([Stage("allocation", _allocate, when=lambda c: not c.replay,
                         doc="mixed precision: every candidate measured per layer, then the ILP under the budgets")]
                  if tgt.candidates else []),
                pass_stage("PairPermutationPass", lambda c: PairPermutationPass(c.work), when=_has_pairs),
                Stage("calibrate", _calibrate),
                Stage("restore-snapshot", _restore_snapshot, when=_wants_snapshot),
                pass_stage("BiasCorrectionPass", lambda c: BiasCorrectionPass(c.work, c.means, c.weights),
                           when=lambda c: bool(c.means)),
            ]),
        ],
        "quantize": quantizing([pass_stage("InsertQDQPass", lambda c: InsertQDQPass(c.work, s.caps, c.weights))]),
        "backend": quantizing(lowering_stages(s)),
        "emit": [
            pass_stage("StoreHalfPass", lambda c: StoreHalfPass(source_type(c.model)),
                       when=lambda c: source_type(c.model) is not None),
            Stage("emit", _emit),
            Stage("onnx.checker", lambda c: check_model(c.model)),
        ],
        "validate": validate,
        "finish": [
            pass_stage("HalfInterfacePass", lambda c: HalfInterfacePass(interface(c.model)),
                       when=lambda c: bool(interface(c.model))),
            Stage("finish", _finish, doc="the compile's model metadata removed"),
        ],
    }
    return [dataclasses.replace(st, group=g) for g, stages in groups.items() for st in stages]
