"""External data: weights that stay in their files, sessions on files, and how the output is saved.

A model loaded from a path keeps every external initializer as an `ir.ExternalTensor`: a lazy,
memory-mapped view of its data file, never one protobuf of the whole model in memory. Three
operations keep it that way:

- `session_path(model)` writes the model for an onnxruntime session on a *path* (onnxruntime then
  memory-maps the weights itself instead of copying them from a buffer). An external tensor is
  referenced where it is: the session file is a hidden temporary file in the data file's own
  directory (onnxruntime refuses data outside the model's directory and resolves symlinks), or,
  when that directory is not writable, a temporary directory the data file is hard-linked (or
  copied) into. In-memory tensors above `INLINE_LIMIT` bytes go to one new data file beside it,
  64 KiB-aligned. The model object is unchanged afterwards.
- `save(model, path, external_data)` writes the output atomically: "always" puts every tensor
  above `INLINE_LIMIT` in `<path>.data`, "never" writes one protobuf (refused past `PROTO_LIMIT`),
  "auto" is external when the weights exceed `threshold` (default `PROTO_LIMIT`) or the input used
  external data. The output never refers to the input's files (their weights are copied) and never
  overwrites them.
- `derived(tensor, fn)` is an exact rewrite of a weight that stays file-backed (recomputed from the
  input's file at each read) when its source is.
- `drop_pages(tensor)` returns a memory-mapped tensor's resident pages to the OS once it has been
  read (quantized), so a compile touches each float weight once instead of holding all of them.
"""
from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import InputError

log = logging.getLogger(__name__)

PROTO_LIMIT = 1_800_000_000  # protobuf's 2 GiB limit, with headroom for the graph itself
INLINE_LIMIT = 1024  # tensors up to this many bytes stay in the protobuf
ALIGNMENT = 65536  # data offsets onnxruntime can memory-map (the Windows allocation granularity)
MODES = ("auto", "always", "never")
LARGE_MODEL_BYTES = 256 << 20  # float models with more weights run without prepacking (`prepack`)
INPUT_EXTERNAL = "qcompile.input_external_data"  # model.meta keys set by `mark_input`
INPUT_PATH = "qcompile.input_path"


def external_tensors(model: ir.Model) -> list[tuple[ir.Value, ir.ExternalTensor]]:
    """(initializer, external tensor) of every initializer whose data lives in a file (main graph)."""
    return [(v, v.const_value) for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]


def data_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the external data files the model's initializers read."""
    return {Path(t.path).resolve() for _, t in external_tensors(model)}


def mark_input(model: ir.Model, path: str | os.PathLike) -> None:
    """Record in the in-memory `model.meta` whether the model loaded from `path` used external data,
    and the path (`save` never writes over it)."""
    model.meta[INPUT_EXTERNAL] = bool(external_tensors(model))
    model.meta[INPUT_PATH] = str(Path(path).resolve())


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def prepack(model: ir.Model) -> bool:
    """Whether a session of this *float* model should prepack its weights: not past
    LARGE_MODEL_BYTES, where the packed copy would double the weight memory of a session that only
    computes reference values (calibration statistics, validation outputs; same results)."""
    return weight_bytes(model) <= LARGE_MODEL_BYTES


def drop_pages(tensor) -> None:
    """Release the resident pages of a memory-mapped external tensor (no-op for other tensors).

    The mapping stays valid (a later read faults the pages in again from the file); only the
    process's resident set shrinks. Views of the tensor's array stay valid too.
    """
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
    if isinstance(raw, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            raw.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed or not advisable: nothing to release
            pass


def file_backed(tensor) -> bool:
    """A tensor whose data is read from a file: external, or `derived` from one."""
    return isinstance(tensor, ir.ExternalTensor) or getattr(tensor, "qcompile_file_backed", False)


def derived(source: ir.TensorProtocol, fn: Callable[[np.ndarray], np.ndarray], name: str) -> ir.TensorProtocol:
    """The tensor fn(source.numpy()), of the source's shape and dtype (an exact rewrite of a
    weight: SmoothQuant's scales, a channel permutation).

    A file-backed source gives an `ir.LazyTensor` that recomputes fn from the file at every read
    and returns the file's pages afterwards (`drop_pages`): a chain of rewrites of a > 2 GB model
    holds no rewritten copy of its weights, only the one being read (a session file writes them
    one at a time). An in-memory source is rewritten now.
    """
    dtype = source.dtype.numpy()
    if not file_backed(source):
        return ir.tensor(np.asarray(fn(source.numpy()), dtype=dtype), name=name)

    def read() -> ir.Tensor:
        out = np.asarray(fn(source.numpy()), dtype=dtype)
        drop_pages(source)
        return ir.tensor(out, name=name)

    lazy = ir.LazyTensor(read, dtype=source.dtype, shape=ir.Shape(source.shape), name=name)
    lazy.qcompile_file_backed = True
    return lazy


@contextmanager
def _swapped(model: ir.Model, tensors: dict[str, ir.TensorProtocol]):
    """Temporarily replace initializers' tensors (restored on exit, whatever happens)."""
    old = {}
    try:
        for name, t in tensors.items():
            value = model.graph.initializers[name]
            old[name] = value.const_value
            value.const_value = t
        yield
    finally:
        for name, t in old.items():
            model.graph.initializers[name].const_value = t


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError as e:
        log.debug("cannot hard-link %s into %s (%s): copying it", src, dest.parent, e)
        shutil.copyfile(src, dest)


def _write_in_memory(model: ir.Model, data: Path, base_dir: Path, skip: set[str]) -> dict[str, ir.ExternalTensor]:
    """Write every in-memory initializer above INLINE_LIMIT bytes (not in `skip`) to `data`, one at
    a time and aligned; returns their external replacements (located relative to `base_dir`)."""
    out = {}
    offset = 0
    todo = [(name, v.const_value) for name, v in model.graph.initializers.items() if name not in skip
            and v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
            and v.const_value.nbytes > INLINE_LIMIT]
    if not todo:
        return out
    with open(data, "wb") as f:
        for name, t in todo:
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            f.seek(offset)
            raw = t.tobytes()
            f.write(raw)
            out[name] = ir.ExternalTensor(os.path.relpath(data, base_dir), offset, len(raw), t.dtype, shape=t.shape,
                                          name=t.name or name, base_dir=base_dir)
            offset += len(raw)
    return out


def session_file(model: ir.Model, path: str | os.PathLike, link_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` to `path` for a session on that path, without copying its external weights.

    An external tensor whose data file is in `path`'s directory is referenced where it is; one
    elsewhere is hard-linked (else copied) into `link_dir` (default: `path`'s directory, which must
    then be the only one a session file holds). In-memory tensors above INLINE_LIMIT bytes go to
    `<path>.data`. The model object is unchanged afterwards.
    """
    path = Path(path)
    directory = path.parent.resolve()
    links: dict[Path, str] = {}
    swap = {}
    for value, t in external_tensors(model):
        src = Path(t.path).resolve()
        if src.parent == directory:
            location = src.name
        else:
            if src not in links:
                links[src] = f"{path.stem}.weights{len(links)}.data"
                _link_or_copy(src, directory / links[src])
            location = links[src]
        swap[value.name] = ir.ExternalTensor(location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                             base_dir=directory)
    swap.update(_write_in_memory(model, path.with_name(path.name + ".data"), directory, set(swap)))
    with _swapped(model, swap):  # a small protobuf now: only references and tensors <= INLINE_LIMIT
        path.write_bytes(ir.to_proto(model).SerializeToString())  # (ir.save refuses hard-linked data)
    return path


@contextmanager
def session_path(model: ir.Model):
    """A temporary `session_file` of `model`, removed on exit (a session built on it keeps working:
    onnxruntime has read or mapped the files by then).

    When the external weights all live in one writable directory, the file is written there under
    a hidden temporary name, so onnxruntime maps the input's data file itself: neither a copy nor
    a hard link (onnx_ir refuses to map a data file with several links, which would break a
    concurrent compile of the same input). Otherwise it goes to a temporary directory, the data
    files hard-linked (or copied) into it.
    """
    dirs = {p.parent for p in data_files(model)}
    here = next(iter(dirs)) if len(dirs) == 1 else None
    if here is not None and os.access(here, os.W_OK):
        fd, name = tempfile.mkstemp(prefix=".qcompile-session-", suffix=".onnx", dir=here)
        os.close(fd)
        path = Path(name)
        try:
            yield session_file(model, path)
        finally:
            for p in (path, path.with_name(path.name + ".data")):
                p.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-session-") as d:
        yield session_file(model, Path(d) / "model.onnx")


def wants_external(model: ir.Model, mode: str, threshold: int = PROTO_LIMIT) -> bool:
    """Whether `save` writes external data (module doc); ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"external_data must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return weight_bytes(model) > threshold or bool(model.meta.get(INPUT_EXTERNAL))


def save(model: ir.Model, path: str | os.PathLike, external_data: str = "auto", threshold: int = PROTO_LIMIT) -> int:
    """Write `model` to `path` atomically; returns the bytes written (model + data file).

    The files are written in a temporary directory next to `path` and renamed into place (the
    data file first), so a failure leaves no partial output. Raises InputError when an output
    file would be one the model reads (the input's model or data file), or when "never" is asked
    for a model past protobuf's limit.
    """
    path = Path(path)
    external = wants_external(model, external_data, threshold)
    data = path.with_name(path.name + ".data")
    sources = data_files(model)
    for out in (path, data) if external else (path,):
        if out.resolve() in sources:
            raise InputError(f"{out}: is the input's external data file; choose another output path")
    if INPUT_PATH in model.meta and path.resolve() == Path(model.meta[INPUT_PATH]):
        raise InputError(f"{path}: is the input model; choose another output path")
    if not external and weight_bytes(model) > PROTO_LIMIT:
        raise InputError(f"{path}: {weight_bytes(model) / 1e9:.2f} GB of weights cannot be one protobuf (2 GB limit); "
                         "save with external data (--external-data auto or always)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if external:
            ir.save(model, tmp / path.name, external_data=data.name, size_threshold_bytes=INLINE_LIMIT,
                    alignment=ALIGNMENT)
            os.replace(tmp / data.name, data)
        else:
            inline = {v.name: ir.tensor(t.numpy(), name=t.name) for v, t in external_tensors(model)}
            with _swapped(model, inline):  # weights still read from the input's data file: copied inline
                ir.save(model, tmp / path.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path.stat().st_size + (data.stat().st_size if external else 0)


__all__ = ["LARGE_MODEL_BYTES", "MODES", "PROTO_LIMIT", "prepack", "data_files", "derived", "drop_pages", "file_backed", "mark_input", "save", "session_file", "session_path",
           "wants_external", "weight_bytes"]
