"""Real pretrained models exported to ONNX, built once and cached on disk.

``get_model("minilm")`` returns the path of a verified ONNX file, building it on first use.
``get_data("minilm", "calib", 256)`` returns an .npz of real samples for it (disjoint "calib" and
"eval" splits: sentences from :mod:`qcompile.zoo.text`, photos and digits from
:mod:`qcompile.zoo.images`), written once into the same cache.
Builders live in submodules and import torch/transformers lazily, so importing this package is
cheap and works without the optional ``zoo`` extra.

A builder is ``build(path: Path) -> dict``: it writes the ONNX model to ``path``, checks it
(``onnx.checker``, onnxruntime vs the framework's own output) and raises on failure; the returned
dict of figures (export time, max abs diff, ...) is stored next to the model as ``<name>.json``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qcompile.errors import QCompileError

__all__ = ["DATA", "MODELS", "ZooBuildError", "cache_root", "get_data", "get_model", "require",
           "strip_stack_traces"]

INSTALL_HINT = "pip install torch==2.13.0 && pip install -e .[zoo]"


class ZooBuildError(QCompileError):
    """A zoo model could not be exported or failed its verification."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise ImportError telling how to install the ``zoo`` extra."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"qcompile.zoo needs the optional package {name!r} ({exc}); "
                f"install it with: {INSTALL_HINT}"
            ) from exc


def _lazy(module: str, attr: str = "build") -> Callable[[Path], dict]:
    """A builder that imports ``qcompile.zoo.<module>`` only when called."""

    def build(path: Path) -> dict:
        return getattr(importlib.import_module(f"qcompile.zoo.{module}"), attr)(path)

    build.__name__ = build.__qualname__ = f"{module}.{attr}"
    return build


def strip_stack_traces(model) -> None:
    """Drop the torch exporter's per-node stack traces from an ``onnx_ir.Model`` in place.

    They hold absolute source paths and line numbers, which would make the exported bytes depend
    on where and how the code is installed; the other node metadata (name scopes) is kept.
    """
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def export_token_model(module, args: tuple, path: Path, inputs, output: str, opset: int) -> None:
    """torch.onnx.export (dynamo) of a [batch, sequence] token model, stack traces stripped, one file."""
    import warnings

    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # known-harmless exporter/pytree deprecation chatter
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(inputs), output_names=[output],
            dynamic_shapes={k: {0: batch, 1: seq} for k in inputs}, verbose=False,
        )
    strip_stack_traces(program.model)
    program.save(str(path), external_data=False)


def check_interface(path: Path, want_in: list, want_out: list):
    """onnx.checker (full), IR <= 13 and opset <= 26 (onnxruntime 1.31), and the exact interface.

    want_in / want_out: [(name, onnx.TensorProto element type, [int dim or dim_param name])].
    Returns the loaded ModelProto (without external data) and the figures every builder records.
    """
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if model.ir_version > 13 or opset > 26:
        raise ZooBuildError(f"IR {model.ir_version} / opset {opset} too new for onnxruntime 1.31")

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    if sig(model.graph.input) != want_in or sig(model.graph.output) != want_out:
        raise ZooBuildError(f"unexpected interface {sig(model.graph.input)} -> {sig(model.graph.output)}")
    return model, {"ir_version": model.ir_version, "opset": opset, "nodes": len(model.graph.node),
                   "initializers": len(model.graph.initializer)}


MODELS: dict[str, Callable[[Path], dict]] = {
    "minilm": _lazy("minilm"),
    "efficientnet-lite0": _lazy("efficientnet"),
    # the same weights through torch.onnx.export(dynamo=False): opsets 17 / 13, old op forms (zoo/torchscript.py)
    "minilm-torchscript": _lazy("torchscript", "build_minilm"),
    "efficientnet-lite0-torchscript": _lazy("torchscript", "build_efficientnet"),
    "llama-tiny": _lazy("llama"),  # random init: decoder-shaped graphs and speed, never quality claims
    "gemv-chain": _lazy("gemv"),  # 12 x [1x4096].[4096x4096]: decode-speed measurements (external data)
}


def _text_data(path: Path, split: str, n: int) -> Path:
    from qcompile.zoo import text

    return text.write_npz(path, split, n)


def _image_data(path: Path, split: str, n: int) -> Path:
    from qcompile.zoo import images

    return images.write_npz(path, split, n)


# Real data for a zoo model: ``writer(path, split, n) -> path`` writes ``n`` samples of ``split``
# ("calib" or "eval", disjoint) as an .npz keyed by the model's graph input names (first axis =
# samples). Modules adding a model to MODELS add its writer here.
def _token_data(path: Path, split: str, n: int) -> Path:
    from qcompile.zoo import llama

    return llama.write_npz(path, split, n)


def _vector_data(path: Path, split: str, n: int) -> Path:
    from qcompile.zoo import gemv

    return gemv.write_npz(path, split, n, seed=0)


DATA: dict[str, Callable[[Path, str, int], Path]] = {
    "minilm": _text_data,
    "efficientnet-lite0": _image_data,
    "minilm-torchscript": _text_data,  # same inputs as the dynamo exports
    "efficientnet-lite0-torchscript": _image_data,
    "llama-tiny": _token_data,  # random token ids: speed and exactness only
    "gemv-chain": _vector_data,
}


def cache_root() -> Path:
    """``$QCOMPILE_CACHE`` if set, else ``~/.cache/qcompile``."""
    env = os.environ.get("QCOMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Exclusive inter-process lock (serialises parallel builds, e.g. pytest-xdist workers)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the cache consistent
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, made once by ``build(tmp)`` and shared by every later call and process.

    Under an inter-process lock, ``build`` writes ``tmp`` (named like ``target``) in a private
    folder next to it, so files it writes beside ``tmp`` (external data, ``<name>.onnx.data``) get
    their final names; those move into place first and ``target`` last, atomically, so a cached
    ``target`` is always complete. A failed build leaves nothing behind.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.stem}.lock"):
        if target.is_file():  # made by another process while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
        try:
            tmp = work / target.name
            build(tmp)
            for f in sorted(work.iterdir()):
                os.chmod(f, 0o644)  # the cache is meant to be shared
                if f != tmp:
                    os.replace(f, target.parent / f.name)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def get_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the ONNX file of zoo model ``name``, built and verified on first use.

    Cached as ``<cache_dir>/<name>.onnx`` (default ``cache_dir``: :func:`cache_root`) with its build
    figures in ``<name>.json``; later calls return the path without rebuilding (see `_cached`).
    Unknown names raise KeyError listing the known ones.
    """
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(MODELS))}")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()

    def build(tmp: Path) -> None:
        info = MODELS[name](tmp)
        (cache_dir / f"{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    return _cached(cache_dir / f"{name}.onnx", build)


def get_data(model: str, split: str, n: int, cache_dir: Path | None = None) -> Path:
    """Path of an .npz of ``n`` real ``split`` samples for zoo model ``model``, written on first use.

    The writer is ``DATA[model]`` (seed 0); the file is cached as ``<cache_dir>/<model>.<split>.<n>.npz``
    (default ``cache_dir``: :func:`cache_root`) like the models (`_cached`). Unknown models raise
    KeyError listing the known ones; the writer raises ValueError for an unknown split or too large an ``n``.
    """
    if model not in DATA:
        raise KeyError(f"no data for zoo model {model!r}; known: {', '.join(sorted(DATA))}")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    return _cached(cache_dir / f"{model}.{split}.{int(n)}.npz", lambda tmp: DATA[model](tmp, split, int(n)))
