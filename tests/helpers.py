"""Shared test helpers: onnxruntime sessions, metrics, graph inspection and the pass contract.

Kept independent of `qcompile.backends.onnxruntime.session` on purpose, so a broken session helper
in the library cannot make its own tests pass.
"""
from __future__ import annotations

import collections
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# onnxruntime kernels that compute on integers (what int8 Q/DQ around MatMul/Conv/Gemm must become).
INTEGER_KERNELS = {
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulNBits",
}
# Float compute ops: one of these reading a DequantizeLinear output in the *optimized* graph means
# onnxruntime re-dequantizes the tensor every run and computes in float (the fusion did not happen).
FLOAT_COMPUTE = {"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedGemm", "FusedConv", "NhwcFusedConv"}


# --- onnxruntime -------------------------------------------------------------------------------
def to_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    return onnx.load(str(model))


def session_options(level: str = "all") -> ort.SessionOptions:
    """Stock onnxruntime options: 1 thread at `level` (no custom-op library registered)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def session(model, level: str = "all", optimized_path: str | os.PathLike | None = None) -> ort.InferenceSession:
    """A 1-thread CPU session at `level` (disable/basic/extended/all) on a proto, ir.Model or path."""
    so = session_options(level)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict, level: str = "all") -> list[np.ndarray]:
    return session(model, level).run(None, feeds)


def optimized(model, path: str | os.PathLike, level: str = "all") -> onnx.ModelProto:
    """The graph onnxruntime actually runs at `level` (saved through optimized_model_filepath)."""
    session(model, level, optimized_path=path)
    return onnx.load(str(path))


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in to_proto(model).graph.node)


def unfused_quantized_compute(opt: onnx.ModelProto) -> list[str]:
    """Float MatMul/Conv/Gemm (or their fused float forms) that read a DequantizeLinear output."""
    producer = {o: n for n in opt.graph.node for o in n.output}
    bad = []
    for n in opt.graph.node:
        if n.op_type in FLOAT_COMPUTE and any(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input):
            bad.append(f"{n.op_type}({n.name})")
    return bad


# --- metrics -----------------------------------------------------------------------------------
def sqnr_db(ref, test) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) in float64; inf when equal."""
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref**2)) / noise)


def rel_err(test, ref) -> float:
    """||test - ref|| / ||ref|| (Frobenius, float64)."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(test, dtype=np.float64) - ref) / np.linalg.norm(ref))


def assert_close_up_to_flips(got, ref, *, rtol: float, max_flipped: int, flip_bound: float, what: str = "") -> None:
    """Per sample (first axis): ||got - ref|| / ||ref|| <= rtol, and elementwise allclose(rtol), except
    for at most `max_flipped` samples whose relative error is still < `flip_bound`.

    For quantized models compared across kernels or a numpy reference: a pre-quantization value that
    lands within float32 noise of a rounding midpoint flips one code by one step, which moves one
    sample by far more than rtol but far less than any real defect (see test_lowering.py).
    """
    n = ref.shape[0]
    g = np.asarray(got, dtype=np.float64).reshape(n, -1)
    r = np.asarray(ref, dtype=np.float64).reshape(n, -1)
    per_sample = np.linalg.norm(g - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)
    flipped = np.flatnonzero(per_sample > rtol)
    assert flipped.size <= max_flipped, f"{what}: {flipped.size} samples differ by > {rtol} (worst {per_sample.max():.2e})"
    assert per_sample.max() < flip_bound, f"{what}: a sample differs by {per_sample.max():.2e} >= {flip_bound}"
    ok = np.setdiff1d(np.arange(n), flipped)
    np.testing.assert_allclose(g[ok], r[ok], rtol=rtol, atol=rtol * float(np.abs(r).max()), err_msg=what)


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- pass contract -----------------------------------------------------------------------------
def snapshot(model: ir.Model) -> bytes:
    """Deterministic bytes of the whole model (graph, initializers, opsets, IR version)."""
    return ir.to_proto(model).SerializeToString(deterministic=True)


def check_model(model: ir.Model, full: bool = True) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=full)


def assert_pass_contract(pass_, model: ir.Model, *, expect_modified: bool | None = None) -> ir.passes.PassResult:
    """Run `pass_` on `model` twice and check the contract of every qcompile pass:

    - `modified` is honest: True exactly when the model's serialized form changed;
    - the result passes `onnx.checker` (full check, with shape inference);
    - a second run is a no-op: modified False and the model byte-identical.
    Returns the first PassResult.
    """
    before = snapshot(model)
    first = pass_(model)
    after = snapshot(first.model)
    assert first.modified == (before != after), (
        f"{pass_!r}: modified={first.modified} but the model {'changed' if before != after else 'did not change'}"
    )
    if expect_modified is not None:
        assert first.modified is expect_modified, f"{pass_!r}: expected modified={expect_modified}"
    check_model(first.model)
    second = pass_(first.model)
    again = snapshot(second.model)
    assert again == after, f"{pass_!r}: a second run changed the model"
    assert second.modified is False, f"{pass_!r}: a second run reported modified=True on an unchanged model"
    return first


def node_by_name(model: ir.Model, name: str) -> ir.Node:
    for n in model.graph:
        if n.name == name:
            return n
    raise KeyError(name)


def producer_op(value: ir.Value | None) -> str | None:
    p = value.producer() if value is not None else None
    return p.op_type if p is not None else None


# --- bit-exact comparisons ------------------------------------------------------------------
def assert_bitwise(got: np.ndarray, ref: np.ndarray, what: str = "", zero_sign: bool = True) -> None:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    if not zero_sign:  # compare -0.0 and +0.0 as equal
        got, ref = got + np.float32(0), ref + np.float32(0)
    assert got.shape == ref.shape, what
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    bad = (got.view(np.uint32) != ref.view(np.uint32)) & ~nan
    assert not bad.any(), f"{what}: {bad.sum()} differ, e.g. got {got[bad][:5]} ref {ref[bad][:5]}"


def block_probe(rng, shape, axis) -> np.ndarray:
    """Random data with per-slice magnitudes from 2**-140 to 2**120, zero slices, ties, inf and NaN."""
    x = rng.normal(size=shape) * 2.0 ** rng.integers(-140, 120, [1 if d == axis % len(shape) else n
                                                                     for d, n in enumerate(shape)])
    x = np.moveaxis(x, axis, -1)
    x[0, 0] = 0.0  # all-zero blocks
    x[0, 1, ..., :32] = 2.0 ** np.arange(-8, 24, dtype=np.float64)  # one block of powers of two
    x[0, 2, ..., 3] = np.inf  # non-finite blocks
    x[1, 0, ..., 5] = np.nan
    x[-1, -1, ..., :16] = np.arange(16) + 0.5  # ties within a block of amax 15.5
    return np.moveaxis(x, -1, axis).astype(np.float32)


# --- other CPUs ------------------------------------------------------------------------------
# onnxruntime picks its kernels from CPUID. qemu-user with a Haswell CPU model (AVX2, FMA, F16C; no
# AVX-512, no VNNI) makes it dispatch the AVX2 kernels on any x86-64 host; the feature removals only
# silence qemu's warnings about host features TCG does not emulate.
QEMU_CPU = "Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-invpcid,-rtm"
_AVX2_RUNNER = r"""
import sys, numpy as np, onnxruntime as ort
levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
out = {}
for i, (path, feed_path, level) in enumerate(zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3])):
    feeds = np.load(feed_path)
    so = ort.SessionOptions(); so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = 1; so.inter_op_num_threads = 1; so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [v.name for v in sess.get_inputs()]
    for j, o in enumerate(sess.run(None, {n: feeds[n] for n in names})):
        out[f"{i}:{j}"] = o
np.savez(sys.argv[1], **out)
"""


def host_has_avx512_or_vnni() -> bool:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return bool(flags & {"avx512f", "avx512_vnni", "avx_vnni"})


def avx2_command() -> list[str]:
    """The command prefix that runs this Python on onnxruntime's AVX2 kernels: the interpreter itself
    on a CPU without AVX-512/VNNI, else qemu-x86_64 -cpu Haswell (skip without it; fail under CI,
    whose .ci/run installs Debian's qemu-user)."""
    import shutil
    import sys

    import pytest

    if not host_has_avx512_or_vnni():
        return [sys.executable]
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 (Debian package qemu-user) is needed to test the AVX2 kernels under CI")
        pytest.skip("qemu-x86_64 not installed (Debian package qemu-user): cannot run the AVX2 kernels here")
    return [qemu, "-cpu", QEMU_CPU, sys.executable]


def run_avx2(models: list, feeds: dict | list[dict], tmp_path, level: str = "all") -> list[list[np.ndarray]]:
    """Outputs of each model (path, ModelProto or ir.Model) on `feeds` (one dict for all, or one per
    model), computed by onnxruntime's AVX2 kernels at `level` (1 thread), in one child process."""
    import subprocess

    tmp_path = Path(tmp_path)
    feeds = feeds if isinstance(feeds, list) else [feeds] * len(models)
    args = []
    for i, (m, f) in enumerate(zip(models, feeds)):
        path = Path(m) if isinstance(m, (str, os.PathLike)) else tmp_path / f"avx2_model_{i}.onnx"
        if not isinstance(m, (str, os.PathLike)):
            onnx.save(to_proto(m), path)
        np.savez(tmp_path / f"avx2_feeds_{i}.npz", **f)
        args += [str(path), str(tmp_path / f"avx2_feeds_{i}.npz"), level]
    script = tmp_path / "avx2_runner.py"
    script.write_text(_AVX2_RUNNER)
    out_path = tmp_path / "avx2_out.npz"
    r = subprocess.run([*avx2_command(), str(script), str(out_path), *args], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"AVX2 run failed:\n{r.stderr[-3000:]}"
    out = np.load(out_path)
    return [[out[k] for k in sorted((k for k in out.files if k.startswith(f"{i}:")), key=lambda k: int(k.split(":")[1]))]
            for i in range(len(models))]
