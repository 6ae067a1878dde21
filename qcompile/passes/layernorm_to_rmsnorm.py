"""LayerNorm -> RMSNorm on a pre-LN residual stream, by centering what writes it (the step that
lets QuaRot / SliceGPT rotate OPT-style models).

With C = I - 11^T/n (the projection off the all-ones direction), centering every term of a
stream (`qcompile.streams`) — each embedding table E_i := E_i C (rows minus their mean), each
writer W_l := W_l C, b_l := b_l C — leaves every stream row h mean-free (a sum of mean-free rows;
the stream's Reshapes only move rows), and then

    LayerNorm(h) = g (h - mean h) / sqrt(var h + eps) + b = g h / sqrt(mean(h^2) + eps) + b

so each LayerNormalization(h, g, b, eps) becomes the decomposed RMSNorm

    Div(h, Sqrt(Add(ReduceMean(Pow(h, 2), axes=[-1]), eps)))  -> Mul g -> Add b

(the Mul left out when g = 1, the Add when b = 0): the form `passes.residual_rotate` matches and
folds into the readers. Exact in float: the centering is computed in float64, a stored row's
mean is ~1e-8 of its size where LayerNorm subtracted it. The readers are unchanged. Converted
only where every norm of the stream is a float32 LayerNormalization over the last axis (an
RMSNorm on the same stream would see the centering); `applied` lists what each conversion touched.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import const_array, initializer
from qcompile.streams import Norm, find_streams, fold_const, fold_out

CENTER_TAG = "center"


def _center(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=-1, keepdims=True)


class LayerNormToRMSNormPass(ir.passes.InPlacePass):
    """Center the streams keyed (their first embedding Gather's name) in `streams` and turn their
    LayerNormalizations into RMSNorms; see the module doc."""

    def __init__(self, streams: set[str]) -> None:
        super().__init__()
        self.streams = set(streams)
        self.applied: list[dict] = []

    def __repr__(self) -> str:
        return f"LayerNormToRMSNormPass({sorted(self.streams)})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, self.applied = model.graph, []
        opset = model.opset_imports.get("", 1)
        for s in find_streams(graph)[0]:
            if s.gather.name not in self.streams or s.kinds != {"layer"}:
                continue
            for src in s.sources:
                fold_const(graph, src, 0, _center, CENTER_TAG)
            for w in s.writers:
                fold_out(graph, w, _center, CENTER_TAG)
            norms = [self._rms(graph, n, opset) for n in s.norms]
            self.applied.append({"transform": "layernorm-to-rmsnorm", "stream": s.gather.name, "norms": norms,
                                 "centered": sorted({*(n.name for n in s.sources), *(w.node.name for w in s.writers)}),
                                 "nodes": sorted({*(n.name for n in s.sources), *(w.node.name for w in s.writers), *norms})})
        return ir.passes.PassResult(model, modified=bool(self.applied))

    @staticmethod
    def _rms(graph: ir.Graph, norm: Norm, opset: int) -> str:
        """Replace the LayerNormalization of `norm` by the decomposed RMSNorm, Mul g, Add b."""
        ln, h = norm.gain_node, norm.source
        eps = ln.attributes["epsilon"].as_float() if "epsilon" in ln.attributes else 1e-5
        dtype = const_array(norm.gain).dtype

        def const(tag: str, value) -> ir.Value:
            return initializer(graph, f"{ln.name}_rms_{tag}", np.asarray(value, dtype))

        axes = np.array([-1], np.int64)
        mean_in = [None, initializer(graph, f"{ln.name}_rms_axes", axes)] if opset >= 18 else [None]
        nodes = [ir.node("Pow", [h, const("two", 2.0)], name=f"{ln.name}_rms_pow")]
        mean_in[0] = nodes[-1].outputs[0]
        nodes.append(ir.node("ReduceMean", mean_in, {"keepdims": 1, **({} if opset >= 18 else {"axes": [-1]})},
                             name=f"{ln.name}_rms_mean"))
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], const("eps", eps)], name=f"{ln.name}_rms_eps"))
        nodes.append(ir.node("Sqrt", [nodes[-1].outputs[0]], name=f"{ln.name}_rms_sqrt"))
        nodes.append(ir.node("Div", [h, nodes[-1].outputs[0]], name=f"{ln.name}_rms_div"))
        if np.any(const_array(norm.gain) != 1):
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], norm.gain], name=f"{ln.name}_rms_gain"))
        if norm.bias is not None and np.any(const_array(norm.bias) != 0):
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], norm.bias], name=f"{ln.name}_rms_bias"))
        for n in nodes:
            n.outputs[0].type, n.outputs[0].shape = h.type, None
        nodes[-1].outputs[0].shape = ln.outputs[0].shape
        graph.insert_before(ln, nodes)
        ir.convenience.replace_all_uses_with(ln.outputs[0], nodes[-1].outputs[0])
        graph.remove(ln, safe=True)
        return ln.name
