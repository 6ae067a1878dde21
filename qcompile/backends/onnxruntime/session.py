"""onnxruntime sessions on in-memory onnx_ir models."""
from __future__ import annotations

import os

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile import external

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
FILE_SESSION_BYTES = 64 << 20  # in-memory models with more weight bytes than this load from a file


def compile_threads() -> int:
    """Intra-op threads of the sessions a compile runs on its data (calibration statistics, the float
    reference): every core this process may use, as onnxruntime's own quantizer does. Benchmarks
    and the validation of the compiled model keep 1 thread. QCOMPILE_THREADS overrides."""
    env = os.environ.get("QCOMPILE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def is_runtime_error(e: BaseException) -> bool:
    """An exception raised by onnxruntime itself (its pybind11 error types: Fail, InvalidGraph,
    InvalidArgument, NotImplemented, RuntimeException, ...)."""
    return type(e).__module__.startswith("onnxruntime")


def session_options(level: str = "all", threads: int = 1, optimized_path: str | None = None,
                    prepack: bool = True, spin: bool = True) -> ort.SessionOptions:
    """CPU session options; `prepack=False` keeps constant weights as loaded (memory-mapped) instead
    of a kernel-layout copy next to them (MLAS packs a float MatMul's B: twice the weight memory)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:  # idle workers sleep: the caller's own thread shares the cores with the session
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from qcompile import native

    return native.session_options(so)  # the optional qcompile.native ops, when their library is built


def make_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, level: str = "all", threads: int = 1,
                 optimized_path: str | None = None, prepack: bool = True, spin: bool = True) -> ort.InferenceSession:
    """A CPU session. A path loads as is; an in-memory model whose weights live in external data
    files, or exceed FILE_SESSION_BYTES, is written as a session file that refers to those files
    in place (`qcompile.external.session_file`: no copy of the weights, onnxruntime maps them);
    a small one goes through bytes."""
    so = session_options(level, threads, optimized_path, prepack, spin)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=providers)
    if isinstance(model, ir.Model):
        if external.external_tensors(model) or external.weight_bytes(model) > FILE_SESSION_BYTES:
            with external.session_path(model) as path:
                return ort.InferenceSession(str(path), so, providers=providers)
        model = ir.to_proto(model)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
