"""onnxruntime sessions on in-memory onnx_ir models."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROTO_LIMIT = 1_800_000_000  # protobuf's 2 GiB limit, with headroom


def is_runtime_error(e: BaseException) -> bool:
    """An exception raised by onnxruntime itself (its pybind11 error types: Fail, InvalidGraph,
    InvalidArgument, NotImplemented, RuntimeException, ...)."""
    return type(e).__module__.startswith("onnxruntime")


def session_options(level: str = "all", threads: int = 1, optimized_path: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    from qcompile import native

    return native.session_options(so)  # the optional qcompile.native ops, when their library is built


def make_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, level: str = "all", threads: int = 1,
                 optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU session. In-memory models go through bytes, or a temp file with external data past 1.8 GB
    or when the model's weights live in an external data file."""
    so = session_options(level, threads, optimized_path)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=providers)
    if isinstance(model, ir.Model):
        consts = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
        external = any(isinstance(c, ir.ExternalTensor) for c in consts)  # bytes cannot refer to a data file
        if external or sum(c.nbytes for c in consts) > _PROTO_LIMIT:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data")
                return ort.InferenceSession(str(path), so, providers=providers)
        model = ir.to_proto(model)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
