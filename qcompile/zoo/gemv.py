"""The GEMV chain: a synthetic decode-speed model, built with numpy + onnx only (no torch).

Graph: ``x`` (float32, [batch, dim]) -> ``layers`` x [MatMul by W_i (dim x dim), Mul by the
scalar 1/sqrt(dim)] -> ``y`` (float32, [batch, dim]). With the default 12 x 4096 it holds
12 * 4096 * 4096 float32 weights (805,306,368 bytes), which is the working set of a small LLM's
decode step: at batch 1 every MatMul is a matrix-vector product bound by memory bandwidth.

The weights W_i ~ N(0, 1) are drawn layer by layer by numpy (SFC64 seeded with ``(SEED, i)``),
so a rebuild gives the same bytes and the build never holds more than one layer in memory. The
Mul by 1/sqrt(dim) keeps activations ~N(0, 1) along the chain (no nonlinearity is needed). The
weights are stored as ONNX external data in one file next to the model, ``<model name>.data``
(``gemv.onnx`` -> ``gemv.onnx.data``, referenced by that relative name), so the two files must
stay side by side under those names. The build checks the model with ``onnx.checker``, loads it
in onnxruntime and compares one forward pass with a float64 numpy reference.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np

from qcompile.zoo import ZooBuildError

INPUT, OUTPUT = "x", "y"
LAYERS, DIM = 12, 4096
SEED = 0
OPSET, IR_VERSION = 18, 10
RTOL = 1e-4
SPLITS = ("calib", "eval")


def data_path(path: str | Path) -> Path:
    """The external-data file of the model at ``path``: ``<path>.data`` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def weight(i: int, dim: int = DIM, out: np.ndarray | None = None) -> np.ndarray:
    """Weight matrix ``i`` (float32, dim x dim, ~N(0, 1)), generated deterministically (SFC64
    seeded with (SEED, i)); ``out`` is an optional float32 buffer of that shape to fill."""
    if out is None:
        out = np.empty((dim, dim), dtype=np.float32)
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([SEED, i])))
    return rng.standard_normal(dtype=np.float32, out=out)


def _step(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One layer in float64: ``(y @ w) / sqrt(dim)``, converting ``w`` in blocks of rows (cheaper
    than a whole float64 copy of a 64 MB matrix)."""
    out = np.zeros((y.shape[0], w.shape[1]), dtype=np.float64)
    for r in range(0, w.shape[0], 256):
        out += y[:, r:r + 256] @ w[r:r + 256].astype(np.float64)
    return out * (1.0 / math.sqrt(w.shape[0]))


def reference(x: np.ndarray, layers: int = LAYERS, dim: int = DIM) -> np.ndarray:
    """The chain computed by numpy in float64 (one weight matrix in memory at a time)."""
    y = np.asarray(x, dtype=np.float64)
    for i in range(layers):
        y = _step(y, weight(i, dim))
    return y


def _probe(layers: int, dim: int, batch: int = 2) -> np.ndarray:
    """The fixed input of the build's verification."""
    rng = np.random.default_rng([SEED, layers, dim])
    return rng.standard_normal((batch, dim), dtype=np.float32)


def write_npz(path: str | Path, split: str, n: int, seed: int = 0, dim: int = DIM) -> Path:
    """Write ``n`` random N(0, 1) float32 vectors as an .npz: ``x`` of shape [n, dim].

    Deterministic in (split, n, seed, dim); the splits use disjoint seed streams.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([1 + SPLITS.index(split), seed, dim])
    x = rng.standard_normal((n, dim), dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a str path without it
        np.savez(f, **{INPUT: x})
    return path


def _write(path: Path, layers: int, dim: int, x: np.ndarray) -> tuple[str, np.ndarray]:
    """Write the model to ``path`` and its weights to :func:`data_path`.

    The weights are generated and streamed to the data file one layer at a time; each initializer
    points at its slice (offsets are multiples of 4096 bytes, so onnxruntime can memory-map them).
    Returns the sha256 of the data file and :func:`reference` of ``x``, computed on the way so
    that each weight is generated only once.
    """
    from onnx import TensorProto, helper

    data = data_path(path)
    digest = hashlib.sha256()
    initializers, nodes = [], []
    nbytes = dim * dim * 4
    ref = np.asarray(x, dtype=np.float64)
    if sys.byteorder != "little":
        raise ZooBuildError("the external data must be little-endian float32")
    w = np.empty((dim, dim), dtype=np.float32)  # one buffer reused for every layer
    with open(data, "wb") as f:
        for i in range(layers):
            weight(i, dim, out=w)
            ref = _step(ref, w)
            raw = memoryview(w).cast("B")
            offset = f.tell()
            f.write(raw)
            digest.update(raw)
            pad = -f.tell() % 4096
            if pad and i + 1 < layers:
                f.write(b"\0" * pad)
                digest.update(b"\0" * pad)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(nbytes))):
                t.external_data.add(key=key, value=value)
            initializers.append(t)
    initializers.append(helper.make_tensor("scale", TensorProto.FLOAT, [],
                                           [np.float32(1.0 / math.sqrt(dim))]))
    prev = INPUT
    for i in range(layers):
        out = OUTPUT if i + 1 == layers else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Mul", [f"mm{i}", "scale"], [out], name=f"scale{i}"))
        prev = out
    graph = helper.make_graph(
        nodes, "gemv_chain",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompile.zoo.gemv", ir_version=IR_VERSION)
    model.doc_string = f"GEMV chain: {layers} x MatMul[{dim}x{dim}] * 1/sqrt({dim}), seed {SEED}"
    path.write_bytes(model.SerializeToString(deterministic=True))
    return digest.hexdigest(), ref


def verify(path: Path, x: np.ndarray, want: np.ndarray) -> float:
    """Run ``x`` through the model in onnxruntime and compare with ``want`` (:func:`reference`).

    Returns max |onnx - ref| / max |ref|. Raises ZooBuildError unless
    ``|onnx - ref| <= RTOL * (|ref| + rms(ref))`` elementwise (the rms term is the absolute
    tolerance for the entries that happen to be near zero).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: x})[0]
    del session
    if got.shape != want.shape or got.dtype != np.float32:
        raise ZooBuildError(f"ONNX output {got.dtype}{got.shape} != reference {want.shape}")
    err = np.abs(got - want)
    scale = float(np.abs(want).max())
    rms = float(np.sqrt(np.mean(want**2)))
    if not (np.isfinite(got).all() and (err <= RTOL * (np.abs(want) + rms)).all()):
        raise ZooBuildError(f"gemv ONNX differs from the numpy reference: max abs diff "
                            f"{err.max():.3g} (max |ref| {scale:.3g}, rtol {RTOL:g})")
    return float(err.max()) / scale


def build(path: Path, layers: int = LAYERS, dim: int = DIM) -> dict:
    """Write, check and verify the chain at ``path`` (+ ``path.data``); return the figures.

    On failure the data file is removed too and the error is raised (ZooBuildError for a failed
    verification).
    """
    import onnx

    path = Path(path)
    data = data_path(path)
    try:
        t0 = time.perf_counter()
        x = _probe(layers, dim)
        data_sha, want = _write(path, layers, dim, x)
        write_s = time.perf_counter() - t0
        onnx.checker.check_model(str(path), full_check=True)
        t0 = time.perf_counter()
        rel_diff = verify(path, x, want)
        verify_s = time.perf_counter() - t0
    except BaseException:
        data.unlink(missing_ok=True)
        raise
    import onnxruntime

    return {
        "model": f"GEMV chain {layers} x [{dim}x{dim}] float32, N(0,1) weights",
        "layers": layers,
        "dim": dim,
        "seed": SEED,
        "parameters": layers * dim * dim,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ir_version": IR_VERSION,
        "opset": OPSET,
        "write_seconds": round(write_s, 2),  # generate + write weights + float64 reference
        "verify_seconds": round(verify_s, 2),
        "file_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "data_file": data.name,
        "data_bytes": data.stat().st_size,
        "data_sha256": data_sha,
        "max_rel_diff": rel_diff,
        "rtol": RTOL,
    }
