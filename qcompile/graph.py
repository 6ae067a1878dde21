"""Small graph edits every pass shares: new initializers, new nodes, dropping dead constants.

One place for them, so that a pass never hand-builds an `ir.Value` with a const_value (and forgets
its type or shape) and no pass keeps its own copy of "drop unused initializers".
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile import external


def bodies(graph: ir.Graph) -> list[ir.Graph]:
    """`graph` and every If / Loop / Scan body in it."""
    return [graph] + [a.as_graph() for n in ir.traversal.RecursiveGraphIterator(graph) for a in n.attributes.values()
                      if a.type == ir.AttributeType.GRAPH]


def initializer(graph: ir.Graph, name: str, value: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a constant named `name` (typed and shaped from the tensor) in `graph`."""
    tensor = ir.tensor(value, name=name) if isinstance(value, np.ndarray) else value
    if tensor.name != name:
        tensor.name = name
    v = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(v)
    return v


def const_array(v: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (an initializer), else None."""
    return None if v is None or v.const_value is None else v.const_value.numpy()


def attr_int(node: ir.Node, name: str, default: int = 0) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def index(graph: ir.Graph) -> tuple[dict[str, ir.Node], dict[str, ir.Value]]:
    """The graph's nodes by name, and its values (node outputs and graph inputs) by name."""
    nodes = {n.name: n for n in graph}
    return nodes, {o.name: o for n in graph for o in n.outputs} | {v.name: v for v in graph.inputs}


def drop_unused_initializers(graph: ir.Graph, recursive: bool = True) -> int:
    """Remove the initializers nothing reads (of every body too with `recursive`); returns how many."""
    dropped = 0
    for g in bodies(graph) if recursive else [graph]:
        for name, v in list(g.initializers.items()):
            if not v.uses() and not v.is_graph_output():
                del g.initializers[name]
                dropped += 1
    return dropped


def replace_const(graph: ir.Graph, node: ir.Node, idx: int, fn: Callable[[np.ndarray], np.ndarray], name: str) -> None:
    """Input `idx` of `node` := a new initializer `name` = fn(old) (`external.derived`: recomputed
    from the file for a file-backed weight); the old one is dropped once nothing reads it (a weight
    rewritten twice, as a consumer and as a producer, is never held twice). Another node sharing
    the old constant keeps it."""
    old = node.inputs[idx]
    nv = initializer(graph, name, external.derived(old.const_value, fn, name))
    node.replace_input_with(idx, nv)
    if not old.uses() and not old.is_graph_output() and graph.initializers.get(old.name) is old:
        del graph.initializers[old.name]
