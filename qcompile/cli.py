"""Command line: parse, call the library, print, map errors to exit codes.

Exit codes: 0 ok, 1 error (one-line reason; traceback only with -v), 2 usage, 3 validation failed.
stdout carries only the result (the output path, or the --json report); progress and logs go to
stderr.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from qcompile.targets import TARGETS

log = logging.getLogger("qcompile")


class _DefaultToCompile(click.Group):
    """`qcompile MODEL ...` runs `compile`; `qcompile validate|inspect|formats ...` the subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


class _OneLine(logging.Formatter):
    """`qcompile: LEVEL: message`, one line: a record's traceback or stack (third-party loggers log
    them, e.g. onnx_ir's failed shape inference) becomes `(ExcType: first line)`; -v shows them."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("qcompile: %(levelname)s: %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        lines = record.getMessage().strip().splitlines()
        msg = lines[0] if lines else ""
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            first = str(e).strip().splitlines()
            msg += f" ({type(e).__name__}: {first[0] if first else ''})"
        return f"qcompile: {record.levelname}: {msg}"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(verbose))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("qcompile").setLevel(logging.INFO if verbose else level)
    logging.captureWarnings(True)  # Python warnings (numpy, torch, ...) go through the same one-line handler


def _run(fn, verbose: bool):
    """Call fn, mapping exceptions to a one-line stderr message and an exit code."""
    from qcompile.errors import QCompileError

    try:
        return fn()
    except QCompileError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"qcompile: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("qcompile: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the CLI must never show a bare traceback
        if verbose:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"qcompile: error: {type(e).__name__}: {msg} (run with -v for details)", err=True)
        sys.exit(1)


def _dump(report: dict) -> str:
    from qcompile.report import to_json

    return to_json(report)


@click.group(cls=_DefaultToCompile, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcompile")
def main() -> None:
    """qcompile: quantize an ONNX model so stock onnxruntime runs it.

    \b
    qcompile MODEL --target int8 [-o OUT] [--calib DATA] [--eval DATA] ...
    qcompile explain MODEL --target int8      (what a compile would run, per layer kernel)
    qcompile lower QDQ_MODEL [-o OUT]         (the backend stages alone)
    qcompile validate FLOAT COMPILED --eval DATA
    qcompile inspect MODEL
    qcompile allocate --table T --budget-bits 4.5   (re-solve a measured allocation)
    qcompile formats
    """


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", required=True, callback=lambda ctx, p, v: _target(v),
              help=f"What to compile for: {', '.join(TARGETS)}, or w:FORMAT[/BLOCK][,a:FORMAT] (e.g. w:e3m4,a:e4m3).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: MODEL.<target>.onnx")
@click.option("--calib", type=click.Path(path_type=Path), help=".npz (arrays keyed by input name) or a directory of them")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Held-out data (default: part of --calib)")
@click.option("--samples", type=click.IntRange(min=1), help="Calibration samples to use")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--input-shape", "input_shape", multiple=True, callback=lambda ctx, p, v: _input_shapes(v), metavar="NAME:DIMS",
              help="Fix the dims an input leaves free for synthesized data, e.g. input:1,512 (repeatable; NAME: for a scalar)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), help="Activation range method (default: the target's)")
@click.option("--plan", "plan_in", type=click.Path(dir_okay=False, path_type=Path), help="Replay a saved plan")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=Path), help="Write the plan used (JSON)")
@click.option("--exclude-node", multiple=True, help="Keep nodes whose name matches this glob in float (repeatable)")
@click.option("--exclude-op", multiple=True, help="Keep this op type in float (repeatable)")
@click.option("--keep-last", is_flag=True, help="Keep the final classifier layer in float")
@click.option("--lowering", type=click.Choice(["auto", "function", "integer", "native"]), default="auto", show_default=True,
              help="Weights onnxruntime has no kernel for: qcompile function ops (function), exact MatMulNBits "
                   "digit planes (integer), integer where it is not slower than float (auto), or the optional C++ "
                   "library: fused GEMV/GEMM for MXFP4/NVFP4 and float8 weights and native activation quantizers "
                   "(native: the model then needs qcompile.native's library)")
@click.option("--accuracy-level", type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto", show_default=True,
              help="MatMulNBits accuracy_level: 0 = float compute (exact), 4 = int8 activations (faster), auto = 4 "
                   "where validation measures its change >= 20 dB below the weight error, else 0")
@click.option("--cpu", type=click.Choice(["portable", "avx2", "avx512", "vnni", "native"]), default="portable",
              show_default=True,
              help="Deployment CPU. portable: int8 results identical on every CPU (no int16 pair saturation on x86 "
                   "without VNNI); avx2/avx512: the same constraint; vnni: none (such a model loses accuracy on CPUs "
                   "without VNNI); native: this machine's class")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Write the weights to MODEL.onnx.data next to the output: always, never (one protobuf, at most "
                   "2 GB), or auto (when the weights exceed 1.8 GB or the input used external data)")
@click.option("--rotate", type=click.Choice(["none", "hadamard", "random", "auto"]), default="none", show_default=True,
              help="Rotate the activations MatMul/Gemm layers read by a block Hadamard (random: after random signs; "
                   "auto: per layer, the block or none that measures best), the inverse folded into their weights: "
                   "exact in float, spreads outlier channels")
@click.option("--rotate-block", type=click.IntRange(min=2), metavar="N",
              help="rotation block: the largest Hadamard order (2^k, or 12, 20, .. x 2^k) dividing the width up to N [default: the activation format's block (MX 32, NVFP4 16), else 128]")
@click.option("--smooth", metavar="auto|off|ALPHA",
              help="SmoothQuant before the rotations: auto (search per activation), off, or a fixed alpha in [0, 1] "
                   "[default: the target's: int8 searches]")
@click.option("--cle", is_flag=True,
              help="Cross-layer equalization: rescale Conv/MatMul -> (Relu|Relu6) -> Conv/MatMul chains so both weights "
                   "have equal per-channel ranges (exact in float; helps per-tensor weights)")
@click.option("--budget-bits", type=click.FloatRange(min=0, min_open=True),
              help="--target auto: the layers' average stored bits per weight (scales included), e.g. 4.5")
@click.option("--budget-mb", type=click.FloatRange(min=0, min_open=True),
              help="--target auto: the model's stored weights in MB (10^6 bytes)")
@click.option("--budget-latency", type=click.FloatRange(min=0, min_open=True),
              help="--target auto: latency as a ratio of the float model's, from per-layer microbenchmarks "
                   "(1 thread, batch 1; cached per CPU class)")
@click.option("--candidates", metavar="T;T;...",
              help="--target auto: the candidate targets, ';'-separated (float is always one) [default: "
                   + ";".join(TARGETS["auto"].candidates) + "]")
@click.option("--executor", type=click.Choice(["process", "serial", "ray"]), default="process", show_default=True,
              help="--target auto: where the sensitivity sweep runs (ray: a local Ray, or RAY_ADDRESS's cluster)")
@click.option("--no-validate", is_flag=True, help="Skip the float-vs-compiled check")
@click.option("--min-sqnr", type=float, help="Override the target's minimum output SQNR (dB)")
@click.option("--max-float", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Below the gate, keep the most sensitive layers (each measured alone on calibration data) in float, "
                   "up to this share of the weights, and compile again; 0: never")
@click.option("--dump-after", multiple=True, metavar="STAGE",
              help="Write the model after STAGE (a name `qcompile explain` lists) to DIR/after-STAGE.onnx (repeatable)")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Where --dump-after writes")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout")
@click.option("-v", "--verbose", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def compile_cmd(model, target, output, calib, eval_, samples, seed, input_shape, batch_size, method, plan_in, save_plan,
                exclude_node, exclude_op, keep_last, lowering, accuracy_level, cpu, external_data, no_validate, min_sqnr,
                max_float, dump_after, dump_dir, rotate, rotate_block, smooth, cle, budget_bits, budget_mb, budget_latency,
                candidates, executor, as_json, verbose, quiet):
    """Quantize MODEL for --target and write the result."""
    _setup_logging(verbose, quiet)

    def work():
        from qcompile.analyze import PlanOptions
        from qcompile.errors import InputError, ValidationFailed
        from qcompile.pipeline import compile as compile_model
        from qcompile.pipeline import save_model
        tgt = target
        tag = tgt.name.replace(":", "").replace(",", "-").replace("/", "g")
        out = output or model.with_name(f"{model.name[:-5] if model.name.endswith('.onnx') else model.name}.{tag}.onnx")
        if model.exists() and out.exists() and out.resolve() == model.resolve():
            raise InputError("output path is the input model; choose another -o")
        if method and tgt.activations is not None:
            tgt = dataclasses.replace(tgt, activations=dataclasses.replace(tgt.activations, method=method))
        options = PlanOptions(tuple(exclude_node), tuple(exclude_op), keep_last)
        with _Progress(enabled=not quiet and not verbose and sys.stderr.isatty()) as progress:
            try:
                result = compile_model(model, tgt, calib=calib, eval=eval_, plan=plan_in, samples=samples, seed=seed,
                                       validate=not no_validate, min_sqnr=min_sqnr, options=options,
                                       batch_size=batch_size, progress=progress.advance, lowering=lowering,
                                       accuracy_level=accuracy_level if accuracy_level == "auto" else int(accuracy_level),
                                       cpu=cpu, input_shapes=input_shape, max_float=max_float,
                                       dump_after=tuple(dump_after), dump_dir=dump_dir, rotate=rotate,
                                       rotate_block=rotate_block, smooth=smooth, cle=cle, budget_bits=budget_bits,
                                       budget_mb=budget_mb, candidates=candidates, executor=executor,
                                       budget_latency=budget_latency)
            except ValidationFailed as e:
                if as_json and e.report is not None:
                    e.report["output"] = None
                    click.echo(_dump(e.report))
                raise ValidationFailed(f"{e}; output not written (see --min-sqnr, --no-validate)", e.report, e.result) from None
        if save_plan:
            result.plan.save(save_plan)
        size = save_model(result.model, out, external_data)
        report = result.report
        report["output"] = str(out)
        report["sizes"]["input_bytes"] = model.stat().st_size
        report["sizes"]["output_bytes"] = size
        if as_json:
            click.echo(_dump(report))
        else:
            if not quiet:
                _print_summary(report)
            click.echo(str(out))

    _run(work, verbose)


class _Progress:
    """A rich progress bar on stderr counting calibration samples (only on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("calibrating", total=None)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False


def _print_summary(report: dict) -> None:
    for name, m in report.get("outputs", {}).items():
        extra = f", top-1 {m['top1_agreement']:.4f}" if "top1_agreement" in m else ""
        click.echo(f"qcompile: {name}: SQNR {m['sqnr_db']:.2f} dB, cosine {m['cosine_mean']:.5f} (min {m['cosine_min']:.5f}){extra}", err=True)
    level = report.get("accuracy_level") or {}
    if level.get("nodes"):
        click.echo(f"qcompile: MatMulNBits accuracy level {level['level']} (auto: {level['reason']})", err=True)
    s = report["sizes"]
    if s.get("float_weight_bytes"):
        click.echo(f"qcompile: weights {s['float_weight_bytes'] / 1e6:.2f} MB -> {s['quantized_weight_bytes'] / 1e6:.2f} MB, "
                   f"{report['compile_seconds']:.1f} s", err=True)


@main.command("validate")
@click.argument("float_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compiled", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--eval", "eval_", required=True, type=click.Path(path_type=Path))
@click.option("--min-sqnr", type=float)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def validate_cmd(float_model, compiled, eval_, min_sqnr, as_json, verbose):
    """Compare COMPILED against FLOAT_MODEL on held-out data."""
    _setup_logging(verbose, False)

    def work():
        from qcompile.api import validate

        res = validate(float_model, compiled, eval_, min_sqnr=min_sqnr)
        if as_json:
            click.echo(_dump(res))
        else:
            for name, m in res["outputs"].items():
                click.echo(f"{name}: sqnr_db={m['sqnr_db']} cosine_mean={m['cosine_mean']} cosine_min={m['cosine_min']} "
                           f"max_abs_err={m['max_abs_err']:.4g}" + (f" top1={m['top1_agreement']}" if "top1_agreement" in m else ""))
        if "verdict" in res and not res["verdict"]["passed"]:
            click.echo(f"qcompile: error: output SQNR {res['verdict']['worst_output_sqnr_db']:.2f} dB below {min_sqnr} dB", err=True)
            sys.exit(3)

    _run(work, verbose)


@main.command("explain")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", required=True, callback=lambda ctx, p, v: _target(v), help="As for compile")
@click.option("--lowering", type=click.Choice(["auto", "function", "integer", "native"]), default="auto", show_default=True)
@click.option("--exclude-node", multiple=True, help="As for compile")
@click.option("--exclude-op", multiple=True, help="As for compile")
@click.option("--keep-last", is_flag=True, help="As for compile")
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def explain_cmd(model, target, lowering, exclude_node, exclude_op, keep_last, as_json, verbose):
    """The stages a compile would run, its plan, and per layer the kernel and why (no data needed)."""
    _setup_logging(verbose, False)

    def work():
        from qcompile.analyze import PlanOptions
        from qcompile.api import explain

        e = explain(model, target, lowering, options=PlanOptions(tuple(exclude_node), tuple(exclude_op), keep_last))
        if as_json:
            click.echo(_dump(e))
            return
        click.echo(f"{model}: target {e['target']}, lowering {e['lowering']}")
        click.echo("pipeline:")
        for st in e["pipeline"]:
            cond = " (when needed)" if st["conditional"] else ""
            click.echo(f"  {st['group']:<9} {st['stage']}{cond}" + (f"  -- {st['doc']}" if st["doc"] else ""))
        click.echo(f"layers ({len(e['layers'])} quantized, {len(e['kept_float'])} kept in float):")
        for row in e["layers"]:
            what = ", ".join(f"{k} {row[k]}" for k in ("weight", "activation") if k in row)
            kernel = row.get("kernel", f"{row['op_type']} as emitted (the lowering policy covers MatMul/Gemm)")
            click.echo(f"  {row['node']} ({row['op_type']}): {what} -> {kernel}")
            for k, why in row.get("kernels_not_taken", {}).items():
                click.echo(f"      not {k}: {why}")
        for name, k in e["kept_float"].items():
            click.echo(f"  {name} ({k['op_type']}): float ({k['reason']})")

    _run(work, verbose)


@main.command("lower")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: MODEL.lowered.onnx")
@click.option("--lowering", type=click.Choice(["auto", "function", "integer", "native"]), default="auto", show_default=True)
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
def lower_cmd(model, output, lowering, accuracy_level, verbose):
    """Run only the backend stages on a Q/DQ model (e.g. from --dump-after InsertQDQPass)."""
    _setup_logging(verbose, False)

    def work():
        from qcompile.api import lower
        from qcompile.errors import InputError
        from qcompile.pipeline import save_model

        out = output or model.with_name(f"{model.name[:-5] if model.name.endswith('.onnx') else model.name}.lowered.onnx")
        if model.exists() and out.exists() and out.resolve() == model.resolve():
            raise InputError("output path is the input model; choose another -o")
        save_model(lower(model, lowering, accuracy_level), out)
        click.echo(str(out))

    _run(work, verbose)


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def inspect_cmd(model, as_json, verbose):
    """Ops, parameters, and what would be quantized."""
    _setup_logging(verbose, False)

    def work():
        from qcompile.analyze import summarize
        from qcompile.pipeline import load_model

        s = summarize(load_model(model))
        if as_json:
            click.echo(_dump(dataclasses.asdict(s)))
            return
        click.echo(f"{model}: IR {s.ir_version}, opset {s.opset}, {s.params:,} parameters ({s.param_bytes / 1e6:.2f} MB)")
        click.echo("ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(s.ops.items(), key=lambda kv: -kv[1])))
        click.echo(f"quantizable nodes ({len(s.quantizable)}):")
        for n in s.quantizable:
            click.echo(f"  {n}")

    _run(work, verbose)


@main.command("allocate")
@click.option("--table", "table_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A candidate table (JSON), or a report / plan holding one under allocation.table")
@click.option("--budget-bits", type=click.FloatRange(min=0, min_open=True), help="Average bits per weight of the layers")
@click.option("--budget-mb", type=click.FloatRange(min=0, min_open=True), help="Stored weights, MB (10^6 bytes)")
@click.option("--budget-latency", type=click.FloatRange(min=0, min_open=True), help="Latency as a ratio of the float model's")
@click.option("--method", type=click.Choice(["ilp", "greedy"]), default="ilp", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def allocate_cmd(table_path, budget_bits, budget_mb, budget_latency, method, as_json, verbose):
    """Re-solve the mixed-precision allocation of a measured candidate table for other budgets."""
    _setup_logging(verbose, False)

    def work():
        import json

        from qcompile import allocate
        from qcompile.errors import InputError

        try:
            doc = json.loads(table_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read the candidate table {table_path}: {e}") from None
        doc = doc.get("allocation", {}).get("table", doc) if isinstance(doc, dict) else doc
        try:
            table = allocate.Table.from_json(doc)
            budgets = allocate.budgets_from(table, budget_bits, budget_mb, budget_latency)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{table_path}: not a candidate table ({type(e).__name__}: {e})") from None
        if not budgets:
            raise InputError("give at least one budget: --budget-bits, --budget-mb or --budget-latency")
        sol = (allocate.solve if method == "ilp" else allocate.greedy)(table, budgets)
        out = {"budgets": [dataclasses.asdict(b) for b in budgets], **sol.to_json(table)}
        if as_json:
            click.echo(_dump(out))
        else:
            click.echo(f"{method}: {sol.status}, objective {sol.objective}, bound {sol.bound}, gap {sol.gap}, "
                       f"{sol.seconds * 1e3:.1f} ms")
            for b in budgets:
                click.echo(f"  {b.cost}: {sol.totals.get(b.cost)} <= {b.limit}")
            for layer, cand in out["plan"].items():
                click.echo(f"  {layer}: {cand}")
        if sol.choice is None:
            raise InputError(f"no allocation fits the budgets ({sol.status})")

    _run(work, verbose)


@main.command("formats")
@click.option("--json", "as_json", is_flag=True)
def formats_cmd(as_json):
    """Every number format: bits, max, min normal, and whether onnxruntime runs it natively."""
    from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
    from qcompile.formats import FORMATS, BlockFormat, FloatFormat

    rows = []
    seen = set()
    for name, f in FORMATS.items():
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, BlockFormat):
            row = {"name": f.name, "kind": "block", "bits": f.bits_per_element, "max": f.element.max if hasattr(f.element, "max") else None,
                   "min_normal": None, "native": False,
                   "detail": f"{f.element.name} x {f.block_size}, scale {f.scale.name}" + (f", tensor scale {f.tensor_scale.name}" if f.tensor_scale else "")}
        elif isinstance(f, FloatFormat):
            row = {"name": f.name, "kind": "float", "bits": f.bits, "max": f.max, "min_normal": f.min_normal,
                   "native": CAPABILITIES.qdq_native(f.onnx_dtype), "detail": f"e{f.exp_bits}m{f.man_bits} {f.specials.name}"}
        else:
            row = {"name": f.name, "kind": "int", "bits": f.bits, "max": f.qmax, "min_normal": None,
                   "native": CAPABILITIES.qdq_native(f.onnx_dtype), "detail": f"[{f.qmin}, {f.qmax}]"}
        rows.append(row)
    if as_json:
        click.echo(_dump({"formats": rows}))
        return
    click.echo(f"{'name':<14}{'kind':<7}{'bits':>6}  {'max':>12}  {'min normal':>12}  {'ORT':<4} detail")
    for r in rows:
        mx = f"{r['max']:.6g}" if r["max"] is not None else "-"
        mn = f"{r['min_normal']:.6g}" if r["min_normal"] is not None else "-"
        click.echo(f"{r['name']:<14}{r['kind']:<7}{r['bits']:>6g}  {mx:>12}  {mn:>12}  {'yes' if r['native'] else 'no':<4} {r['detail']}")


def _target(name: str):
    """The Target for a --target value (a usage error, exit 2, on an unknown one)."""
    from qcompile.targets import get_target

    try:
        return get_target(name)
    except KeyError as e:
        raise click.BadParameter(str(e).strip('"')) from None


def _input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """--input-shape NAME:D0,D1,... (a usage error, exit 2, when malformed)."""
    out: dict[str, tuple[int, ...]] = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        parts = [d.strip() for d in dims.replace("x", ",").split(",") if d.strip()]
        if not sep or not name or not all(d.isdigit() for d in parts):
            raise click.BadParameter(f"{v!r}: expected NAME:DIMS with DIMS non-negative integers, e.g. input:1,512")
        if name in out:
            raise click.BadParameter(f"{name!r} given twice")
        out[name] = tuple(int(d) for d in parts)
    return out


def _bench_targets(value: str | None) -> tuple[str, ...] | None:
    """Bench targets: `;`-separated when any contains a comma (w:..,a:..), else comma-separated;
    each TARGET[@OPT...] with a known target (see bench.split_target)."""
    if value is None:
        return None
    from qcompile.bench import split_target

    names = tuple(n.strip() for n in value.split(";" if ";" in value else ",") if n.strip())
    for n in names or (value,):
        _target(split_target(n)[0])
    return names


def _names(value: str | None, known, what: str) -> tuple[str, ...] | None:
    """A comma list checked against `known` (a usage error, exit 2, names the known ones)."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown) or repr(value)}; known: {', '.join(known)}")
    return names


@main.command("bench")
@click.option("--models", help="Comma list of zoo models [default: minilm,efficientnet-lite0; --quick: minilm]")
@click.option("--targets", help="Comma list of qcompile targets [default: int8,fp8,w4; --quick: int8]; TARGET@4 / "
              "TARGET@native set --accuracy-level / --lowering; use ';' between composed w:..,a:.. targets")
@click.option("--baselines", "baselines_", default="all", show_default=True,
              help="onnxruntime configurations: all (those matching the targets), none, or a comma list")
@click.option("--calib-samples", type=click.IntRange(min=1), help="[default: 256; --quick: 32]")
@click.option("--eval-samples", type=click.IntRange(min=1), help="[default: 256; --quick: 32]")
@click.option("--runs", type=click.IntRange(min=1), help="Alternating timed runs per shape [default: 30; --quick: 5]")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="The batched shape")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"), show_default=True)
@click.option("--quick", is_flag=True, help="Smallest settings that still exercise everything (CI)")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON instead of the markdown table")
@click.option("-v", "--verbose", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def bench_cmd(models, targets, baselines_, calib_samples, eval_samples, runs, batch, out, quick, as_json, verbose, quiet):
    """qcompile vs onnxruntime's quantizer on zoo models: quality, size, latency, compile time and memory.

    Prints a markdown table (or --json); writes OUT/bench.json (every raw figure) and OUT/bench.png.
    Exits 1 when a model cannot be set up or a qcompile compile fails (the table is still written).
    """
    from qcompile import baselines, zoo
    from qcompile.bench import QUICK, Settings

    _setup_logging(verbose, quiet)
    base = dataclasses.asdict(Settings())
    if quick:
        base.update(QUICK)
    given = {"models": _names(models, list(zoo.MODELS), "model"), "targets": _bench_targets(targets),
             "calib_samples": calib_samples, "eval_samples": eval_samples, "runs": runs}
    if baselines_ != "all" or not quick:
        given["baselines"] = () if baselines_ == "none" else None if baselines_ == "all" else \
            _names(baselines_, list(baselines.BASELINES), "baseline")
    base.update({k: v for k, v in given.items() if v is not None or k == "baselines"})
    settings = Settings(**{**base, "batch": batch, "out": out, "quick": quick})

    def work():
        from qcompile import bench

        def progress(msg: str) -> None:
            if not quiet:
                click.echo(f"qcompile bench: {msg}", err=True)

        results = bench.run(settings, progress)
        click.echo(bench.dumps(results) if as_json else bench.markdown(results))
        if not results.get("png"):
            click.echo("qcompile bench: warning: no plot written (matplotlib missing?)", err=True)
        progress(f"{results['seconds']} s; wrote {Path(results['settings']['out']) / 'bench.json'}"
                 + (f" and {results['png']}" if results.get("png") else ""))
        bad = bench.failed(results)
        if bad:
            click.echo(f"qcompile: error: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""), err=True)
            sys.exit(1)

    _run(work, verbose)


@main.group("zoo")
def zoo_cmd():
    """Real pretrained models (from PyPI packages, offline) exported to ONNX, and their data."""


@zoo_cmd.command("build")
@click.argument("names", nargs=-1)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), help="Default: $QCOMPILE_CACHE or ~/.cache/qcompile")
@click.option("-v", "--verbose", is_flag=True)
def zoo_build_cmd(names, cache, verbose):
    """Export and verify zoo models NAMES (default: all); print each ONNX path."""
    from qcompile import zoo

    _setup_logging(verbose, False)
    chosen = _names(",".join(names), list(zoo.MODELS), "model") if names else tuple(zoo.MODELS)
    _run(lambda: [click.echo(zoo.get_model(n, cache)) for n in chosen], verbose)


@zoo_cmd.command("data")
@click.argument("name")
@click.option("--split", type=click.Choice(["calib", "eval"]), default="calib", show_default=True)
@click.option("-n", "--samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True)
def zoo_data_cmd(name, split, samples, cache, verbose):
    """Write real SPLIT data for zoo model NAME as an .npz qcompile reads; print its path."""
    from qcompile import zoo

    _setup_logging(verbose, False)
    _names(name, list(zoo.DATA), "model")
    _run(lambda: click.echo(zoo.get_data(name, split, samples, cache)), verbose)


if __name__ == "__main__":
    main()
