"""Calibration / evaluation data: `.npz` files keyed by graph input name, first axis = samples.

`Dataset` reads one `.npz` or a directory of them (sorted by name) lazily, checks every array
against its model input (name, dtype, shape, finite values: a mismatch is one `InputError` line
naming the input) and yields batches shaped for the model. `synthesize` makes random inputs from
the model's input types and shapes when the user gives no data (with a loud warning).

How samples map onto a model input of rank r (`InputInfo.batch_axis` b, the axis batches stack on):
- an array of rank r + 1 holds one whole model input per sample (`a[k]` is fed as is): state
  tensors, scalars, fixed-shape inputs;
- an array of rank r holds samples as *rows* along the model's batch axis: `a[k]` is the input
  without axis b, and a batch of m rows is `moveaxis(a[k:k+m], 0, b)` (x [N, 64] for an input
  [batch, 64]; [N, 2, 128] for a recurrent state [2, batch, 128]).
The batch axis is where the batch symbol sits (the first free dim of the first input that has
one names it; an input without that symbol uses its first free dim), or axis 0 of an input whose
dims are all fixed. Batches hold `batch_size` rows when every batch axis is free, exactly the
fixed size when one is fixed (1 for a model exported at batch 1), and one sample when any input
takes whole samples.

`--input-shape NAME:DIMS` (`input_shapes=` in the library) fixes dims the model leaves free, for
synthesized data (a named symbol fixed on one input is fixed on every input that uses it).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.errors import InputError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
# Ops an integer input passes through unchanged in value on its way to a Gather / Equal.
_VALUE_PRESERVING = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand")
DEFAULT_INT_RANGE = (0, 100)


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: np.dtype
    shape: tuple | None  # ints, or None for free dims (after --input-shape); None: the model gives no shape
    batch_axis: int | None = None  # the axis rows of samples stack along (see the module doc)
    int_range: tuple[int, int] | None = None  # integer inputs: [lo, hi) synthesized values are drawn from
    int_choices: tuple[int, ...] = ()  # integer inputs compared with constants: synthesized from these

    @classmethod
    def of_model(cls, model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputInfo]:
        """The model's (non-initializer) inputs, with `input_shapes` fixing free dims."""
        graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        shapes = dict(input_shapes or {})
        unknown = sorted(set(shapes) - {v.name for v in graph_inputs})
        if unknown:
            raise InputError(f"--input-shape names {unknown}, not inputs of the model "
                             f"(inputs: {[v.name for v in graph_inputs]})")
        bound = _bind_symbols(graph_inputs, shapes)
        batch_symbol = next((d.value for v in graph_inputs if v.shape is not None
                             for d in v.shape if isinstance(d, ir.SymbolicDim)), None)
        out = []
        for v in graph_inputs:
            if v.dtype is None:
                raise InputError(f"model input {v.name!r} has no type")
            dims = list(v.shape) if v.shape is not None else None
            shape = _resolved_shape(v.name, dims, shapes.get(v.name), bound)
            lo_hi, choices = _integer_values(v) if v.dtype.is_integer() else (None, ())
            # bfloat16 inputs are fed as float32 (onnxruntime's Python API takes no bfloat16 arrays; see PromoteFloatPass)
            dtype = np.dtype(np.float32) if v.dtype == ir.DataType.BFLOAT16 else v.dtype.numpy()
            out.append(cls(v.name, dtype, shape, _batch_axis(dims, batch_symbol), lo_hi, choices))
        return out

    def free_batch(self) -> bool:
        return self.batch_axis is not None and self.shape[self.batch_axis] is None

    def row_shape(self) -> tuple:
        return tuple(d for k, d in enumerate(self.shape) if k != self.batch_axis)


def _bind_symbols(inputs: list[ir.Value], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Named symbols fixed by --input-shape: symbol -> size."""
    bound: dict[str, int] = {}
    for v in inputs:
        given = shapes.get(v.name)
        if given is None or v.shape is None or len(given) != len(v.shape):
            continue
        for d, g in zip(v.shape, given):
            if isinstance(d, ir.SymbolicDim) and d.value:
                bound.setdefault(d.value, int(g))
    return bound


def _resolved_shape(name: str, dims: list | None, given: Sequence[int] | None, bound: dict[str, int]) -> tuple | None:
    if given is not None:
        given = tuple(int(g) for g in given)
        if any(g < 0 for g in given):
            raise InputError(f"--input-shape {name}: dims must be >= 0, got {list(given)}")
        if dims is not None and len(given) != len(dims):
            raise InputError(f"--input-shape {name}: {len(given)} dims given, the input has rank {len(dims)}")
        for k, (d, g) in enumerate(zip(dims or [], given)):
            if isinstance(d, int) and d != g:
                raise InputError(f"--input-shape {name}: dim {k} is fixed to {d} by the model, {g} given")
        return given
    if dims is None:
        return None
    return tuple(d if isinstance(d, int) else bound.get(d.value) if d.value else None for d in dims)


def _batch_axis(dims: list | None, batch_symbol: str | None) -> int | None:
    if not dims:
        return None
    names = [d.value if isinstance(d, ir.SymbolicDim) else None for d in dims]
    if batch_symbol is not None and batch_symbol in names:
        return names.index(batch_symbol)
    free = [k for k, d in enumerate(dims) if isinstance(d, ir.SymbolicDim)]
    return free[0] if free else 0


def _integer_values(v: ir.Value) -> tuple[tuple[int, int] | None, tuple[int, ...]]:
    """What an integer input's values may be, from how the graph uses it: indices of a Gather on a
    constant table lie in [0, table size); an input compared (Equal) with constants takes those."""
    hi, choices = None, set()
    stack, seen = [v], set()
    while stack:
        u = stack.pop()
        if id(u) in seen:
            continue
        seen.add(id(u))
        for use in u.uses():
            node = use.node
            if node.op_type in _VALUE_PRESERVING and use.idx == 0:
                stack.extend(node.outputs[:1])
            elif node.op_type == "Gather" and use.idx == 1 and _const(node.inputs[0]) is not None:
                axis = node.attributes.get("axis")
                size = _const(node.inputs[0]).shape[axis.as_int() if axis is not None else 0]
                hi = size if hi is None else min(hi, size)
            elif node.op_type == "Equal":
                other = _const(node.inputs[1 - use.idx])
                if other is not None and other.size == 1 and np.issubdtype(other.dtype, np.integer):
                    choices.add(int(other.reshape(-1)[0]))
    return ((0, hi) if hi else None), tuple(sorted(choices))


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _const(v: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output (before NormalizePass lifts it)."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    t = p.attributes.get("value") if p is not None and p.op_type == "Constant" and p.domain == "" else None
    return t.as_tensor().numpy() if t is not None else None


def _layout(a: np.ndarray, info: InputInfo, where: str) -> str:
    """'whole' (rank r + 1: one model input per sample) or 'rows' (rank r, along the batch axis);
    checks the sample's shape against the model's fixed dims."""
    if info.shape is None:
        return "whole"
    rank = len(info.shape)
    if a.ndim == rank + 1:
        layout, want, got = "whole", info.shape, a.shape[1:]
    elif a.ndim == rank and info.batch_axis is not None:
        layout, want, got = "rows", info.row_shape(), a.shape[1:]
    else:
        raise InputError(f"{where}input {info.name!r}: data of shape {list(a.shape)} does not fit the model's "
                         f"{_show(info.shape)}: give [N, *shape] (one whole input per sample)"
                         + (f" or rows [N, ...] along its batch axis {info.batch_axis}" if info.batch_axis is not None else ""))
    bad = [k for k, (w, g) in enumerate(zip(want, got)) if w is not None and w != g]
    if bad:
        raise InputError(f"{where}input {info.name!r}: a sample has shape {list(got)}, the model wants "
                         f"{_show(want)} (as {'rows along axis ' + str(info.batch_axis) if layout == 'rows' else 'whole inputs'} "
                         f"of {_show(info.shape)})")
    return layout


def _show(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_array(a: np.ndarray, info: InputInfo, where: str) -> int:
    """Checks one input's array (dtype, shape, finite values); returns its sample count."""
    if a.ndim == 0:
        raise InputError(f"{where}input {info.name!r}: a 0-d array has no sample axis; give shape [N]")
    _layout(a, info, where)
    if not np.can_cast(a.dtype, info.dtype, casting="same_kind"):
        raise InputError(f"{where}input {info.name!r}: data is {a.dtype}, the model wants {info.dtype}")
    if (_is_float(a.dtype) or a.dtype.kind == "c") and not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InputError(f"{where}input {info.name!r}: {bad} NaN/Inf value(s) in the data")
    return a.shape[0]


class Dataset:
    """Samples from `.npz` files; `take(start, stop)` selects a sample range without copying files."""

    def __init__(self, path: str | Path, inputs: list[InputInfo], start: int = 0, stop: int | None = None):
        self.path = Path(path)
        self.inputs = inputs
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise InputError(f"data directory {self.path} holds no .npz files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise InputError(f"data {self.path}: no such file or directory")
        self._sizes = [self._check(f) for f in self.files]
        total = sum(self._sizes)
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def _check(self, f: Path) -> int:
        try:
            with np.load(f) as z:
                names = set(z.files)
                want = {i.name for i in self.inputs}
                if want - names:
                    raise InputError(
                        f"data {f.name}: missing arrays for model inputs {sorted(want - names)} (has {sorted(names)})"
                    )
                sizes = {_check_array(z[i.name], i, f"data {f.name}: ") for i in self.inputs}
        except (OSError, ValueError) as e:
            raise InputError(f"data {f}: not a readable .npz ({e})") from None
        if len(sizes) > 1:
            raise InputError(f"data {f.name}: inputs have different sample counts {sorted(sizes)}")
        return sizes.pop() if sizes else 0

    step: int = 1

    def __len__(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.step))

    def take(self, start: int, stop: int | None = None) -> Dataset:
        """Samples [start, stop) of this dataset (a contiguous range)."""
        if self.step != 1:
            raise ValueError("take() of a spread dataset")
        d = object.__new__(type(self))
        d.__dict__.update(self.__dict__)
        d.start = self.start + start
        d.stop = self.stop if stop is None else min(self.stop, self.start + stop)
        return d

    def spread(self, n: int) -> Dataset:
        """At most `n` samples evenly spread over the dataset (every ceil(len / n)-th one), so a
        subset of data stored in order (by class, by source) still covers all of it; the whole
        dataset when it has no more than `n`."""
        d = object.__new__(type(self))
        d.__dict__.update(self.__dict__)
        d.step = self.step * max(1, -(-len(self) // max(n, 1)))
        return d

    def _ranges(self, sizes: list[int]) -> Iterator[tuple[int, slice]]:
        """(chunk index, slice of that chunk) of the samples start, start + step, ... < stop."""
        offset = 0
        for k, n in enumerate(sizes):
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, n)
            lo += (self.start - offset - lo) % self.step  # the first index of the stride in this chunk
            offset += n
            if lo < hi:
                yield k, slice(lo, hi, self.step)

    def samples(self) -> Iterator[Batch]:
        """Yield per-file chunks restricted to [start, stop) (every step-th), arrays keyed by input name."""
        for k, sl in self._ranges(self._sizes):
            with np.load(self.files[k]) as z:
                yield {i.name: _cast(z[i.name][sl], i) for i in self.inputs}

    def batches(self, batch_size: int = 8) -> Iterator[Batch]:
        """Batches shaped for the model (see the module doc)."""
        for chunk in self.samples():
            yield from split_batches(chunk, self.inputs, batch_size)


def _cast(a: np.ndarray, info: InputInfo) -> np.ndarray:
    return a if a.dtype == info.dtype else a.astype(info.dtype)


def split_batches(chunk: Batch, inputs: list[InputInfo], batch_size: int) -> Iterator[Batch]:
    """Model feeds from a chunk of samples: rows stacked along each input's batch axis, or one
    whole input per sample (see the module doc)."""
    n = next(iter(chunk.values())).shape[0] if chunk else 0
    layouts = {i.name: _layout(chunk[i.name], i, "") for i in inputs}
    rows = [i for i in inputs if layouts[i.name] == "rows"]
    fixed = {i.shape[i.batch_axis] for i in rows if not i.free_batch()}
    if len(fixed) > 1:
        raise InputError(f"inputs {[i.name for i in rows]} have different fixed batch sizes {sorted(fixed)}")
    size = next(iter(fixed)) if fixed else None
    if size not in (None, 1) and len(rows) < len(inputs):
        raise InputError(f"input {rows[0].name!r} takes rows in batches of {size}, but "
                         f"{[i.name for i in inputs if layouts[i.name] == 'whole']} take one whole input per sample")
    step = size if size is not None else batch_size if len(rows) == len(inputs) else 1
    if step == 0:
        return
    end = n - n % step if size is not None else n  # a fixed batch size takes only full batches
    if end < n:
        log.debug("%d trailing samples do not fill a batch of %d; not fed", n - end, step)
    for s in range(0, end, step):
        yield {i.name: (np.moveaxis(chunk[i.name][s : s + step], 0, i.batch_axis) if layouts[i.name] == "rows"
                        else np.asarray(chunk[i.name][s])) for i in inputs}


def synthesize(inputs: list[InputInfo], n: int, seed: int, dim: int = 32) -> Batch:
    """Random samples from the inputs' types and shapes: N(0,1) floats; integers in the range the
    graph implies (`InputInfo.int_range` / `int_choices`), masks of 1, else [0, 100); bools True.

    Free dims become `dim`. An input with a free batch axis gets rows (n along that axis), every
    other input whole samples of its fixed shape.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i in inputs:
        if i.shape is None:
            raise InputError(f"cannot synthesize data for input {i.name!r}: the model gives it no shape; "
                             f"pass --input-shape {i.name}:DIMS or calibration data")
        dims = i.row_shape() if i.free_batch() else i.shape
        shape = (n,) + tuple(d if d is not None else dim for d in dims)
        if _is_float(i.dtype):
            out[i.name] = rng.standard_normal(shape).astype(i.dtype)
        elif np.issubdtype(i.dtype, np.integer):
            if i.int_choices:
                out[i.name] = rng.choice(np.array(i.int_choices), size=shape).astype(i.dtype)
                continue
            lo, hi = i.int_range or ((1, 2) if "mask" in i.name.lower() else DEFAULT_INT_RANGE)
            info = np.iinfo(i.dtype)
            out[i.name] = rng.integers(max(lo, info.min), min(hi, int(info.max) + 1), size=shape).astype(i.dtype)
        elif i.dtype == np.bool_:
            out[i.name] = np.ones(shape, dtype=bool)
        else:
            raise InputError(f"cannot synthesize data for input {i.name!r} of type {i.dtype}; give calibration data")
    return out


class ArrayDataset(Dataset):
    """In-memory samples (synthesized data, or arrays given through the library API)."""

    def __init__(self, arrays: Batch, inputs: list[InputInfo], start: int = 0, stop: int | None = None):
        missing = {i.name for i in inputs} - set(arrays)
        if missing:
            raise InputError(f"data: missing arrays for model inputs {sorted(missing)} (has {sorted(arrays)})")
        sizes = {_check_array(np.asarray(arrays[i.name]), i, "data: ") for i in inputs}
        if len(sizes) > 1:
            raise InputError(f"data: inputs have different sample counts {sorted(sizes)}")
        self.arrays = {i.name: _cast(np.asarray(arrays[i.name]), i) for i in inputs}
        self.inputs = inputs
        self.path = Path("<memory>")
        n = sizes.pop() if sizes else 0
        self.start, self.stop = start, n if stop is None else min(stop, n)

    def samples(self) -> Iterator[Batch]:
        if len(self):
            yield {k: v[self.start : self.stop : self.step] for k, v in self.arrays.items()}
