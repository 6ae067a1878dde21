"""Real pretrained models exported to ONNX, built once and cached on disk.

``get_model("minilm")`` returns the path of a verified ONNX file, building it on first use.
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
import tempfile
from collections.abc import Callable
from pathlib import Path

from qcompile.errors import QCompileError

__all__ = ["MODELS", "ZooBuildError", "cache_root", "get_model", "require", "strip_stack_traces"]

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


MODELS: dict[str, Callable[[Path], dict]] = {
    "minilm": _lazy("minilm"),
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


def get_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the ONNX file of zoo model ``name``, building and verifying it on first use.

    The model is exported to a temporary file in ``cache_dir`` (default: :func:`cache_root`),
    verified by its builder, then renamed atomically to ``<cache_dir>/<name>.onnx``; later calls
    return that path without rebuilding. Unknown names raise KeyError listing the known ones.
    """
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(MODELS))}")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    target = cache_dir / f"{name}.onnx"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{name}.lock"):
        if target.is_file():  # built by another process while we waited
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx.tmp", dir=cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            info = MODELS[name](tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is meant to be shared
            (cache_dir / f"{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
