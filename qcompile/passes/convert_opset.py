"""Convert the default-domain opset up to what the target needs, exactly, on the model's structure.

Rewrite: every default-domain node (main graph, If/Loop/Scan bodies) is rewritten to its form at
`target` opset by onnx's C++ version converter (`onnx.version_converter`, adapters from opset 7 on),
e.g. at opset 13 `Unsqueeze(x, axes=[0])` -> `Unsqueeze(x, Constant([0]))`, at 18
`ReduceMean(x, axes=[2, 3])` -> `ReduceMean(x, Constant([2, 3]))`, at 10 `Upsample` -> `Resize`,
at 11 `Clip(x, min=a, max=b)` -> `Clip(x, a, b)`. The adapters change no arithmetic, so the outputs
are unchanged (verified, below). onnxscript's converter is not used: it accepts targets 18-25 only and
leaves the `axes` attributes of ReduceMean/ReduceL2 (>= 18) and Unsqueeze (>= 13) in place.

The opset is raised to `target` only (never past it, never down); a model at or above it is left alone.

Any size: tensors above `STRIP_BYTES` (weights; initializers and tensor attributes such as a large
Constant) are not serialized for the converter. Each is replaced by an external-data reference into a
scratch file, converted, and the original tensor object put back by its reference afterwards; small
tensors (shapes, axes, pads an adapter may read) go through as they are. With `feeds` the scratch
file gets the weight bytes, one tensor at a time, so the original and the converted model both run
in onnxruntime from it: their outputs are compared on the feeds (`DISABLE_ALL` sessions, so no
optimizer differs between them) and a relative error above `rtol` (max |a - b| / max |b| over each
output) refuses the conversion. The figures go to `model.metadata_props[METADATA_KEY]` as JSON
({"from", "to", "max_abs_err", "max_rel_err"}; `pop_record` reads and removes it).

Model-local functions are inlined first (a function's default-domain opset must equal the model's,
and the converter reads graphs only), and unnamed or duplicate node names made unique. A node the converter cannot take (no schema at the model's
opset, no adapter to a newer version) refuses the model with one line naming the op and the opsets.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnx.inliner
import onnx_ir as ir

from qcompile.errors import PreconditionError, UnsupportedModelError

log = logging.getLogger(__name__)

STRIP_BYTES = 1024  # tensors larger than this are not serialized for the converter
METADATA_KEY = "qcompile.opset_conversion"
_SCRATCH = "qcompile-opset-weights.bin"
_ALIGN = 64


def default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    return [graph] + [g for n in ir.traversal.RecursiveGraphIterator(graph) for a in n.attributes.values()
                      if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                      for g in (a.as_graphs() if a.type == ir.AttributeType.GRAPHS else [a.as_graph()])]


class _Slots:
    """Every large tensor of a model (and every one in an external data file: its location is
    relative to the model's directory), with a way to swap it for a stand-in and back.

    A slot is (initializer value) or (node, attribute name)."""

    def __init__(self, model: ir.Model, limit: int) -> None:
        self.slots: list[tuple[object, str | None, ir.TensorProtocol]] = []
        for g in _graphs(model.graph):
            for v in g.initializers.values():
                if v.const_value is not None and (v.const_value.nbytes > limit or isinstance(v.const_value, ir.ExternalTensor)):
                    self.slots.append((v, None, v.const_value))
            for n in g:
                for name, a in n.attributes.items():
                    if a.type == ir.AttributeType.TENSOR and a.as_tensor().nbytes > limit:
                        self.slots.append((n, name, a.as_tensor()))

    @staticmethod
    def _set(owner, attr: str | None, tensor: ir.TensorProtocol) -> None:
        if attr is None:
            owner.const_value = tensor
        else:
            owner.attributes[attr] = ir.AttrTensor(attr, tensor)

    def stand_ins(self, scratch: Path, write: bool) -> list[ir.ExternalTensor]:
        """External-data references into `scratch`, one per slot at its own offset (bytes written if `write`)."""
        out, offset = [], 0
        with open(scratch, "wb") if write else contextlib.nullcontext() as f:
            for _, _, t in self.slots:
                offset = -(-offset // _ALIGN) * _ALIGN
                if write:
                    f.seek(offset)
                    f.write(t.tobytes())
                out.append(ir.ExternalTensor(_SCRATCH, offset=offset, length=t.nbytes, dtype=t.dtype, shape=t.shape,
                                             name=t.name, base_dir=scratch.parent))
                offset += t.nbytes
        return out

    def structure(self, model: ir.Model, stand_ins: list[ir.ExternalTensor]) -> onnx.ModelProto:
        """The model as a proto with the large tensors replaced by `stand_ins` (the model is left as it was)."""
        try:
            for (owner, attr, _), s in zip(self.slots, stand_ins):
                self._set(owner, attr, s)
            return ir.to_proto(model)
        finally:
            for owner, attr, t in self.slots:
                self._set(owner, attr, t)

    def reattach(self, model: ir.Model) -> None:
        """Put the original tensors back where the converted `model` holds a stand-in."""
        by_offset = {}
        offset = 0
        for _, _, t in self.slots:
            offset = -(-offset // _ALIGN) * _ALIGN
            by_offset[offset] = t
            offset += t.nbytes

        def original(t) -> ir.TensorProtocol | None:
            if isinstance(t, ir.ExternalTensor) and t.location == _SCRATCH:
                return by_offset[t.offset]
            return None

        for g in _graphs(model.graph):
            for v in g.initializers.values():
                if (o := original(v.const_value)) is not None:
                    v.const_value = o
            for n in g:
                for name, a in list(n.attributes.items()):
                    if a.type == ir.AttributeType.TENSOR and (o := original(a.as_tensor())) is not None:
                        self._set(n, name, o)


def _walk(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _walk(g)


def _unique_node_names(graph: onnx.GraphProto) -> None:
    """Name unnamed nodes and rename duplicates `<name or op_type>_<k>`, across the graph and its subgraphs."""
    nodes = list(_walk(graph))
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    for n in nodes:
        if not n.name or n.name in seen:
            base, k = n.name or n.op_type, 0
            while f"{base}_{k}" in taken:
                k += 1
            n.name = f"{base}_{k}"
            taken.add(n.name)
        seen.add(n.name)


def blocking_node(proto: onnx.ModelProto, source: int, target: int) -> str | None:
    """'op X (opset N)' for the first default-domain node with no schema at the model's opset, else None."""
    for n in _walk(proto.graph):
        if n.domain in ("", "ai.onnx") and not _has_schema(n.op_type, source):
            return f"op {n.op_type} has no ONNX schema at opset {source} (a custom or removed op)"
    return None


def _has_schema(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _converter_reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"No Adapter (From|To) Version \$?(\d+) for (\w+)", text)
    if m:
        return f"onnx's version converter has no adapter for {m.group(3)} from opset {m.group(2)}"
    return text.splitlines()[0][-200:] if text else type(e).__name__


def _run(path: Path, feeds: list[dict[str, np.ndarray]], session: Callable) -> tuple[list[str], list[list[np.ndarray]]]:
    try:
        s = session(path, level="disable")
    except Exception as e:  # onnxruntime's own error types
        raise UnsupportedModelError(f"onnxruntime cannot load the {path.stem} opset conversion model: "
                                    f"{str(e).splitlines()[0][:200]}") from None
    names = [o.name for o in s.get_outputs()]
    return names, [s.run(names, {k: v for k, v in f.items() if k in {i.name for i in s.get_inputs()}}) for f in feeds]


def compare_outputs(before: Path, after: Path, feeds: list[dict[str, np.ndarray]], session: Callable) -> dict:
    """Max abs and relative error (max |a-b| / max |b| per output) of `after` against `before` on
    `feeds`, both run by `session(path, level=...)` (the backend's session factory)."""
    names, ref = _run(before, feeds, session)
    names_after, got = _run(after, feeds, session)
    if names_after != names:
        raise UnsupportedModelError(f"opset conversion changed the model's outputs {names} -> {names_after}")
    worst_abs, worst_rel, where = 0.0, 0.0, None
    for rs, gs in zip(ref, got):
        for name, r, g in zip(names, rs, gs):
            if r.shape != g.shape:
                raise UnsupportedModelError(f"opset conversion changed the shape of output {name!r}: {r.shape} -> {g.shape}")
            r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
            same_nan = np.isnan(r64) & np.isnan(g64)
            d = np.where(same_nan, 0.0, np.abs(r64 - g64))
            a = float(np.nan_to_num(d.max(initial=0.0), nan=np.inf))
            scale = float(np.nan_to_num(np.abs(r64[np.isfinite(r64)]), nan=0.0).max(initial=0.0))
            rel = a / scale if scale > 0 else (0.0 if a == 0 else np.inf)
            if rel >= worst_rel:
                where = name
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, rel)
    return {"max_abs_err": worst_abs, "max_rel_err": worst_rel, "worst_output": where}


class ConvertOpsetPass(ir.passes.InPlacePass):
    def __init__(self, target: int, max_opset: int, feeds: Iterable[dict[str, np.ndarray]] | None = None,
                 rtol: float = 1e-5, strip_bytes: int = STRIP_BYTES, session: Callable | None = None) -> None:
        """feeds: samples on which the conversion is checked, run by `session(path, level=...)` (a
        backend's session factory; required with feeds: the pass imports no backend)."""
        super().__init__()
        if feeds is not None and session is None:
            raise ValueError("ConvertOpsetPass: checking a conversion on feeds needs a session factory")
        self.session = session
        self.target = target
        self.max_opset = max_opset
        self.feeds = feeds
        self.rtol = rtol
        self.strip_bytes = strip_bytes

    def __repr__(self) -> str:
        return f"ConvertOpsetPass(opset>={self.target})"

    def requires(self, model: ir.Model) -> None:
        opset = default_opset(model)
        if opset is None:
            raise PreconditionError("model imports no default-domain opset")
        if opset > self.max_opset:
            raise PreconditionError(f"model opset {opset} is newer than onnxruntime supports ({self.max_opset})")
        if self.target > self.max_opset:
            raise PreconditionError(f"the target needs opset {self.target}, newer than onnxruntime supports ({self.max_opset})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        source = default_opset(model)
        if source >= self.target:
            return ir.passes.PassResult(model, modified=False)
        log.info("converting opset %d -> %d (onnx.version_converter)", source, self.target)
        feeds = None if self.feeds is None else list(self.feeds)
        slots = _Slots(model, self.strip_bytes)
        with tempfile.TemporaryDirectory(prefix="qcompile-opset-") as d:
            scratch = Path(d) / _SCRATCH
            structure = slots.structure(model, slots.stand_ins(scratch, write=bool(feeds)))
            if structure.functions:
                structure = onnx.inliner.inline_local_functions(structure)
            _unique_node_names(structure.graph)  # onnxruntime refuses duplicates (in the check below)
            if "ai.onnx" in {o.domain for o in structure.opset_import}:  # the converter reads domain "" only
                for o in structure.opset_import:
                    o.domain = "" if o.domain == "ai.onnx" else o.domain
            reason = blocking_node(structure, source, self.target)
            if reason is None:
                try:
                    converted = onnx.version_converter.convert_version(structure, self.target)
                except (RuntimeError, ValueError, IndexError) as e:
                    reason = _converter_reason(e)
            if reason is not None:
                raise UnsupportedModelError(f"cannot convert opset {source} to {self.target}: {reason}")
            record = {"from": source, "to": self.target}
            if feeds:
                onnx.save(structure, Path(d) / "before.onnx")
                onnx.save(converted, Path(d) / "after.onnx")
                record.update(compare_outputs(Path(d) / "before.onnx", Path(d) / "after.onnx", feeds, self.session))
                if not record["max_rel_err"] <= self.rtol:
                    raise UnsupportedModelError(
                        f"opset conversion {source} -> {self.target} changed the float model: output "
                        f"{record['worst_output']!r} differs by {record['max_rel_err']:.3g} relative "
                        f"(> {self.rtol:g}) on the calibration inputs")
            new = ir.from_proto(converted)
        slots.reattach(new)
        model.graph = new.graph  # model.opset_imports are the graph's: now the converted ones
        model.functions.clear()  # inlined
        model.ir_version = max(model.ir_version, new.ir_version)
        model.metadata_props[METADATA_KEY] = json.dumps(record)
        return ir.passes.PassResult(model, modified=True)


def pop_record(model: ir.Model) -> dict | None:
    """The conversion figures ConvertOpsetPass left on `model` (removed from it), or None."""
    text = model.metadata_props.pop(METADATA_KEY, None)
    return None if text is None else json.loads(text)
