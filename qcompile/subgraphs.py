"""Values inside control-flow bodies (If branches, Loop and Scan bodies): finding them, and reading
them in an onnxruntime session.

A value computed inside a body is invisible to the graph around it. `expose` threads each named
value out, one level at a time, until it is an output of the main graph:

- If: the value becomes an extra output of the branch that computes it, the other branch outputs
  an empty tensor of the same type (a sample that takes the other branch contributes no values),
  and the If node gets the matching extra output;
- Loop / Scan: the value becomes an extra scan output of the body, which the node stacks over the
  iterations along a new leading axis (Scan's `scan_output_axes` / `_directions` get 0 for it).

Every change is undone when the context exits: the model is unchanged afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

CONTROL_FLOW = ("If", "Loop", "Scan")


def owners(graph: ir.Graph) -> dict[int, tuple[ir.Node, str]]:
    """id(subgraph) -> (the node owning it, the attribute name), for every nested subgraph."""
    out = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for name, attr in node.attributes.items():
            if attr.type == ir.AttributeType.GRAPH:
                out[id(attr.as_graph())] = (node, name)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    out[id(g)] = (node, name)
    return out


def all_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Name -> value for the inputs, initializers and node outputs of `graph` and its subgraphs."""
    out: dict[str, ir.Value] = {}
    graphs = [graph] + [a.as_graph() for n in ir.traversal.RecursiveGraphIterator(graph) for a in n.attributes.values()
                        if a.type == ir.AttributeType.GRAPH]
    for g in graphs:
        out.update({v.name: v for v in g.inputs})
        out.update(g.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        out.update({o.name: o for o in node.outputs})
    return out


def graph_of(value: ir.Value) -> ir.Graph | None:
    p = value.producer()
    return p.graph if p is not None else value.graph


def location(node: ir.Node, main: ir.Graph) -> str | None:
    """Where a node sits, e.g. "If '/If' then_branch", or None in the main graph."""
    if node.graph is main or node.graph is None:
        return None
    owner = owners(main).get(id(node.graph))
    return f"{owner[0].op_type} {owner[0].name!r} {owner[1]}" if owner else "a subgraph"


@contextlib.contextmanager
def expose(model: ir.Model, names: list[str]) -> Iterator[dict[str, str]]:
    """Within the context, every named value is readable as a main-graph output: yields
    name -> that output's name. Raises KeyError for names the model does not have."""
    main = model.graph
    values = all_values(main)
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"values not in graph: {missing[:5]}")
    own = owners(main)
    undo: list = []
    taken = set(values)
    out: dict[str, str] = {}
    existing = {v.name for v in main.outputs}
    try:
        for name in names:
            if name in out:
                continue
            v = values[name]
            g = graph_of(v)
            while g is not None and g is not main:
                node, attr = own[id(g)]
                v = _thread_out(node, attr, g, v, taken, undo)
                g = node.graph
            if v.name not in existing:
                main.outputs.append(v)
                existing.add(v.name)
                undo.append(main.outputs.pop)
            out[name] = v.name
        yield out
    finally:
        for step in reversed(undo):
            step()


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _thread_out(node: ir.Node, attr: str, body: ir.Graph, v: ir.Value, taken: set[str], undo: list) -> ir.Value:
    """Make `v` (computed in `body`, owned by `node`) an extra output of `node`; returns that output.
    The value goes out through an Identity of its own: onnxruntime's Scan returns zeros for a body
    output that is a body input, and breaks the state when a state output is also a scan output."""
    dtype = v.dtype if v.dtype is not None else ir.DataType.FLOAT  # before shape inference: calibrated values are float
    ident = ir.node("Identity", [v], name=_fresh(f"{v.name}_expose", taken))
    ident.outputs[0].name, ident.outputs[0].dtype, ident.outputs[0].shape = ident.name, dtype, v.shape
    body.append(ident)
    undo.append(lambda: body.remove(ident))
    v = ident.outputs[0]
    body.outputs.append(v)
    undo.append(body.outputs.pop)
    if node.op_type == "If":
        other = node.attributes["else_branch" if attr == "then_branch" else "then_branch"].as_graph()
        empty = ir.tensor(np.zeros([0], dtype=dtype.numpy()), name=_fresh(f"{v.name}_empty", taken))
        const = ir.node("Constant", [], {"value": empty}, name=empty.name)
        const.outputs[0].name, const.outputs[0].dtype = empty.name, dtype
        other.append(const)
        other.outputs.append(const.outputs[0])
        undo.extend([lambda: other.remove(const), other.outputs.pop])
    elif node.op_type == "Scan":
        for key in ("scan_output_axes", "scan_output_directions"):
            old = node.attributes.get(key)
            if old is not None:
                node.attributes[key] = ir.AttrInt64s(key, [*old.as_ints(), 0])
                undo.append(lambda key=key, old=old: node.attributes.__setitem__(key, old))
    n = len(node.outputs)
    node.resize_outputs(n + 1)
    out = node.outputs[n]
    out.name, out.dtype = _fresh(f"{v.name}_out", taken), dtype
    undo.append(lambda: node.resize_outputs(n))
    return out
