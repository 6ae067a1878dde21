"""Optional native onnxruntime custom-op library: fused "dequantize packed FP4 + MatMul".

Nothing here is needed to import qcompile or to run models that only use standard ops. `build()`
compiles the C++ sources under the repo's `native/` directory into a shared library (cached), and
`session_options()` registers it on an onnxruntime SessionOptions; a model using the op loads only
in such a session.

Op `MatMulFp4`, domain `qcompile.native` (version 1):

    Y = MatMulFp4(X, W, S[, T][, A_T])   attributes K, N, block_size, scale_type ("e8m0" | "e4m3"),
                                         act ("none" (default) | "mxfp4" | "nvfp4")
    Y[..., n] = sum_k fq(X)[..., k] * e2m1(code[k, n]) * scale(k // block_size, n)   (float32 accumulation)

    scale = 2**(c - 127) for E8M0 codes c (255 = NaN: OCP MX), or float32(e4m3fn(c) * T) for
    E4M3 codes (NVFP4; T = 1 when absent) -- exactly `PackedTensor.dequantize()`.

    fq = identity for act "none"; otherwise the run-time activation quantize-dequantize of each
    row of X in blocks along K, bit-exact with `codec.fake_quant(X, FORMATS[act], axis=-1,
    tensor_scale=A_T)`: "mxfp4" = OCP MX E8M0 scales per 32 (no A_T), "nvfp4" = E4M3 scales per
    16 under the static float32 activation tensor scale A_T (scalar or [1], required). T may be
    an empty-named input when A_T is given without a weight tensor scale.

Storage (column-major, "one row of bytes per output"), Kp = K rounded up to a multiple of
max(64, block_size), padding codes 0 and padding scales 1.0:
    W uint8 [N, Kp / 2]           byte j of row n = code[2j, n] | code[2j + 1, n] << 4
    S uint8 [N, Kp / block_size]  scale code of block b of column n
    T float32 [1]                 NVFP4 weight tensor scale (optional input)
    A_T float32 [] or [1]         NVFP4 activation tensor scale (only with act "nvfp4")
so an MXFP4 4096x4096 layer stores 8 MiB of codes + 0.5 MiB of scales (4.25 bits per weight).

Op `BlockHadamard` (same domain): Y = (X * D) (I (x) H_block / sqrt(block)) over X's last axis
(float32 [..., K], K a multiple of the power-of-two `block`; D float32 [K] optional signs), the
online rotation of `passes.rotate` under --lowering native (native/hadamard.h).

The C API headers come from the npm package `HEADERS_PACKAGE@HEADERS_VERSION` (onnxruntime C API
version `ORT_API_VERSION`, which onnxruntime 1.29+ serves), fetched once with `npm pack` and
checked against its pinned sha512; `$QCOMPILE_ORT_INCLUDE` may point at a directory holding
`onnxruntime_c_api.h` instead. The library does not link against libonnxruntime: it uses the
OrtApi handed to `RegisterCustomOps`.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.formats import FORMATS, BlockFormat
from qcompile.storage import PackedTensor

DOMAIN = "qcompile.native"
VERSION = 1
OP = "MatMulFp4"
F8_OP = "MatMulF8"
_F8_FORMATS = {ir.DataType.FLOAT8E4M3FN: "e4m3fn", ir.DataType.FLOAT8E5M2: "e5m2"}
# Native twins of the qcompile function ops: same inputs, attributes and values (native/fake_quant.h).
FAKE_QUANT_OPS = ("FakeQuantMX", "FakeQuantNVFP4", "FakeQuantMinifloat")

HEADERS_PACKAGE = "com.github.asus4.onnxruntime"  # ONNX Runtime plugin for Unity: ships the C/C++ headers
HEADERS_VERSION = "0.4.9"
HEADERS_INTEGRITY = "sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
HEADERS_PREFIX = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers/"
ORT_API_VERSION = 29

SOURCE_DIR = Path(__file__).resolve().parent.parent / "native"
SOURCES = ("custom_op.cc", "fp4_gemm.cc", "fake_quant.cc", "f8_gemm.cc", "hadamard.cc")
HEADERS = ("isa.h", "fp4_gemm.h", "fake_quant.h", "f8_gemm.h", "hadamard.h")
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DNDEBUG")
# ISA -> compiler flags; the kernel picks its code path from the macros these define.
ISA_FLAGS = {
    # 512-bit vpdpbusd for the W4A4 integer block dot products (AVX2 elsewhere)
    "avx512-vnni": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    "avx2-vnni": ("-mavx2", "-mfma", "-mf16c", "-mavxvnni"),  # 256-bit vpdpbusd
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "scalar": (),
}
# CPU flags (/proc/cpuinfo) each ISA needs, best first.
ISA_CPU_FLAGS = {
    "avx512-vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx2-vnni": {"avx2", "fma", "f16c", "avx_vnni"},
    "avx2": {"avx2", "fma", "f16c"},
}

_SCALE_TYPES = {"e8m0": ("e8m0", 127), "e4m3fn": ("e4m3", 0x38)}  # scale format -> (attribute, code of 1.0)


class NativeUnavailable(RuntimeError):
    """The native library cannot be built or loaded here; the message says why in one line."""


# --- build ------------------------------------------------------------------------------------


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $QCOMPILE_CACHE/native, else ~/.cache/qcompile/native; always absolute, so
    a library path stays valid for a process started in another directory (onnxruntime's
    `register_custom_ops_library` resolves a relative path against its own working directory)."""
    if cache_dir is not None:
        return Path(cache_dir).absolute()
    env = os.environ.get("QCOMPILE_CACHE")
    return ((Path(env) if env else Path.home() / ".cache" / "qcompile") / "native").absolute()


# /proc/cpuinfo flag -> numpy's name for it. numpy's CPU dispatch asks cpuid (and the OS, xgetbv),
# which an emulator answers for the CPU it emulates; qemu-user passes the host's /proc/cpuinfo through.
_CPUID_NAMES = {"avx2": "AVX2", "fma": "FMA3", "f16c": "F16C", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
                "avx512vl": "AVX512VL", "avx512_vnni": "AVX512VNNI"}


def cpu_flags() -> set[str]:
    """The CPU's /proc/cpuinfo flags, checked against cpuid where numpy reports the feature: when
    cpuid denies one the file claims (the file describes another CPU, e.g. under qemu-user), only
    the features cpuid confirms are kept (so also no AVX-VNNI, which numpy does not report)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as cpuid
    if any(f in flags and not cpuid.get(name, True) for f, name in _CPUID_NAMES.items()):
        flags = {f for f, name in _CPUID_NAMES.items() if cpuid.get(name)}
    return flags


def detect_isa() -> str:
    """The best ISA_FLAGS entry the CPU supports ($QCOMPILE_NATIVE_ISA overrides), else 'scalar'."""
    forced = os.environ.get("QCOMPILE_NATIVE_ISA")
    if forced:
        return forced
    flags = cpu_flags()
    return next((isa for isa, need in ISA_CPU_FLAGS.items() if need <= flags), "scalar")


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise NativeUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'g++')} not found)")
    return cxx


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else cxx


def _flags(isa: str) -> list[str]:
    if isa not in ISA_FLAGS:
        raise NativeUnavailable(f"unknown ISA {isa!r} (expected one of {sorted(ISA_FLAGS)})")
    return [*BASE_FLAGS, *ISA_FLAGS[isa]]


def _build_key(cxx: str, isa: str) -> str:
    """Hash of the sources, the header package, the compiler and the flags."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        path = SOURCE_DIR / name
        if not path.is_file():
            raise NativeUnavailable(f"native sources not found ({path}): needs a source checkout")
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"{HEADERS_PACKAGE}@{HEADERS_VERSION}\0{_compiler_version(cxx)}\0{' '.join(_flags(isa))}".encode())
    return h.hexdigest()[:16]


def _library_file(root: Path, cxx: str, isa: str) -> Path:
    return root / f"qcompile_native-{isa}-{_build_key(cxx, isa)}.so"


def _npm_pack(dest: Path) -> Path:
    """Fetch the pinned header package tarball into `dest` with npm; verify its sha512."""
    npm = shutil.which("npm")
    if npm is None:
        raise NativeUnavailable("npm not found (needed once to fetch the onnxruntime C API headers)")
    spec = f"{HEADERS_PACKAGE}@{HEADERS_VERSION}"
    try:
        out = subprocess.run([npm, "pack", spec, "--json", "--pack-destination", str(dest)], capture_output=True,
                             text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise NativeUnavailable(f"npm pack {spec} timed out") from e
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise NativeUnavailable(f"npm pack {spec} failed: {tail}")
    tgz = dest / json.loads(out.stdout)[0]["filename"]
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != HEADERS_INTEGRITY:
        raise NativeUnavailable(f"{spec}: tarball sha512 does not match the pinned integrity")
    return tgz


def _extract_headers(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            name = member.name
            if member.isfile() and name.startswith(HEADERS_PREFIX) and name.endswith(".h"):
                data = tar.extractfile(member)
                (dest / name[len(HEADERS_PREFIX):]).write_bytes(data.read())


def headers_dir(cache_dir: Path | None = None) -> Path:
    """A directory holding onnxruntime_c_api.h: $QCOMPILE_ORT_INCLUDE, or the pinned npm package's
    headers (fetched into the cache on first use, atomically)."""
    env = os.environ.get("QCOMPILE_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_c_api.h").is_file():
            raise NativeUnavailable(f"$QCOMPILE_ORT_INCLUDE={env} has no onnxruntime_c_api.h")
        return Path(env)
    root = cache_root(cache_dir) / "headers"
    target = root / f"{HEADERS_PACKAGE}-{HEADERS_VERSION}"
    if (target / "onnxruntime_c_api.h").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staged = Path(tmp) / "include"
        staged.mkdir()
        _extract_headers(_npm_pack(Path(tmp)), staged)
        if not (staged / "onnxruntime_c_api.h").is_file():
            raise NativeUnavailable(f"{HEADERS_PACKAGE}@{HEADERS_VERSION} has no onnxruntime_c_api.h")
        try:
            staged.rename(target)
        except OSError:  # another process got there first
            if not (target / "onnxruntime_c_api.h").is_file():
                raise
    return target


def build(cache_dir: Path | None = None, force: bool = False, isa: str | None = None) -> Path:
    """Compile the library once (cached by source/header/compiler/flags hash) and return its path.

    `isa` is an ISA_FLAGS key (default `detect_isa()`). Raises NativeUnavailable with the reason.
    """
    isa = isa or detect_isa()
    cxx = _compiler()
    root = cache_root(cache_dir)
    lib = _library_file(root, cxx, isa)
    if lib.is_file() and not force:
        return lib
    include = headers_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=lib.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *_flags(isa), "-I", str(include), *(str(SOURCE_DIR / s) for s in SOURCES), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            errors = [line for line in out.stderr.splitlines() if "error" in line] or out.stderr.splitlines() or ["?"]
            raise NativeUnavailable(f"compiling the native library failed: {errors[0]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def library_path(cache_dir: Path | None = None, isa: str | None = None) -> Path | None:
    """The built library for the current sources/compiler/CPU, or None (never builds)."""
    try:
        lib = _library_file(cache_root(cache_dir), _compiler(), isa or detect_isa())
    except NativeUnavailable:
        return None
    return lib if lib.is_file() else None


def session_options(so=None, *, build_if_missing: bool = False, cache_dir: Path | None = None):
    """`so` (or a new onnxruntime SessionOptions) with the native library registered if it is built.

    With `build_if_missing`, builds it first (raising NativeUnavailable on failure); otherwise a
    missing library leaves `so` unchanged.
    """
    import onnxruntime as ort

    so = so if so is not None else ort.SessionOptions()
    lib = build(cache_dir) if build_if_missing else library_path(cache_dir)
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return so


# --- graph emission -----------------------------------------------------------------------------


def padded_k(k: int, block_size: int) -> int:
    """K rounded up to a multiple of max(64, block_size): the kernel's step and block granularity."""
    unit = max(64, block_size)
    return -(-k // unit) * unit


def check_weight(t: PackedTensor) -> tuple[str, int]:
    """(scale_type attribute, scale code of 1.0) for a supported weight; ValueError otherwise."""
    fmt = t.fmt
    if not isinstance(fmt, BlockFormat) or fmt.element.name != "e2m1" or fmt.scale.name not in _SCALE_TYPES:
        raise ValueError(f"MatMulFp4 needs an E2M1 block format with E8M0 or E4M3 scales, got {fmt.name}")
    if len(t.shape) != 2 or t.axis != 0:
        raise ValueError(f"MatMulFp4 needs a 2-D [K, N] weight blocked along axis 0 (shape {t.shape}, axis {t.axis})")
    bs = t.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"MatMulFp4 needs a power-of-two block size >= 16, got {bs}")
    return _SCALE_TYPES[fmt.scale.name]


def pack_codes(t: PackedTensor) -> np.ndarray:
    """E2M1 codes [K, N] -> uint8 [N, Kp / 2], k-pairs per byte (low nibble = even k), zero padded."""
    k, n = t.shape
    codes = np.zeros((n, padded_k(k, t.block_size)), dtype=np.uint8)
    codes[:, :k] = np.asarray(t.codes, dtype=np.uint8).T & 15
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def pack_scales(t: PackedTensor, one_code: int) -> np.ndarray:
    """Scale codes [ceil(K / bs), N] -> uint8 [N, Kp / bs], padded with the code of 1.0."""
    k, n = t.shape
    scales = np.full((n, padded_k(k, t.block_size) // t.block_size), one_code, dtype=np.uint8)
    stored = np.asarray(t.scale, dtype=np.uint8).reshape(-1, n).T
    scales[:, : stored.shape[1]] = stored
    return scales


def act_attribute(fmt: BlockFormat | None) -> str:
    """The `act` attribute for an activation format: "none" (None), "mxfp4" or "nvfp4"; ValueError otherwise.

    Matches by numbers, not name: E2M1 elements with E8M0 scales per 32 and no tensor scale
    (OCP MXFP4), or with E4M3FN scales per 16 and a float32 tensor scale (NVFP4).
    """
    if fmt is None:
        return "none"
    for act in ("mxfp4", "nvfp4"):
        ref = FORMATS[act]
        if (isinstance(fmt, BlockFormat) and fmt.element.params == ref.element.params
                and fmt.scale.params == ref.scale.params and fmt.block_size == ref.block_size
                and (fmt.tensor_scale is None) == (ref.tensor_scale is None)
                and (fmt.tensor_scale is None or fmt.tensor_scale.params == ref.tensor_scale.params)):
            return act
    raise ValueError(f"MatMulFp4 fuses only mxfp4 or nvfp4 activation quantization, got {getattr(fmt, 'name', fmt)}")


def emit_matmul_fp4(graph: ir.Graph, x: ir.Value, t: PackedTensor, name: str, act: BlockFormat | None = None,
                    act_tensor_scale: float | None = None) -> ir.Value:
    """Append `fq(x) @ t.dequantize()` as one MatMulFp4 node (registering its initializers); float32 [..., N].

    `act` None: fq is the identity (no activation quantization). `act` FORMATS["mxfp4"] or
    FORMATS["nvfp4"] (or a format with the same numbers): fq = `codec.fake_quant(x, act, -1,
    act_tensor_scale)` per row of x along K, done inside the op (attribute act="mxfp4"/"nvfp4").
    NVFP4 needs the static `act_tensor_scale` (stored as a float32 scalar initializer, input
    A_T); MXFP4 takes none. Inputs: x, codes, scales, [weight tensor scale or empty], [A_T].
    """
    from qcompile.functions import Emitter

    scale_type, one_code = check_weight(t)
    act_name = act_attribute(act)
    if act_name == "nvfp4" and act_tensor_scale is None:
        raise ValueError(f"{name}: nvfp4 activation quantization needs a static act_tensor_scale")
    if act_name != "nvfp4" and act_tensor_scale is not None:
        raise ValueError(f"{name}: act_tensor_scale is only used with nvfp4 activations (act={act_name})")
    k, n = t.shape
    _check_x(x, k, name)
    e = Emitter(graph)
    inputs = [x, e.initializer(f"{name}_fp4_codes", pack_codes(t)), e.initializer(f"{name}_fp4_scales", pack_scales(t, one_code))]
    if t.tensor_scale is not None and scale_type == "e4m3":
        inputs.append(e.initializer(f"{name}_fp4_tensor_scale", np.array([t.tensor_scale], dtype=np.float32)))
    if act_name == "nvfp4":
        if len(inputs) == 3:
            inputs.append(None)  # no weight tensor scale: empty optional input
        inputs.append(e.initializer(f"{name}_fp4_act_tensor_scale", np.array(act_tensor_scale, dtype=np.float32)))
    attrs = {"K": k, "N": n, "block_size": t.block_size, "scale_type": scale_type}
    if act_name != "none":
        attrs["act"] = act_name
    return _append_matmul(e, OP, inputs, attrs, name)


def _check_x(x: ir.Value, k: int, name: str) -> None:
    if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) and x.shape[-1] != k:
        raise ValueError(f"{name}: x's last dim {x.shape[-1]} != weight K {k}")


def _append_matmul(e, op: str, inputs: list, attrs: dict, name: str) -> ir.Value:
    """Append op(x = inputs[0], ...) <attrs> with its float32 output [..., N]."""
    x, n = inputs[0], attrs["N"]
    shape = [*x.shape[:-1], n] if x.shape is not None and len(x.shape) else None
    e.graph.opset_imports.setdefault(DOMAIN, VERSION)
    out = ir.Value(name=e.fresh(f"{name}_out"), shape=None if shape is None else ir.Shape(shape),
                   type=ir.TensorType(ir.DataType.FLOAT))
    e.graph.append(ir.node(op, inputs, attrs, domain=DOMAIN, outputs=[out], name=out.name))
    return out


def check_weight_f8(t: PackedTensor) -> str:
    """The `fmt` attribute of MatMulF8 for a supported weight; ValueError otherwise: OCP float8
    (E4M3FN or E5M2) codes of a 2-D [K, N] weight with one float32 scale per column or tensor."""
    fmt_attr = _F8_FORMATS.get(getattr(t.fmt, "onnx_dtype", None))
    if fmt_attr is None:
        raise ValueError(f"MatMulF8 needs E4M3FN or E5M2 weights, got {t.fmt.name}")
    k, n = t.shape if len(t.shape) == 2 else (None, None)
    scale = None if t.scale is None else np.asarray(t.scale)
    if k is None or t.axis != 0 or t.tensor_scale is not None or scale is None or scale.size not in (1, n) or (
            scale.size == n and (t.block_size or k) < k):
        raise ValueError(f"MatMulF8 needs a [K, N] weight with a scale per column or tensor (shape {t.shape}, "
                         f"axis {t.axis}, block {t.block_size})")
    return fmt_attr


def emit_matmul_f8(graph: ir.Graph, x: ir.Value, t: PackedTensor, name: str) -> ir.Value:
    """Append `x @ t.dequantize()` as one MatMulF8 node: codes [N, K] (one row per output column)
    and a float32 scale per column."""
    from qcompile.functions import Emitter

    fmt_attr = check_weight_f8(t)
    k, n = t.shape
    _check_x(x, k, name)
    e = Emitter(graph)
    codes = np.ascontiguousarray(np.asarray(t.codes, dtype=np.uint8).T)
    scales = np.broadcast_to(np.asarray(t.scale, dtype=np.float32).reshape(-1), (n,)).copy()
    inputs = [x, e.initializer(f"{name}_f8_codes", codes), e.initializer(f"{name}_f8_scales", scales)]
    return _append_matmul(e, F8_OP, inputs, {"K": k, "N": n, "fmt": fmt_attr}, name)
