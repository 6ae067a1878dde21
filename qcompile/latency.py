"""Measured latency costs for the mixed-precision allocation (`--budget-latency`).

Each layer under each candidate is timed as a microbenchmark: the one-layer model (the node,
its real constant weight, its activation inputs at the shapes the first calibration sample
gives) compiled for the candidate (float: as it is), in onnxruntime ENABLE_ALL, 1 thread, the
median of RUNS runs after WARMUP. A measurement's key is everything it depends on -- op type,
attributes, input shapes, the weight's shape, the candidate, the lowering, the CPU class and
the onnxruntime version -- and the table of them is JSON in $QCOMPILE_CACHE/latency/, reused by
every model with layers of the same shapes.

`fixed` is what no candidate changes: the float model's median latency minus the sum of its
layers' float latencies (>= 0). A budget of R x float then bounds sum_i lat[i, c_i] + fixed by
R x (sum_i lat[i, float] + fixed); the compiled model's own latency is what the bench checks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

log = logging.getLogger(__name__)
RUNS, WARMUP = 15, 3


def table_path() -> Path:
    from qcompile.cpu import host_cpu

    import onnxruntime

    env = os.environ.get("QCOMPILE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "qcompile"
    return root / "latency" / f"{host_cpu().value}-ort{onnxruntime.__version__}.json"


def _median_seconds(model: ir.Model | onnx.ModelProto, feed: dict) -> float:
    from qcompile.backends.onnxruntime.session import make_session

    sess = make_session(model, level="all", threads=1)
    for _ in range(WARMUP):
        sess.run(None, feed)
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_layer(node: ir.Node, opset: int, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The node alone: its activation inputs (named in `feed`, at their arrays' shapes and types)
    as graph inputs, its constant inputs as initializers, its first output as the graph's."""
    inputs, inits, names = [], [], []
    for i, v in enumerate(node.inputs):
        if v is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if v.const_value is not None:
            inits.append(onnx.numpy_helper.from_array(v.const_value.numpy(), name))
        else:
            a = feed[v.name]
            shape = ["N", *a.shape[1:]] if a.ndim else []  # calibrated on copies of the sample, timed on it
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), shape))
    attrs = {k: a.value if a.type != ir.AttributeType.TENSOR else onnx.numpy_helper.from_array(a.value.numpy())
             for k, a in node.attributes.items()}
    n = helper.make_node(node.op_type, names, ["y"], name=node.name, domain=node.domain, **attrs)
    elem = next((helper.np_dtype_to_tensor_dtype(feed[v.name].dtype) for v in node.inputs if v is not None and v.const_value is None),
                onnx.TensorProto.FLOAT)
    out = helper.make_tensor_value_info("y", elem, None)
    g = helper.make_graph([n], "layer", inputs, [out], inits)
    ops = [helper.make_opsetid("", opset)]
    return helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))  # onnxruntime takes <= 13


def _key(node: ir.Node, feed: dict[str, np.ndarray], candidate: str, lowering: str) -> str:
    from qcompile.cpu import host_cpu

    import onnxruntime

    parts = [node.op_type, node.domain, candidate, lowering, host_cpu().value, onnxruntime.__version__]
    parts += [f"{k}={a.value!r}" for k, a in sorted(node.attributes.items()) if a.type != ir.AttributeType.TENSOR]
    for v in node.inputs:
        if v is None:
            parts.append("-")
        elif v.const_value is not None:
            parts.append(f"w{tuple(v.const_value.shape)}:{v.const_value.dtype}")
        else:
            parts.append(f"x{feed[v.name].shape}:{feed[v.name].dtype}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def measure(graph: ir.Graph, opset: int, layers: list[str], candidates: dict[str, list[str]], feed: dict[str, np.ndarray],
            lowering: str = "auto") -> dict[tuple[str, str], float]:
    """(layer, candidate) -> seconds for every layer and each candidate in `candidates[layer]`
    ("float" included), from the table or measured now (and stored); `feed` holds every layer's
    activation inputs at batch 1."""
    import qcompile

    path = table_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    nodes = {n.name: n for n in graph}
    out, new = {}, 0
    for layer in layers:
        node = nodes[layer]
        model = one_layer(node, opset, feed)
        x = {f"in{i}": feed[v.name] for i, v in enumerate(node.inputs) if v is not None and v.const_value is None}
        for cand in candidates[layer]:
            key = _key(node, feed, cand, lowering)
            if key not in table:
                if cand == "float":
                    compiled = model
                else:
                    calib = {k: np.concatenate([a] * 8) for k, a in x.items()}
                    compiled = qcompile.compile(model, cand, calib=calib, validate=False, lowering=lowering,
                                                max_float=0).model
                table[key] = _median_seconds(compiled, x)
                new += 1
            out[(layer, cand)] = table[key]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0))
        os.replace(tmp, path)
        log.info("latency table: %d microbenchmarks measured, %d in %s", new, len(table), path)
    return out


def model_seconds(model: ir.Model, feed: dict[str, np.ndarray]) -> float:
    """The whole model's median latency on `feed` (the first calibration sample)."""
    return _median_seconds(model, feed)
