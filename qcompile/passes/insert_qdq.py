"""Insert Q/DQ pairs for every value the plan quantizes.

Before:  y = MatMul(x, W)                      z = Conv(a, K, b) -> Relu -> r
After:   y = MatMul(DQ(Q(x, sx, zx)), DQ(Wq, sw, axis=1))
         r = Relu(Conv(DQ(Q(a)), DQ(Kq, sk, axis=0), DQ(bq:int32, sa*sk, axis=0)));  r' = DQ(Q(r))

- Weights are quantized offline (`qcompile.weights`) and stored as codes of the format's ONNX type
  with a standard DequantizeLinear when onnxruntime has that type and a use for it (FP8; INT when
  the node's activation is INT-quantized too, for the integer QDQ fusions); otherwise packed at
  their bit width behind a `qcompile.Dequantize*` function op (`qcompile.functions`), which the
  MatMulNBits lowering may replace, e.g. for E2M1 / OCP MX:
      W  ->  qcompile.DequantizeMX(packed_codes:uint8, scale_codes:uint8 E8M0) -> MatMul
  The decoding node names its format in metadata (`stored.FORMAT_KEY`), so the lowering reads
  every weight's stored form back from the graph (`qcompile.stored`), also from a saved model.
- What the report shows per weight (`LayerRecord`) is written on the quantized node itself, as
  JSON in its `qcompile.weights` metadata (`layer_records` reads it back): the pass keeps no state.
- An activation in a format onnxruntime has no QuantizeLinear for (FP6, FP4, any ExMy, MX, NVFP4)
  gets a `qcompile.FakeQuant*` op instead of the Q/DQ pair, with the same arithmetic.
- An activation gets one Q/DQ pair per (value, spec); only the plan's consumers read the DQ output,
  other consumers (a residual Add, a LayerNorm) keep the float value, except for a node *output*
  the plan quantizes (after Conv(+Relu)), where every consumer reads it so onnxruntime can fuse
  the Conv into QLinearConv.
- Through shape ops (Reshape, Transpose, MaxPool, Concat, ...) the same scale is applied to the
  op's data inputs too (`analyze.tie_heads`), so onnxruntime runs those ops on integers and drops
  the DQ -> op -> Q pairs.
- Bias of Conv/Gemm (int formats) becomes int32 with scale s_x * s_w, as integer kernels expect.
- Nodes inside If / Loop / Scan bodies are quantized where they are: their Q/DQ nodes go into the
  body, and so do the constants those read (codes, scales, zero points), as initializers of the
  body itself. onnxruntime fuses QDQ in a subgraph only then: read from the outer scope, the same
  constants leave DQ -> MatMul unfused (64x1024x1024 int8 in an If branch: 15 ms vs 0.13 ms).

The pass is idempotent: an input already produced by DequantizeLinear is left alone.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile import codec, external, functions, storage
from qcompile.analyze import tie_heads
from qcompile.calibrate import qparams_from_clip
from qcompile.errors import PreconditionError
from qcompile.formats import BlockFormat, FloatFormat, IntFormat
from qcompile.graph import drop_unused_initializers, initializer
from qcompile.plan import InputQuant, QuantPlan, QuantSpec
from qcompile.stored import FORMAT_KEY
from qcompile.weights import QuantizedWeight, WeightCache, quantize, to_ir_tensor

log = logging.getLogger(__name__)
RECORDS_KEY = "qcompile.weights"  # node metadata: JSON list of the node's LayerRecords


@dataclass
class LayerRecord:
    """What the report shows per quantized weight."""

    node: str
    value: str
    format: str
    granularity: str
    weight_sqnr_db: float
    float_bytes: int
    quant_bytes: float
    emission: str = "DequantizeLinear"  # the op that decodes the stored weight
    pairs: str | None = None  # how an int16 pair bound was met: permuted channels, grown channel scales


def layer_records(graph: ir.Graph) -> list[LayerRecord]:
    """Every LayerRecord InsertQDQPass wrote on the nodes of `graph` (and its bodies), in graph order."""
    out = []
    for n in ir.traversal.RecursiveGraphIterator(graph):
        text = n.metadata_props.get(RECORDS_KEY)
        if text:
            out.extend(LayerRecord(**r) for r in json.loads(text))
    return out


def _add_record(node: ir.Node, record: LayerRecord) -> None:
    rows = json.loads(node.metadata_props.get(RECORDS_KEY, "[]"))
    node.metadata_props[RECORDS_KEY] = json.dumps(rows + [dataclasses.asdict(record)])


def weight_sqnr_db(w: np.ndarray, t: storage.PackedTensor) -> float:
    """sqnr_db(w, t.dequantize()), dequantizing a slice of rows at a time (bounded memory)."""
    if w.ndim == 0 or w.shape != t.shape:
        return sqnr_db(w, t.dequantize())
    signal = noise = 0.0
    for i, j, part in t.row_slices():
        r = w[i:j].astype(np.float64)
        noise += float(np.sum((r - part) ** 2))
        signal += float(np.sum(r**2))
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return 10 * np.log10(max(signal, 1e-300) / noise)


def sqnr_db(ref: np.ndarray, test: np.ndarray, chunk: int = 1 << 22) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2); inf when equal. Summed in float64 over chunks of
    `chunk` elements, so a large weight never gets float64 copies of its own size."""
    ref, test = np.asarray(ref).reshape(-1), np.asarray(test).reshape(-1)
    signal = noise = 0.0
    for i in range(0, ref.size, chunk):
        r = ref[i : i + chunk].astype(np.float64)
        noise += float(np.sum((r - test[i : i + chunk].astype(np.float64)) ** 2))
        signal += float(np.sum(r**2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(max(signal, 1e-300) / noise)


class InsertQDQPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan, caps, cache: WeightCache | None = None) -> None:
        """caps: the backend's `Capabilities` (which Q/DQ types it has, which fuse through shape ops)."""
        super().__init__()
        self.plan = plan
        self.caps = caps
        self.cache = cache or WeightCache()  # weights BiasCorrectionPass quantized already
        self._emit: functions.Emitter | None = None  # names + initializers, shared with the qcompile ops
        self._emitters: dict[int, functions.Emitter] = {}  # id(graph) -> an Emitter adding to that graph

    def __repr__(self) -> str:
        return f"InsertQDQPass({len(self.plan)} nodes)"

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 1)
        for name, node in self.plan.nodes.items():
            quants = list(node.inputs.values()) + ([node.output] if node.output else [])
            for q in quants:
                if self._native(q.spec):
                    dtype = q.spec.fmt.onnx_dtype
                    if opset < self.caps.min_opset(dtype):
                        raise PreconditionError(
                            f"{q.spec.format} Q/DQ needs opset >= {self.caps.min_opset(dtype)}, model has {opset}"
                        )
                elif q.role == "activation" and not _function_activation(q.spec):
                    raise PreconditionError(f"{q.spec.format} activations of {name}: only symmetric (zero point 0) "
                                            "quantization is available for formats without a native Q/DQ")
                else:
                    op = functions.op_type(q.spec.fmt, q.role)
                    if opset < functions.OP_MIN_OPSET[op]:
                        raise PreconditionError(f"{q.spec.format} needs opset >= {functions.OP_MIN_OPSET[op]} "
                                                f"(qcompile.{op}), model has {opset}")
                if q.role == "activation" and q.spec.clip is None and not q.spec.dynamic:
                    raise PreconditionError(f"activation {q.value!r} of {name} has no calibrated range")

    def _native(self, spec: QuantSpec) -> bool:
        """onnxruntime has QuantizeLinear/DequantizeLinear for this (scalar) format."""
        fmt = spec.fmt
        return not isinstance(fmt, BlockFormat) and not getattr(fmt, "frac_bits", 0) and self.caps.qdq_native(fmt.onnx_dtype)

    # --- naming -------------------------------------------------------------------------------
    def _name(self, base: str) -> str:
        return self._emit.fresh(base)

    def _emitter(self, graph: ir.Graph) -> functions.Emitter:
        """An Emitter adding nodes and initializers to `graph` (a body, or the main graph), drawing
        names from the one set of the whole model."""
        if id(graph) not in self._emitters:
            e = copy.copy(self._emit)
            e.graph = graph
            self._emitters[id(graph)] = e
        return self._emitters[id(graph)]

    def _const(self, graph: ir.Graph, tensor: ir.Tensor) -> ir.Value:
        return initializer(graph, self._name(tensor.name), tensor)

    # --- main ----------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._emit = functions.Emitter(graph)
        self._emitters = {id(graph): self._emit}
        nodes = {n.name: n for n in ir.traversal.RecursiveGraphIterator(graph)}
        act_cache: dict[tuple, tuple[ir.Value, float, float]] = {}
        weight_cache: dict[tuple, tuple[ir.Value, np.ndarray]] = {}
        changed = 0
        for name, nplan in self.plan.nodes.items():
            node = nodes.get(name)
            if node is None:
                log.warning("plan names node %r, which is not in the graph; skipped", name)
                continue
            act_scale, w_scale = None, None
            g = node.graph  # the body the node sits in (see the module doc)
            int_acts = any(q.role == "activation" and self._native(q.spec) and isinstance(q.spec.fmt, IntFormat)
                           for q in nplan.inputs.values())
            for i, q in sorted(nplan.inputs.items()):
                v = node.inputs[i]
                if v is None or v.name != q.value:
                    if v is not None and _is_dq(v):
                        continue  # already quantized (second run)
                    log.warning("plan input %d of %s is %r, graph has %r; skipped", i, name, q.value, v and v.name)
                    continue
                if q.role == "weight":
                    dq, w_scale = self._weight(g, node, i, q, weight_cache, int_acts)
                    node.replace_input_with(i, dq)
                else:
                    dq, s, _ = self._activation(g, v, q.spec, act_cache, consumer=node.name)
                    node.replace_input_with(i, dq)
                    if getattr(q.spec.fmt, "onnx_dtype", None) in self.caps.shape_op_qdq_drop:
                        self._tie(v, q.spec, act_cache)
                    act_scale = s if i == 0 or act_scale is None else act_scale
                changed += 1
            if nplan.bias and act_scale is not None and w_scale is not None and len(node.inputs) > 2:
                changed += self._bias(g, node, act_scale, w_scale)
            if nplan.output is not None:
                changed += self._output(graph, nplan.output, act_cache)
        if changed:
            graph.sort()
            drop_unused_initializers(graph)
            functions.attach(model)
        return ir.passes.PassResult(model, modified=changed > 0)

    def _weight(self, graph, node, i, q: InputQuant, cache, int_acts: bool) -> tuple[ir.Value, np.ndarray | None]:
        w = node.inputs[i]
        native = self._native(q.spec) and (int_acts or not isinstance(q.spec.fmt, IntFormat))
        key = (w.name, q.spec, native, id(graph))
        if key in cache:
            return cache[key]
        arr = w.const_value.numpy()
        qw = self.cache.get(w.const_value, q.spec, arr, take=True)
        pairs = None
        if native:
            out, scale, t, grown = self._native_weight(graph, w, qw, q.spec)
            if q.spec.pairs is not None:
                permuted = node.metadata_props.get("qcompile.pairs")
                pairs = "; ".join(x for x in (permuted, f"{grown} channel scales grown" if grown else None) if x) or "fits"
        else:
            t = quantize(arr, q.spec, qw)
            out, scale = functions.dequantize(self._emitter(graph), t, self._name(w.name)), None
        out.producer().metadata_props[FORMAT_KEY] = t.fmt.name
        _add_record(node, LayerRecord(node.name, w.name, q.spec.format, _gran(q.spec), float(weight_sqnr_db(arr, t)),
                                      int(arr.nbytes), float(t.nbytes), _op_name(out.producer()), pairs))
        external.drop_pages(w.const_value)  # a memory-mapped float weight is read once: return its pages
        cache[key] = (out, scale)
        return cache[key]

    def _native_weight(self, graph, w: ir.Value, qw: QuantizedWeight, spec: QuantSpec) -> tuple[ir.Value, np.ndarray, storage.PackedTensor, int]:
        """DequantizeLinear(codes of the format's ONNX type, scale[, zero point]) of weight `w`, quantized as `qw`."""
        fmt = spec.fmt
        codes = self._const(graph, to_ir_tensor(qw.codes, fmt, f"{w.name}_q"))
        scale = self._const(graph, ir.tensor(qw.scale, name=f"{w.name}_scale"))
        ins = [codes, scale]
        if qw.zero_point is not None and isinstance(fmt, IntFormat):
            ins.append(self._const(graph, to_ir_tensor(qw.zero_point, fmt, f"{w.name}_zp")))
        attrs = {}
        if qw.axis is not None:
            attrs["axis"] = qw.axis
        if qw.block_size is not None:
            attrs["block_size"] = qw.block_size
        dq = ir.node("DequantizeLinear", ins, attrs, name=self._name(f"{w.name}_DequantizeLinear"))
        dq.outputs[0].name = self._name(f"{w.name}_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = w.shape
        graph.append(dq)
        return dq.outputs[0], qw.scale, storage.from_scalar(qw.codes, qw.scale, fmt, qw.axis, qw.block_size), qw.grown

    def _activation(self, graph, v: ir.Value, spec: QuantSpec, cache, consumer: str | None = None) -> tuple[ir.Value, float, float]:
        """Q/DQ of v with spec; one pair per quantized consumer (onnxruntime fuses a MatMul only when
        its activation Q/DQ is its own), shared for shape-op ties and node outputs."""
        key = (v.name, spec, consumer, id(graph))
        if key in cache:
            return cache[key]
        fmt = spec.fmt
        if not self._native(spec):
            cache[key] = (self._function_activation(graph, v, spec), None, 0.0)
            return cache[key]
        s, zp = qparams_from_clip(spec.clip[0], spec.clip[1], fmt, spec.symmetric)
        scale = self._const(graph, ir.tensor(np.array(s, dtype=np.float32), name=f"{v.name}_scale"))
        zero = self._const(graph, to_ir_tensor(np.array(zp, dtype=np.float32), fmt, f"{v.name}_zp"))
        q = ir.node("QuantizeLinear", [v, scale, zero], name=self._name(f"{v.name}_QuantizeLinear"))
        q.outputs[0].name = self._name(f"{v.name}_q")
        q.outputs[0].dtype = fmt.onnx_dtype
        q.outputs[0].shape = v.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=self._name(f"{v.name}_DequantizeLinear"))
        dq.outputs[0].name = self._name(f"{v.name}_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = v.shape
        graph.extend([q, dq])
        cache[key] = (dq.outputs[0], s, zp)
        return cache[key]

    def _function_activation(self, graph, v: ir.Value, spec: QuantSpec) -> ir.Value:
        """A qcompile.FakeQuant* op: per-tensor scale from the clip, or run-time block scales (with
        NVFP4's static tensor scale from the calibrated amax)."""
        fmt, name = spec.fmt, self._name(f"{v.name}_fq")
        amax = max(abs(spec.clip[0]), abs(spec.clip[1])) if spec.clip is not None else 0.0
        if isinstance(fmt, BlockFormat):
            st = codec.tensor_scale_from_amax(amax, fmt) if fmt.tensor_scale is not None else None
            out = functions.fake_quant(self._emitter(graph), v, fmt, name, tensor_scale=st, axis=spec.granularity.axis)
            out.producer().metadata_props[FORMAT_KEY] = fmt.name
            return out
        s, _ = qparams_from_clip(spec.clip[0], spec.clip[1], fmt, True)
        return functions.fake_quant(self._emitter(graph), v, fmt, name, scale=s)

    def _tie(self, v: ir.Value, spec: QuantSpec, cache) -> None:
        """Quantize the data inputs of the shape ops above `v` with v's scale (see module doc)."""
        shape_nodes, _ = tie_heads(v)
        for sn in shape_nodes:
            for j, u in enumerate(sn.inputs):
                if u is None or (sn.op_type != "Concat" and j > 0) or _is_dq(u):
                    continue
                dq, _, _ = self._activation(sn.graph, u, spec, cache)
                sn.replace_input_with(j, dq)

    def _output(self, graph, q: InputQuant, cache) -> int:
        v = next((o for n in ir.traversal.RecursiveGraphIterator(graph) for o in n.outputs if o.name == q.value), None)
        if v is None or any(u.node.op_type == "QuantizeLinear" for u in v.uses()):
            return 0  # absent, or already quantized (second run)
        dq, _, _ = self._activation(v.producer().graph, v, q.spec, cache)
        moved = 0
        for use in list(v.uses()):
            if use.node.op_type != "QuantizeLinear":
                use.node.replace_input_with(use.idx, dq)
                moved += 1
        return moved

    def _bias(self, graph, node, act_scale: float, w_scale: np.ndarray) -> int:
        b = node.inputs[2]
        if b is None or b.const_value is None or w_scale.ndim > 1:
            return 0
        arr = b.const_value.numpy().astype(np.float32)
        scale = (np.float32(act_scale) * np.broadcast_to(w_scale, arr.shape)).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale)
        q = np.rint(arr.astype(np.float64) / scale)
        if not np.all(np.abs(q) <= 2**31 - 1):  # saturating would change the bias: keep it float
            log.debug("bias of %s does not fit int32 at scale s_x*s_w; left in float", node.name)
            return 0
        q = q.astype(np.int32)
        codes = self._const(graph, ir.tensor(q, name=f"{b.name}_q"))
        sc = self._const(graph, ir.tensor(scale, name=f"{b.name}_scale"))
        dq = ir.node("DequantizeLinear", [codes, sc], {"axis": 0}, name=self._name(f"{b.name}_DequantizeLinear"))
        dq.outputs[0].name = self._name(f"{b.name}_dq")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = b.shape
        graph.append(dq)
        node.replace_input_with(2, dq.outputs[0])
        return 1


def _is_dq(v: ir.Value | None) -> bool:
    p = v.producer() if v is not None else None
    return p is not None and (p.op_type == "DequantizeLinear" or p.domain == functions.DOMAIN)


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}"


def _function_activation(spec: QuantSpec) -> bool:
    """A qcompile.FakeQuant* op can express it: block formats, symmetric scalar formats with a zero."""
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        return True
    if isinstance(fmt, FloatFormat):
        return fmt.signed and fmt.has_zero
    return spec.symmetric


def _gran(spec: QuantSpec) -> str:
    g = spec.granularity.to_json()
    return g["kind"] + (f"(axis={g['axis']})" if "axis" in g else "") + (f"/{g['size']}" if "size" in g else "")
