"""Calibration / evaluation data: `.npz` files keyed by graph input name, first axis = samples.

`Dataset` reads one `.npz` or a directory of them (sorted by name) lazily, checks names and
dtypes against the model's inputs, and yields batches shaped for the model: when the model's
batch dimension is fixed (e.g. 1) samples are fed one at a time. `synthesize` makes random inputs
from the model's input types and shapes when the user gives no data (with a loud warning).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import InputError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or None for symbolic dims

    @classmethod
    def of_model(cls, model: ir.Model) -> list[InputInfo]:
        out = []
        for v in model.graph.inputs:
            if v.is_initializer():
                continue
            if v.dtype is None or v.shape is None:
                raise InputError(f"model input {v.name!r} has no type or shape")
            shape = tuple(d if isinstance(d, int) else None for d in v.shape)
            out.append(cls(v.name, v.dtype.numpy(), shape))
        return out


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
                sizes = {z[i.name].shape[0] if z[i.name].ndim else 0 for i in self.inputs}
        except (OSError, ValueError) as e:
            raise InputError(f"data {f}: not a readable .npz ({e})") from None
        if len(sizes) != 1:
            raise InputError(f"data {f.name}: inputs have different sample counts {sorted(sizes)}")
        return sizes.pop()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def take(self, start: int, stop: int | None = None) -> Dataset:
        d = object.__new__(type(self))
        d.__dict__.update(self.__dict__)
        d.start = self.start + start
        d.stop = self.stop if stop is None else min(self.stop, self.start + stop)
        return d

    def samples(self) -> Iterator[Batch]:
        """Yield per-file chunks restricted to [start, stop), arrays keyed by input name."""
        offset = 0
        for f, n in zip(self.files, self._sizes):
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, n)
            offset += n
            if lo >= hi:
                continue
            with np.load(f) as z:
                yield {i.name: _cast(z[i.name][lo:hi], i) for i in self.inputs}

    def batches(self, batch_size: int = 8) -> Iterator[Batch]:
        """Batches shaped for the model (one sample at a time when its batch dim is fixed)."""
        for chunk in self.samples():
            yield from split_batches(chunk, self.inputs, batch_size)


def _cast(a: np.ndarray, info: InputInfo) -> np.ndarray:
    if a.dtype == info.dtype:
        return a
    if np.can_cast(a.dtype, info.dtype, casting="same_kind"):
        return a.astype(info.dtype)
    raise InputError(f"data for input {info.name!r} is {a.dtype}, the model wants {info.dtype}")


def split_batches(chunk: Batch, inputs: list[InputInfo], batch_size: int) -> Iterator[Batch]:
    n = next(iter(chunk.values())).shape[0]
    fixed = any(i.shape and i.shape[0] is not None for i in inputs)
    step = 1 if fixed else batch_size
    for s in range(0, n, step):
        out = {}
        for i in inputs:
            a = chunk[i.name][s : s + step]
            if len(i.shape) == a.ndim - 1:  # model input has no batch axis
                a = a[0]
            elif i.shape and i.shape[0] is not None and i.shape[0] != a.shape[0]:
                raise InputError(f"input {i.name!r}: model batch dim is {i.shape[0]}, data gives {a.shape[0]}")
            out[i.name] = a
        yield out


def synthesize(inputs: list[InputInfo], n: int, seed: int, dim: int = 32) -> Batch:
    """Random samples from the inputs' types: N(0,1) floats, small non-negative integers, masks of 1.

    Symbolic dims become `dim` (the batch dim becomes the sample axis).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i in inputs:
        shape = (n,) + tuple(d if d is not None else dim for d in i.shape[1:])
        if np.issubdtype(i.dtype, np.floating):
            out[i.name] = rng.standard_normal(shape).astype(i.dtype)
        elif np.issubdtype(i.dtype, np.integer):
            hi = 2 if "mask" in i.name.lower() else 100
            lo = 1 if "mask" in i.name.lower() else 0
            out[i.name] = rng.integers(lo, hi, size=shape).astype(i.dtype)
        elif i.dtype == np.bool_:
            out[i.name] = np.ones(shape, dtype=bool)
        else:
            raise InputError(f"cannot synthesize data for input {i.name!r} of type {i.dtype}")
    return out


class ArrayDataset(Dataset):
    """In-memory samples (synthesized data, or arrays given through the library API)."""

    def __init__(self, arrays: Batch, inputs: list[InputInfo], start: int = 0, stop: int | None = None):
        missing = {i.name for i in inputs} - set(arrays)
        if missing:
            raise InputError(f"data: missing arrays for model inputs {sorted(missing)}")
        self.arrays = {i.name: _cast(np.asarray(arrays[i.name]), i) for i in inputs}
        self.inputs = inputs
        self.path = Path("<memory>")
        n = next(iter(self.arrays.values())).shape[0]
        self.start, self.stop = start, n if stop is None else min(stop, n)

    def samples(self) -> Iterator[Batch]:
        if len(self):
            yield {k: v[self.start : self.stop] for k, v in self.arrays.items()}
