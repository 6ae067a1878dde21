"""onnxruntime's own quantizer (`onnxruntime.quantization`) as baselines for qcompile.

Every entry of `BASELINES` builds one onnxruntime-quantized model from a float model and the same
calibration `.npz` data qcompile uses (arrays keyed by graph input name, first axis = samples,
streamed batch by batch through `NpzDataReader`, a `CalibrationDataReader`), and returns its path:

    path = BASELINES["ort-dynamic"](float_path, calib_npz, out_path)

`build(name, ...)` does the same but turns any failure into a `BaselineError` naming the
configuration, and by default checks that the model loads in onnxruntime's optimized session
(ENABLE_ALL, what `evaluate` and users run). `build_isolated` runs `build` in a fresh Python
process and returns a record (path or error, wall seconds, the child's peak RSS) instead of
raising, so a caller can write "failed: reason" and go on.

`evaluate` compares any quantized model, qcompile's or a baseline, against its float model on
held-out data with `qcompile.validate.compare`, so both get the same metrics.

Configurations (QInt8 = signed int8; all static ones use the QDQ format):
  ort-dynamic                  quantize_dynamic, per-channel int8 weights (MatMulInteger + DynamicQuantizeLinear)
  ort-dynamic-pt               quantize_dynamic, per-tensor int8 weights
  ort-static-all-<method>      quantize_static, per-channel int8 weights, int8 activations, every op ORT quantizes
  ort-static-matmul-<method>   the same with op_types_to_quantize=["MatMul", "Gemm", "Conv"]
  ort-fp8                      quantize_static, FLOAT8E4M3FN weights and activations, Distribution calibrator,
                               MatMul/Gemm/Conv (see `_fp8` for why these options)
  ort-int4                     MatMulNBitsQuantizer: 4-bit weight-only MatMulNBits, block 32, symmetric, accuracy_level 4
with <method> one of minmax, percentile, entropy.

Memory: onnxruntime's histogram calibrators (percentile, entropy, and the FP8 Distribution one)
keep the calibrated tensors of every sample until the data reader is exhausted. Build those one at
a time, preferably with `build_isolated` (their memory goes away with the child process), or pass
`calib_stride=k`, which sets onnxruntime's `CalibStridedMinMax` option so histograms are merged k
samples at a time (same results to 3 digits for ort-fp8 on MiniLM, at a quarter of the memory).

Pre-processing: `onnxruntime.quantization.shape_inference.quant_pre_process`, which onnxruntime
tells users to run first, is applied before every configuration (`preprocess=True`). Its symbolic
shape inference does not complete on some exporter outputs (torch.export's MiniLM: "Incomplete
symbolic shape inference", with or without auto_merge); then it is retried with
`skip_symbolic_shape=True` (ONNX shape inference and the basic optimizer still run), and if that
fails too, the float model is quantized as it is. The variant used is logged at INFO.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from qcompile.errors import QCompileError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
# (float_path, calib_npz, out_path, *, preprocess=True, batch_size=8, calib_stride=None) -> out_path
Builder = Callable[..., Path]

MATMUL_OPS = ("MatMul", "Gemm", "Conv")
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (onnxruntime's CPU fast path)
CALIB_BATCH_SIZE = 8


class BaselineError(QCompileError):
    """An onnxruntime baseline configuration could not be built, or its model does not load.

    `config` names the configuration, `reason` is the one-line cause, `stage` is "build" or
    "load", and `path` is the written model for a load failure (None otherwise).
    """

    def __init__(self, config: str, reason: str, path: PathLike | None = None) -> None:
        super().__init__(f"{config}: {reason}")
        self.config = config
        self.reason = reason
        self.path = Path(path) if path is not None else None
        self.stage = "load" if path is not None else "build"


# --------------------------------------------------------------------------- data


class NpzDataReader(CalibrationDataReader):
    """Streams batches from one `.npz` (arrays keyed by input name, first axis = samples).

    The input arrays are read once per pass (an `.npz` member cannot be memory-mapped) and yielded
    batch by batch, cast to the model's input dtypes. Batches have equal sizes (the largest divisor
    of the number of samples in range that is <= `batch_size`): onnxruntime's histogram
    calibrators stack the collected outputs with `np.asarray(list)`, which fails on a ragged last
    batch. `set_range` lets onnxruntime's `CalibStridedMinMax` option calibrate in strides;
    `rewind` starts over.
    """

    def __init__(self, path: PathLike, input_names: list[str], batch_size: int = CALIB_BATCH_SIZE,
                 dtypes: dict[str, np.dtype] | None = None) -> None:
        self.path = Path(path)
        self.input_names = list(input_names)
        self.dtypes = dtypes or {}
        with np.load(self.path) as z:
            missing = [n for n in self.input_names if n not in z.files]
            if missing:
                raise ValueError(f"{self.path.name}: no arrays for model inputs {missing} (has {sorted(z.files)})")
            sizes = {z[n].shape[0] for n in self.input_names}
        if len(sizes) != 1:
            raise ValueError(f"{self.path.name}: inputs have different sample counts {sorted(sizes)}")
        self.n = sizes.pop()
        self.batch_size = max(1, batch_size)
        self.start, self.stop = 0, self.n
        self._it: Iterator[dict] | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.stop = start_index, min(end_index, self.n)
        self._it = None

    def rewind(self) -> None:
        self._it = None

    def _batches(self) -> Iterator[dict]:
        with np.load(self.path) as z:
            arrays = {n: z[n] for n in self.input_names}  # npz members are read once, not per batch
        count = len(self)
        step = max((d for d in range(1, min(self.batch_size, count) + 1) if count % d == 0), default=1)
        for s in range(self.start, self.stop, step):
            yield {name: np.ascontiguousarray(a[s : s + step], dtype=self.dtypes.get(name, a.dtype))
                   for name, a in arrays.items()}

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)



def _model_inputs(path: PathLike) -> tuple[list[str], dict[str, np.dtype]]:
    """Graph inputs that are not initializers, with their numpy dtypes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names, dtypes = [], {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        names.append(v.name)
        dtypes[v.name] = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
    return names, dtypes


def data_reader(float_path: PathLike, calib: PathLike, batch_size: int = CALIB_BATCH_SIZE) -> NpzDataReader:
    """An `NpzDataReader` over `calib` for the inputs of the model at `float_path`."""
    names, dtypes = _model_inputs(float_path)
    return NpzDataReader(calib, names, batch_size, dtypes)


# --------------------------------------------------------------------------- pre-processing


@contextlib.contextmanager
def _quiet_stdout():
    """onnxruntime's calibrators `print` progress; keep stdout for results (send it to stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def preprocess(float_path: PathLike, out_path: PathLike) -> str:
    """Run `quant_pre_process`; returns which variant succeeded ("full", "no-symbolic-shape", "none").

    "none" means `out_path` holds an unchanged copy of the float model.
    """
    import shutil

    from onnxruntime.quantization.shape_inference import quant_pre_process

    for variant, kwargs in (("full", {}), ("no-symbolic-shape", {"skip_symbolic_shape": True})):
        try:
            with _quiet_stdout():
                quant_pre_process(str(float_path), str(out_path), **kwargs)
            log.info("quant_pre_process(%s): %s", Path(float_path).name, variant)
            return variant
        except Exception as e:  # noqa: BLE001 - onnxruntime raises bare Exception here
            log.info("quant_pre_process(%s) %s failed: %s: %s", Path(float_path).name, variant,
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    shutil.copyfile(float_path, out_path)
    log.info("quant_pre_process(%s): none (quantizing the float model as is)", Path(float_path).name)
    return "none"


@contextlib.contextmanager
def _prepared(float_path: PathLike, enabled: bool) -> Iterator[Path]:
    if not enabled:
        yield Path(float_path)
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-ort-pre-") as d:
        out = Path(d) / "preprocessed.onnx"
        preprocess(float_path, out)
        yield out


# --------------------------------------------------------------------------- builders


def _dynamic(float_path: PathLike, calib: PathLike | None, out_path: PathLike, *, per_channel: bool,
             preprocess: bool = True, batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None) -> Path:
    """quantize_dynamic: int8 weights, activations quantized at run time; `calib` is not used."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del calib, batch_size, calib_stride
    with _prepared(float_path, preprocess) as src, _quiet_stdout():
        quantize_dynamic(str(src), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8)
    return Path(out_path)


def _calib_options(calib_stride: int | None) -> dict:
    # CalibStridedMinMax: despite its name quantize_static applies it to every calibrator; the
    # histogram calibrators then merge their histograms stride by stride instead of holding every
    # sample's tensors at once (the number of samples must be a multiple of the stride).
    return {"CalibStridedMinMax": int(calib_stride)} if calib_stride else {}


def _static(float_path: PathLike, calib: PathLike, out_path: PathLike, *, method: str, ops: tuple[str, ...] | None,
            preprocess: bool = True, batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None) -> Path:
    """quantize_static, QDQ, per-channel int8 weights and int8 activations (ORT's defaults otherwise).

    Entropy through quantize_static cannot set its bin counts (num_bins = num_quantized_bins = 128),
    so the only threshold candidate is the full range: without strides it reproduces MinMax.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
    reader = data_reader(float_path, calib, batch_size)
    with _prepared(float_path, preprocess) as src, _quiet_stdout():
        quantize_static(
            str(src), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(ops) if ops else None,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            extra_options=_calib_options(calib_stride),
        )
    return Path(out_path)


def _fp8(float_path: PathLike, calib: PathLike, out_path: PathLike, *, preprocess: bool = True,
         batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None) -> Path:
    """quantize_static with FLOAT8E4M3FN weights and activations on MatMul/Gemm/Conv, QDQ.

    The options that work: onnxruntime accepts only `CalibrationMethod.Distribution` for float 8
    (it raises ValueError otherwise); float 8 needs the QDQ format; weights per tensor (its
    default; per-channel measured no better on MiniLM). Quantizing all ops fails on models whose
    tensors reach float32's limits, such as the -3.4e38 attention-mask bias of Hugging Face BERTs:
    the Distribution histogram over (-max, max) overflows ("Too many bins for data range"), so the
    quantized ops are the same as qcompile's (MatMul, Gemm, Conv).

    The result does not load in onnxruntime's default ENABLE_ALL session (the QDQ fusion turns a
    float8 Q/DQ MatMul into QLinearMatMul, which has no float8 kernel); `build` reports that, and
    `evaluate(..., session_config=FALLBACK_SESSION_CONFIG)` runs it with the QDQ fusions disabled.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = data_reader(float_path, calib, batch_size)
    with _prepared(float_path, preprocess) as src, _quiet_stdout():
        quantize_static(
            str(src), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(MATMUL_OPS),
            activation_type=QuantType.QFLOAT8E4M3FN,
            weight_type=QuantType.QFLOAT8E4M3FN,
            calibrate_method=CalibrationMethod.Distribution,
            extra_options=_calib_options(calib_stride),
        )
    return Path(out_path)


def _int4(float_path: PathLike, calib: PathLike | None, out_path: PathLike, *, preprocess: bool = True,
          batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None) -> Path:
    """MatMulNBitsQuantizer (RTN): 4-bit weight-only MatMulNBits, block 32, symmetric, accuracy_level 4."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    del calib, batch_size, calib_stride
    with _prepared(float_path, preprocess) as src, _quiet_stdout():
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                 accuracy_level=INT4_ACCURACY_LEVEL)
        q.process()
        q.model.save_model_to_file(str(out_path), False)
    return Path(out_path)


BASELINES: dict[str, Builder] = {
    "ort-dynamic": partial(_dynamic, per_channel=True),
    "ort-dynamic-pt": partial(_dynamic, per_channel=False),
    **{f"ort-static-all-{m}": partial(_static, method=m, ops=None) for m in ("minmax", "percentile", "entropy")},
    **{f"ort-static-matmul-{m}": partial(_static, method=m, ops=MATMUL_OPS) for m in ("minmax", "percentile", "entropy")},
    "ort-fp8": _fp8,
    "ort-int4": _int4,
}

# onnxruntime's HistogramCalibrater keeps the calibrated tensors of every sample in memory until the
# data reader is exhausted (MiniLM, 256 sentences of 85 tokens: 6 GB peak for MatMul inputs, 13 GB for
# all ops). Run these one at a time (`build_isolated`), or pass `calib_stride`.
HISTOGRAM_CALIBRATED = frozenset(n for n in BASELINES if n.endswith(("-percentile", "-entropy")) or n == "ort-fp8")

# Session config entries under which a QDQ model that fails onnxruntime's QDQ fusions (float8 Q/DQ
# around MatMul -> QLinearMatMul, which has no float8 kernel) still loads at ENABLE_ALL.
FALLBACK_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _session(path: PathLike, session_config: dict[str, str] | None = None):
    """onnxruntime CPU session at ENABLE_ALL, 1 thread (qcompile's validation settings)."""
    import onnxruntime as ort

    from qcompile.backends.onnxruntime.session import session_options

    so = session_options("all")
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_loads(path: PathLike, config: str = "", session_config: dict[str, str] | None = None) -> None:
    """Raise BaselineError unless `path` loads in onnxruntime's optimized CPU session (ENABLE_ALL)."""
    try:
        _session(path, session_config)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/RuntimeException
        raise BaselineError(config or Path(path).name,
                            f"does not load in onnxruntime (ENABLE_ALL): {_one_line(e)}", path=path) from None


def build(name: str, float_path: PathLike, calib: PathLike, out_path: PathLike, *, preprocess: bool = True,
          batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None, check: bool = True) -> Path:
    """Build baseline `name` into `out_path` and return it.

    Any failure raises BaselineError naming `name`: `stage="build"` when onnxruntime's quantizer
    fails, `stage="load"` when the model was written but does not load in onnxruntime's ENABLE_ALL
    session (then `error.path` is the model, which a caller may still evaluate, e.g. with
    `FALLBACK_SESSION_CONFIG`). `check=False` skips the load check.
    """
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        BASELINES[name](float_path, calib, out_path, preprocess=preprocess, batch_size=batch_size,
                        calib_stride=calib_stride)
    except MemoryError:
        raise BaselineError(name, "failed to build: out of memory") from None
    except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises anything from ValueError to bare Exception
        log.debug("baseline %s failed", name, exc_info=True)
        raise BaselineError(name, f"failed to build: {_one_line(e)}") from None
    if not out_path.is_file():
        raise BaselineError(name, f"failed to build: onnxruntime wrote no model at {out_path}")
    if check:
        check_loads(out_path, name)
    return out_path


_CHILD = """
import json, sys, time, logging
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from qcompile.baselines import build, BaselineError, peak_rss_bytes
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
rec = {"config": a.pop("name")}
try:
    rec["path"] = str(build(rec["config"], **a))
    rec["error"] = rec["stage"] = None
except BaselineError as e:
    rec["path"] = str(e.path) if e.path else None
    rec["error"], rec["stage"] = e.reason, e.stage
rec["seconds"] = round(time.perf_counter() - t0, 3)
rec["peak_rss_bytes"] = peak_rss_bytes()
sys.stdout.write("\\n" + json.dumps(rec) + "\\n")
"""


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (or exec'd).

    Linux's VmHWM, which starts afresh at exec; `getrusage`'s ru_maxrss would instead carry the
    parent's RSS into a child started with fork + exec (it is preserved across execve).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build_isolated(name: str, float_path: PathLike, calib: PathLike, out_path: PathLike, *, preprocess: bool = True,
                   batch_size: int = CALIB_BATCH_SIZE, calib_stride: int | None = None, check: bool = True,
                   timeout: float | None = None) -> dict:
    """`build` in a fresh Python process, so that one configuration's memory is returned when it ends.

    Returns {"config", "path", "error", "stage", "seconds", "peak_rss_bytes"}: `path` is the written
    model or None; `error` is None or the reason; `stage` is None, "build" or "load" (see `build`);
    `seconds` is the build's wall time (without interpreter start-up) and `peak_rss_bytes` the
    child's peak RSS. Never raises for a failed configuration: a crash (killed, out of memory,
    timeout) is recorded as a build error.
    """
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    # absolute paths: the child runs in a scratch directory, because onnxruntime's quantizer
    # drops temporary files (external data, shape-inference models) into its working directory
    args = {"name": name, "float_path": str(Path(float_path).resolve()), "calib": str(Path(calib).resolve()),
            "out_path": str(Path(out_path).resolve()),
            "preprocess": preprocess, "batch_size": batch_size, "calib_stride": calib_stride, "check": check}
    t0 = time.perf_counter()
    failed = {"config": name, "path": None, "stage": "build", "peak_rss_bytes": None}
    try:
        with tempfile.TemporaryDirectory(prefix="qcompile-ort-") as scratch:
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                                  timeout=timeout, cwd=scratch)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"failed to build: timed out after {timeout:g} s",
                "seconds": round(time.perf_counter() - t0, 3)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode == -9:
        how += " (out of memory?)"
    return {**failed, "error": f"failed to build: process {how}: {tail}".rstrip(": "),
            "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- evaluation


def evaluate(float_path: PathLike, quant_path: PathLike, eval_npz: PathLike, batch_size: int = 8,
             session_config: dict[str, str] | None = None, float_session=None) -> dict[str, dict]:
    """Per-output metrics of `quant_path` against `float_path` on `eval_npz`.

    The same metrics qcompile's validation reports (`qcompile.validate.compare`): for each output
    sqnr_db, cosine_mean, cosine_min, max_abs_err, samples, and top1_agreement / softmax_kl when the
    output looks like class scores. Both models run in onnxruntime's optimized CPU session
    (ENABLE_ALL, 1 thread), so qcompile's models and the baselines are measured alike.
    `session_config` adds session config entries for the quantized model only (e.g.
    `FALLBACK_SESSION_CONFIG` for a model that does not load otherwise); the metrics are then
    accumulated with `qcompile.validate.OutputStats`, as `compare` does. `float_session` (an
    onnxruntime session of `float_path`) saves rebuilding it when evaluating several models.
    """
    from qcompile.data import Dataset, InputInfo
    from qcompile.pipeline import load_model
    from qcompile.validate import OutputStats, compare, looks_like_scores

    f = load_model(float_path)
    data = Dataset(eval_npz, InputInfo.of_model(f))
    if not session_config:
        return compare(f, load_model(quant_path), data, batch_size, float_session=float_session)
    ref, test = float_session or _session(float_path), _session(quant_path, session_config)
    outs = {o.name for o in test.get_outputs()}
    stats = {v.name: OutputStats(scores=looks_like_scores(v)) for v in f.graph.outputs if v.name in outs}
    names = list(stats)
    for batch in data.batches(batch_size):
        for name, r, o in zip(names, ref.run(names, batch), test.run(names, batch)):
            stats[name].update(np.asarray(r), np.asarray(o))
    return {name: s.summary() for name, s in stats.items()}


__all__ = ["BASELINES", "FALLBACK_SESSION_CONFIG", "HISTOGRAM_CALIBRATED", "BaselineError", "NpzDataReader", "build",
           "build_isolated", "check_loads", "data_reader", "evaluate", "peak_rss_bytes", "preprocess"]
