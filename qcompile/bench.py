"""`qcompile bench`: qcompile and onnxruntime's own quantizer, side by side, in one run.

For every model (from `qcompile.zoo`) the bench

1. gets real calibration and held-out data (`zoo.get_data`), the same `.npz` files for every
   configuration;
2. compiles each target with qcompile, each compile in its own process
   (`qcompile MODEL --target T --calib C --eval E -o OUT --no-validate --json`), and builds the
   onnxruntime baselines (`qcompile.baselines.build_isolated`, also one process each);
3. measures every model alike, in the bench process:

   quality   `baselines.evaluate` on the held-out data (qcompile's validation metrics: output SQNR
             dB, cosine mean/min per sample, top-1 agreement and softmax KL for class scores), both
             models in onnxruntime ENABLE_ALL sessions, 1 thread;
   size      file bytes (model + external data), `size_ratio` = quantized / float file bytes, and
             `bits_per_weight` = 8 x (bytes of every stored tensor of the quantized model except
             int64/bool index and shape tensors: quantized weights, scales, zero points, int32
             biases, and the tensors kept in float such as embeddings and norms) / (number of
             floating-point parameters of the float model). The float model gives 32.
   latency   float and quantized sessions (ENABLE_ALL, intra_op_num_threads=1), on the first 1 and
             the first `batch` held-out samples: `warmup` runs each, then `runs` alternating pairs
             (the order inside a pair flips each time). Median, p10 and p90 ms per model, and
             `ratio` = median quantized / median float (< 1: faster than float).
   load      `bench.load_isolated`: in a fresh process, the session creation time and peak RSS
             (VmHWM) of the model (float and every output), then one run on one sample;
             `session_rss_over_file` = (VmHWM with the session - VmHWM before) / file bytes.
   compile   `seconds` = wall time of the compile process (interpreter start-up and imports
             included, the same for both tools; a baseline's build also loads its result once in
             an ENABLE_ALL session to check it), `peak_rss_bytes` = that process's VmHWM, read
             by the process itself before it exits.

A configuration that fails (build, load or evaluation) is a row with the reason, never a crash.
onnxruntime's FP8 model does not load at ENABLE_ALL: its row records that failure and is measured
with `baselines.FALLBACK_SESSION_CONFIG` (the QDQ fusions disabled), as `row["session_config"]` says.

`run(settings)` returns the raw results (also written as `bench.json`); `markdown(results)` the
table; `plot(results, path)` the PNG (skipped with a warning when matplotlib is missing).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qcompile import __version__, baselines, zoo
from qcompile.report import to_json

log = logging.getLogger(__name__)

SCHEMA = "qcompile.bench/1"

# Which qcompile targets each onnxruntime configuration compares with (the table's "target" column).
BASELINE_FAMILY = {name: "fp8" if name == "ort-fp8" else "w4" if name == "ort-int4" else "int8"
                   for name in baselines.BASELINES}
TARGET_FAMILY = {"int8": "int8", "a16w8": "int8", "w8": "int8", "fp8": "fp8", "fp8-e5m2": "fp8", "w4": "w4"}
LOW_BIT_FAMILY = "w4"  # every other target (FP6/FP4/MX/NVFP4/w4a8/int3/int2, w:...) sits beside ORT's int4


def target_family(target: str) -> str:
    return TARGET_FAMILY.get(split_target(target)[0], LOW_BIT_FAMILY)


def split_target(spec: str) -> tuple[str, list[str]]:
    """`TARGET[@OPT...]` -> (target, extra compile args): @N is --accuracy-level N, @auto /
    @function / @integer / @native is --lowering (e.g. `w4@4`, `mxfp4@native`)."""
    target, *opts = spec.split("@")
    args = []
    for o in opts:
        args += ["--accuracy-level", o] if o.isdigit() else ["--lowering", o]
    return target, args
# Weight-only / dynamic configurations that only touch MatMul and Gemm.
NEEDS_MATMUL = ("ort-dynamic", "ort-dynamic-pt", "ort-int4")
MAX_CALIB_STRIDE = 32  # onnxruntime's histogram calibrators merge this many samples at a time
WARMUP = 3
TIMEOUT_S = 1800.0


@dataclasses.dataclass
class Settings:
    """What to run. `baselines=None` means every configuration that fits the model and targets."""

    # the pretrained models (llama-tiny has random weights and gemv-chain is for decode speed:
    # both can be named explicitly, neither says anything about quality)
    models: tuple[str, ...] = ("minilm", "efficientnet-lite0")
    targets: tuple[str, ...] = ("int8", "fp8", "w4")
    baselines: tuple[str, ...] | None = None
    calib_samples: int = 256
    eval_samples: int = 256
    runs: int = 30
    batch: int = 8
    out: Path = Path("bench-out")
    quick: bool = False


QUICK = {"models": ("minilm",), "targets": ("int8",), "baselines": ("ort-dynamic", "ort-static-matmul-minmax"),
         "calib_samples": 32, "eval_samples": 32, "runs": 5}


# --------------------------------------------------------------------------- data and model facts


def get_data(model: str, split: str, n: int, out_dir: Path) -> Path:
    """Real data for `model` (`zoo.get_data`, cached next to the zoo models; `out_dir` unused)."""
    return Path(zoo.get_data(model, split, n))


def file_bytes(path: Path) -> int:
    """The model file plus its external data files (those next to it that it names)."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def _tensors(path: Path):
    """Every stored tensor of the model: initializers and Constant `value`s, subgraphs included."""
    import onnx_ir as ir

    model = ir.load(path)
    yield from (v.const_value for v in model.graph.initializers.values() if v.const_value is not None)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            yield node.attributes["value"].value
        for attr in node.attributes.values():
            if isinstance(attr.value, ir.Graph):
                yield from (v.const_value for v in attr.value.initializers.values() if v.const_value is not None)


_INDEX_TYPES = ("INT64", "BOOL", "STRING")
_FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def float_params(path: Path) -> int:
    """Number of floating-point parameters (elements of float tensors) of a float model."""
    return sum(t.size for t in _tensors(path) if t.dtype.name in _FLOAT_TYPES)


def stored_bytes(path: Path) -> int:
    """Bytes of every stored tensor except int64/bool/string (index and shape) tensors."""
    return sum(t.nbytes for t in _tensors(path) if t.dtype.name not in _INDEX_TYPES)


def has_matmul(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nodes = [*m.graph.node, *(n for f in m.functions for n in f.node)]
    return any(n.op_type in ("MatMul", "Gemm") for n in nodes)


# --------------------------------------------------------------------------- latency


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "runs": len(ms)}


def latency(float_session, quant_session, feed: dict, runs: int, warmup: int = WARMUP) -> dict:
    """Median/p10/p90 ms of both sessions on `feed`, alternating float and quantized runs.

    `warmup` runs each first; then `runs` pairs, the order inside a pair flipping each time so
    that neither model always runs right after the other's cache traffic.
    """
    for _ in range(warmup):
        float_session.run(None, feed)
        quant_session.run(None, feed)
    times: dict[str, list[float]] = {"float": [], "quant": []}
    for i in range(runs):
        order = (("float", float_session), ("quant", quant_session))
        for key, sess in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    f, q = _stats(times["float"]), _stats(times["quant"])
    return {"float_ms": f, "quant_ms": q, "ratio": q["median"] / f["median"], "raw_float_ms": times["float"],
            "raw_quant_ms": times["quant"]}


def _session(path: Path, session_config: dict | None = None):
    """onnxruntime CPU session at ENABLE_ALL, 1 thread, with optional config entries."""
    import onnxruntime as ort

    from qcompile.backends.onnxruntime.session import session_options

    so = session_options("all", threads=1)
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(float_path: Path, eval_npz: Path, batch: int) -> dict[str, dict]:
    """{"batch1": feed, "batch<N>": feed} from the first held-out samples (N as the model allows)."""
    from qcompile.data import Dataset, InputInfo
    from qcompile.pipeline import load_model

    data = Dataset(eval_npz, InputInfo.of_model(load_model(float_path)))
    feeds = {"batch1": next(data.batches(1))}
    big = next(data.batches(batch))
    n = next(iter(big.values())).shape[0]
    if n > 1:
        feeds[f"batch{n}"] = big
    return feeds


# --------------------------------------------------------------------------- building


_COMPILE_CHILD = """
import sys
from qcompile.baselines import peak_rss_bytes
from qcompile.cli import main
try:
    main(args=sys.argv[1:], prog_name="qcompile")
finally:
    sys.stderr.write(f"\\nqcompile-bench: peak_rss_bytes={peak_rss_bytes()}\\n")
"""


def compile_isolated(model: Path, target: str, calib: Path, eval_npz: Path, out: Path,
                     timeout: float = TIMEOUT_S) -> dict:
    """`qcompile MODEL --target T ... --no-validate --json` in its own process.

    Returns {"path", "error", "seconds" (process wall time), "peak_rss_bytes" (the child's VmHWM),
    "report" (qcompile's own JSON report, without the per-layer table)}.
    """
    name, extra = split_target(target)
    args = [str(model), "--target", name, *extra, "--calib", str(calib), "--eval", str(eval_npz), "-o", str(out),
            "--no-validate", "--json", "-q"]
    rec = {"path": None, "error": None, "peak_rss_bytes": None, "report": None}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**rec, "error": f"timed out after {timeout:g} s", "seconds": round(time.perf_counter() - t0, 3)}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rss = re.findall(r"qcompile-bench: peak_rss_bytes=(\d+)", proc.stderr)
    rec["peak_rss_bytes"] = int(rss[-1]) if rss else None
    if proc.returncode != 0 or not out.is_file():
        errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("qcompile: error:")]
        tail = errs[-1][len("qcompile: error: "):] if errs else (proc.stderr.strip().splitlines() or [""])[-1]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {**rec, "error": f"compile failed ({how}): {tail[:300]}"}
    try:
        report = json.loads(proc.stdout)
        report.pop("layers", None)
        rec["report"] = report
    except json.JSONDecodeError:
        pass
    return {**rec, "path": str(out)}


_LOAD_CHILD = """
import json, sys, time
import numpy as np
from qcompile.baselines import peak_rss_bytes
import onnxruntime
from qcompile.bench import _session
before = peak_rss_bytes()
t0 = time.perf_counter()
sess = _session(sys.argv[1], json.loads(sys.argv[3]) or None)
t1 = time.perf_counter()
created = peak_rss_bytes()
data = np.load(sys.argv[2])
sess.run(None, {i.name: data[i.name][:1] for i in sess.get_inputs()})
t2 = time.perf_counter()
print(json.dumps({"session_seconds": round(t1 - t0, 3), "first_run_seconds": round(t2 - t1, 3),
                  "rss_before_bytes": before, "session_peak_rss_bytes": created, "peak_rss_bytes": peak_rss_bytes()}))
"""


def load_isolated(path: Path, feed_npz: Path, session_config: dict | None = None, timeout: float = TIMEOUT_S) -> dict:
    """Create an ENABLE_ALL, 1-thread session on `path` in a fresh process and run it once on the
    first sample of `feed_npz`: the load-time cost of an output.

    Returns {"session_seconds" (session creation), "first_run_seconds", "rss_before_bytes" (VmHWM
    after the imports), "session_peak_rss_bytes" (VmHWM once the session exists),
    "peak_rss_bytes" (VmHWM after the run), "file_bytes", "session_rss_over_file" = (session peak
    - before) / file bytes} or {"error": reason}.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path), str(feed_npz),
                               json.dumps(session_config or {})], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"error": f"load failed ({how}): {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["file_bytes"] = file_bytes(Path(path))
    rec["session_rss_over_file"] = round((rec["session_peak_rss_bytes"] - rec["rss_before_bytes"]) / rec["file_bytes"], 3)
    return rec


def _calib_stride(n: int) -> int:
    """The largest divisor of `n` up to MAX_CALIB_STRIDE (onnxruntime needs n % stride == 0)."""
    return max(d for d in range(1, min(n, MAX_CALIB_STRIDE) + 1) if n % d == 0)


# --------------------------------------------------------------------------- measuring one row


def _measure(row: dict, float_path: Path, float_session, float_facts: dict, eval_npz: Path, feeds: dict,
             runs: int) -> None:
    """Fill `row` with metrics, sizes and latency of row["path"]; a failure sets row["error"]."""
    path = Path(row["path"])
    cfg = row.get("session_config")
    try:
        row["metrics"] = baselines.evaluate(float_path, path, eval_npz, session_config=cfg,
                                            float_session=float_session)
        size, stored = file_bytes(path), stored_bytes(path)
        row["size"] = {"file_bytes": size, "size_ratio": size / float_facts["file_bytes"], "stored_bytes": stored,
                       "bits_per_weight": 8 * stored / float_facts["float_params"]}
        row["load"] = load_isolated(path, eval_npz, cfg)
        quant_session = _session(path, cfg)
        row["latency"] = {k: latency(float_session, quant_session, feed, runs) for k, feed in feeds.items()}
        del quant_session
    except Exception as e:  # noqa: BLE001 - a row records its failure, the bench goes on
        log.debug("measuring %s failed", row["config"], exc_info=True)
        row["measure_error"] = f"measurement failed: {baselines._one_line(e)}"
        row["error"] = row["error"] or row["measure_error"]


def _new_row(model: str, tool: str, config: str, family: str) -> dict:
    return {"model": model, "tool": tool, "config": config, "target": family, "path": None, "error": None,
            "stage": None, "session_config": None, "measure_error": None, "compile": None, "metrics": None,
            "size": None, "latency": None, "load": None}


def selected_baselines(settings: Settings, model_has_matmul: bool) -> tuple[list[str], dict[str, str]]:
    """(baselines to build, {skipped name: reason}) for one model."""
    families = {target_family(t) for t in settings.targets}
    names = list(settings.baselines) if settings.baselines is not None else \
        [n for n in baselines.BASELINES if BASELINE_FAMILY[n] in families]
    skipped = {n: "the model has no MatMul/Gemm" for n in names if n in NEEDS_MATMUL and not model_has_matmul}
    return [n for n in names if n not in skipped], skipped


# --------------------------------------------------------------------------- the run


def environment() -> dict:
    import onnx
    import onnx_ir
    import onnxruntime

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return {"qcompile": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "onnx_ir": onnx_ir.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv}


def run(settings: Settings, progress: Callable[[str], None] = log.info) -> dict:
    """Run the bench; returns the raw results and writes `<out>/bench.json`, `<out>/bench.png`."""
    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {"schema": SCHEMA, "environment": environment(),
               "settings": {**dataclasses.asdict(settings), "out": str(out), "warmup": WARMUP,
                            "threads": 1, "optimization": "ENABLE_ALL"},
               "models": {}, "rows": []}
    for model in settings.models:
        info = results["models"][model] = {"error": None}
        try:
            progress(f"{model}: model and data")
            float_path = zoo.get_model(model)
            calib = get_data(model, "calib", settings.calib_samples, out / "data")
            eval_npz = get_data(model, "eval", settings.eval_samples, out / "data")
            facts = {"file_bytes": file_bytes(float_path), "float_params": float_params(float_path)}
            info.update(path=str(float_path), calib=str(calib), eval=str(eval_npz), **facts,
                        stored_bytes=stored_bytes(float_path), has_matmul=has_matmul(float_path))
            info["bits_per_weight"] = 8 * info["stored_bytes"] / facts["float_params"]
            info["load"] = load_isolated(float_path, eval_npz)
            float_session = _session(float_path)
            feeds = _feeds(float_path, eval_npz, settings.batch)
            info["feeds"] = {k: {n: list(a.shape) for n, a in f.items()} for k, f in feeds.items()}
            if len(feeds) == 1 and settings.batch > 1:
                info["batched_latency"] = "skipped: the model's batch dimension is fixed"
        except Exception as e:  # noqa: BLE001
            log.debug("setting up %s failed", model, exc_info=True)
            info["error"] = baselines._one_line(e)
            progress(f"{model}: failed: {info['error']}")
            continue
        model_dir = out / "models" / model
        model_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for target in settings.targets:
            row = _new_row(model, "qcompile", f"qcompile {target}", target_family(target))
            progress(f"{model}: qcompile --target {target}")
            rec = compile_isolated(float_path, target, calib, eval_npz, model_dir / f"qcompile-{re.sub(r'[^A-Za-z0-9_.-]', '_', target)}.onnx")
            row.update(path=rec["path"], error=rec["error"], stage="build" if rec["error"] else None,
                       compile={k: rec[k] for k in ("seconds", "peak_rss_bytes", "report")})
            rows.append(row)
        names, skipped = selected_baselines(settings, info["has_matmul"])
        info["skipped_baselines"] = skipped
        for name in names:
            row = _new_row(model, "onnxruntime", name, BASELINE_FAMILY[name])
            stride = _calib_stride(settings.calib_samples) if name in baselines.HISTOGRAM_CALIBRATED else None
            progress(f"{model}: onnxruntime {name}" + (f" (calib_stride {stride})" if stride else ""))
            t0 = time.perf_counter()
            rec = baselines.build_isolated(name, float_path, calib, model_dir / f"{name}.onnx", calib_stride=stride,
                                           timeout=TIMEOUT_S)
            row.update(path=rec["path"], error=rec["error"], stage=rec["stage"],
                       compile={"seconds": round(time.perf_counter() - t0, 3), "build_seconds": rec["seconds"],
                                "peak_rss_bytes": rec["peak_rss_bytes"], "calib_stride": stride})
            if rec["stage"] == "load" and rec["path"]:
                row["session_config"] = dict(baselines.FALLBACK_SESSION_CONFIG)  # measured the only way it runs
            rows.append(row)
        for row in rows:
            if row["path"] and (row["error"] is None or row["session_config"]):
                progress(f"{model}: measuring {row['config']}")
                _measure(row, float_path, float_session, facts, eval_npz, feeds, settings.runs)
        info["float_latency_ms"] = _float_latency(rows)
        results["rows"].extend(rows)
        del float_session
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "bench.json").write_text(dumps(results) + "\n")
    results["png"] = str(plot(results, out / "bench.png") or "") or None
    (out / "bench.json").write_text(dumps(results) + "\n")
    return results


def _float_latency(rows: list[dict]) -> dict:
    """Median/p10/p90 of the float model over every pairing, per shape."""
    pooled: dict[str, list[float]] = {}
    for r in rows:
        for k, lat in (r.get("latency") or {}).items():
            pooled.setdefault(k, []).extend(lat["raw_float_ms"])
    return {k: _stats(v) for k, v in pooled.items()}


def dumps(results: dict) -> str:
    """The raw results as JSON (`qcompile.report.to_json`)."""
    return to_json(results)


def failed(results: dict) -> list[str]:
    """What makes the bench exit 1: models that could not be set up, qcompile rows that failed."""
    bad = [f"{m}: {i['error']}" for m, i in results["models"].items() if i.get("error")]
    return bad + [f"{r['model']}: {r['config']}: {r['error']}" for r in results["rows"]
                  if r["tool"] == "qcompile" and r["error"]]


# --------------------------------------------------------------------------- output


def primary_output(metrics: dict) -> str:
    """The output shown in the table: class scores if any, else the first output."""
    return next((k for k, m in metrics.items() if "top1_agreement" in m), next(iter(metrics)))


def _num(x):
    """A figure from `run` or from a reloaded bench.json (where infinities are the strings "inf", "-inf")."""
    return float(x) if isinstance(x, str) else x


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(_num(x), fmt)


def markdown(results: dict) -> str:
    """The side-by-side table: one row per (model, configuration), float first, grouped by target."""
    s = results["settings"]
    shapes = sorted({k for r in results["rows"] for k in (r.get("latency") or {})}, key=lambda k: int(k[5:]))
    head = ["model", "config", "tool", "target", "SQNR dB", "cos mean / min", "top-1 / KL", "bits/w", "size MB",
            *[f"latency {k.replace('batch', 'b')}" for k in shapes], "compile s", "peak RSS GB", "load s",
            "load RSS / file", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {"int8": 0, "fp8": 1, "w4": 2}
    for model, info in results["models"].items():
        if info.get("error"):
            lines.append(f"| {model} | - | - | - |" + " - |" * (len(head) - 5) + f" failed: {info['error'][:150]} |")
            continue
        fl, fl_load = info.get("float_latency_ms", {}), info.get("load") or {}
        lat = [f"{fl[k]['median']:.1f} ms" if k in fl else "-" for k in shapes]
        lines.append(f"| {model} | float | - | - | ref | 1 / 1 | - | {info['bits_per_weight']:.1f} | "
                     f"{info['file_bytes'] / 1e6:.1f} | " + " | ".join(lat) + " | - | - | "
                     f"{_f(fl_load.get('session_seconds'), '.2f')} | {_f(fl_load.get('session_rss_over_file'), '.2f')} | "
                     "float medians |")
        rows = sorted((r for r in results["rows"] if r["model"] == model),
                      key=lambda r: (order.get(r["target"], 9), r["tool"] != "qcompile"))
        for r in rows:
            m = r["metrics"][primary_output(r["metrics"])] if r.get("metrics") else {}
            size, c = r.get("size") or {}, r.get("compile") or {}
            top = f"{m['top1_agreement']:.4f} / {m['softmax_kl']:.2g}" if "top1_agreement" in m else "-"
            cos = f"{m['cosine_mean']:.4f} / {m['cosine_min']:.4f}" if m.get("cosine_mean") is not None else "-"
            lat = []
            for k in shapes:
                x = (r.get("latency") or {}).get(k)
                lat.append(f"{x['ratio']:.2f}x" if x else "-")
            note = _note(r, info)
            rss = c.get("peak_rss_bytes")
            load = r.get("load") or {}
            lines.append("| " + " | ".join([
                model, r["config"], r["tool"], r["target"], _f(m.get("sqnr_db"), ".2f"), cos, top,
                _f(size.get("bits_per_weight"), ".1f"), _f(size["file_bytes"] / 1e6 if size else None, ".1f"),
                *lat, _f(c.get("seconds"), ".1f"), _f(rss / 1e9 if rss else None, ".2f"),
                _f(load.get("session_seconds"), ".2f"), _f(load.get("session_rss_over_file"), ".2f"),
                note.replace("|", "/")]) + " |")
    lines.append("")
    lines.append(f"Quality vs float on {s['eval_samples']} held-out samples ({s['calib_samples']} calibration samples); "
                 "latency = median quantized / median float, onnxruntime ENABLE_ALL, 1 thread, "
                 f"{s['runs']} alternating runs after {s['warmup']} warm-up; bits/w = 8 x stored tensor bytes / "
                 "float parameters; compile s and peak RSS of each compile's own process; load s = session "
                 "creation time and load RSS / file = (peak RSS with the session - RSS before) / file bytes, "
                 "both in a fresh process (`bench.load_isolated`).")
    return "\n".join(lines)


def _note(r: dict, info: dict) -> str:
    """Why a row has no (or fallback) figures, or that it left the weights in float."""
    if r.get("session_config"):
        cfg = ", ".join(f"{k}={v}" for k, v in r["session_config"].items())
        why = r["error"].replace("does not load in onnxruntime (ENABLE_ALL): ", "")
        done = f"measured with {cfg}" if r.get("metrics") else f"fails with {cfg} too: {r['measure_error'].replace('measurement failed: ', '')[:90]}"
        return f"does not load at ENABLE_ALL ({why[:70]}...); {done}"
    if r.get("error"):
        return f"failed: {r['error'][:160]}"
    if r.get("size") and r["size"]["stored_bytes"] >= 0.98 * info["stored_bytes"]:
        return "weights left in float (nothing it quantizes in this model)"
    return ""


def plot(results: dict, path: Path) -> Path | None:
    """Two panels: SQNR vs bits per weight, SQNR vs latency ratio. None (and a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = [r for r in results["rows"] if r.get("metrics") and r.get("size")]
    models = list(results["models"])
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    markers = {"qcompile": "o", "onnxruntime": "s"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    for r in rows:
        sqnr = _num(r["metrics"][primary_output(r["metrics"])]["sqnr_db"])
        if sqnr is None or not math.isfinite(sqnr):
            continue
        style = {"color": colours[r["model"]], "marker": markers[r["tool"]], "s": 60, "edgecolors": "black"}
        label = r["config"].replace("qcompile ", "qc-").replace("ort-static-", "st-")
        ax1.scatter(r["size"]["bits_per_weight"], sqnr, **style)
        ax1.annotate(label, (r["size"]["bits_per_weight"], sqnr), fontsize=7, xytext=(4, 3), textcoords="offset points")
        lat = r.get("latency") or {}
        if lat:
            big = max(lat, key=lambda k: int(k[5:]))
            xs = [lat["batch1"]["ratio"], lat[big]["ratio"]] if big != "batch1" else [lat["batch1"]["ratio"]]
            ax2.plot(xs, [sqnr] * len(xs), color=colours[r["model"]], lw=0.8, alpha=0.6)
            ax2.scatter(xs[0], sqnr, **style)
            if len(xs) > 1:
                ax2.scatter(xs[1], sqnr, **{**style, "facecolors": "none", "edgecolors": colours[r["model"]]})
            ax2.annotate(label, (xs[0], sqnr), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax1.set_xlabel("bits per float parameter (8 x stored bytes / float params; float = 32)")
    ax2.set_xlabel("latency ratio vs float, log scale (filled: batch 1, hollow: batched; 1 thread)")
    ax2.set_xscale("log")
    ax2.axvline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.set_ylabel("output SQNR vs float (dB)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color="grey", label="qcompile"),
               Line2D([], [], ls="", marker="s", color="grey", label="onnxruntime quantizer")]
    handles += [Line2D([], [], ls="", marker="o", color=colours[m], label=m) for m in models]
    ax1.set_xlim(left=0)
    ax1.legend(handles=handles, fontsize=8, loc="best")
    env = results["environment"]
    fig.suptitle(f"qcompile bench - onnxruntime {env['onnxruntime']}, {env['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["QUICK", "SCHEMA", "Settings", "compile_isolated", "dumps", "failed", "latency", "markdown", "plot", "run"]
