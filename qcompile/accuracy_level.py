"""MatMulNBits accuracy level `auto` (the default): int8 activations where the error they add is negligible.

MatMulNBits at accuracy_level 0 multiplies the float activation by the dequantized 4-bit weight:
the output equals qcompile's simulation. At level 4 onnxruntime's MLAS first quantizes each row
of the activation to int8 per block of the weight's block size along K (symmetric, scale = block
amax / 127) and sums each block as int32 dot products of int8 activations and 4-bit weights, scaled
once per block: 2.3-2.6x faster at batch 1 on this machine (the GEMV chain, README "Decode speed"),
because it does 32 multiply-adds per vector instruction (vpdpbusd, or vpmaddubsw + vpmaddwd)
where level 0 converts every weight to float for 8 (AVX2) or 16 (AVX-512) FMAs.

The only new error is the activation rounding; the integer sums are exact on every x86 ISA MLAS
dispatches to: the AVX2 kernels (no VNNI) add pairs of u8 x s8 products in int16, but one operand
is a 4-bit weight (|w| <= 15) and the other |a| <= 128, so a pair (<= 3840) and the two pairs
vphaddw adds (<= 7680) stay far below 2**15: no saturation, unlike the u8 x s8 int8 GEMMs of issue
9's first item. So level 4 computes the same numbers on AVX2 as here, up to float summation order
(checked under `qemu-x86_64 -cpu Haswell` in tests/test_accuracy_level.py).

Policy (per model). The compiled model's MatMulNBits nodes are emitted at level 0; `choose`
runs the float model, that model and the same graph at level 4 on the first SAMPLES (64)
held-out samples (onnxruntime ENABLE_ALL, 1 thread, this CPU's kernels) and, per output, compares
the energy of level 4's change P = sum (y0 - y4)**2 with that of the weight quantization error
E = sum (y_float - y0)**2. Level 4 is kept iff P <= E * 10**(-MARGIN_DB / 10) on every output: its
change is at least MARGIN_DB = 20 dB below the 4-bit error already there. Then, by the triangle
inequality |y_float - y4| <= |y_float - y0| + |y0 - y4|, the level-4 error is at most 1.1x the
level-0 one in RMS (SQNR at most 0.83 dB lower, were the change aligned with the weight error),
and ~0.04 dB lower when it is uncorrelated with it, as rounding noise is (measured: MiniLM w4
21.6 dB, SQNR 11.888 -> 11.875 dB; tiny models 24-33 dB, -0.00..-0.03 dB). An exact model
(E = 0) keeps level 0 unless level 4 changes nothing. Without validation nothing is measured and
level 0 stays, and so it does, unmeasured, when the MatMulNBits nodes do under MIN_SHARE of
the model's multiply-adds (EfficientNet-Lite0's classifier: 0.3%; two sessions of the compiled
model cost more than level 4 can ever save). One decision per model: a layer whose activations int8 cannot carry (an outlier
channel setting its blocks' scale) keeps the whole model at level 0.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnxruntime.session import compile_threads, make_session
from qcompile.validate import output_names, reference_outputs

MARGIN_DB = 20.0
MIN_SHARE = 0.10  # below this share of the model's multiply-adds in MatMulNBits, level 4 cannot speed it up: not measured
LEVEL = 4  # the fast level: int8 activations (MLAS CompInt8)
SAMPLES = 64  # held-out samples measured: an energy ratio over whole outputs, not a per-sample statistic


def _nbits_nodes(model: ir.Model) -> list[ir.Node]:
    """MatMulNBits nodes at accuracy level 0 (subgraphs included)."""
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
            and getattr(n.attributes.get("accuracy_level"), "value", 0) == 0]


_REDUCING = ("Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulNBits", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "MatMulIntegerToFloat", "FusedMatMul")


def _macs(node: ir.Node) -> float | None:
    """Multiply-adds of one run of a reducing op: output elements x reduction length (a symbolic
    dim counts 1, the same for every layer of a model); None when a shape is unknown."""
    out = node.outputs[0].shape
    if out is None:
        return None
    n = math.prod(d if isinstance(d, int) else 1 for d in out)
    if node.op_type == "MatMulNBits":
        k = node.attributes["K"].as_int() if "K" in node.attributes else None
    elif node.op_type in ("Conv", "ConvTranspose", "QLinearConv"):
        w = node.inputs[3 if node.op_type == "QLinearConv" else 1].shape
        k = math.prod(d for d in w[1:]) if w is not None and all(isinstance(d, int) for d in w[1:]) else None
    else:
        x = node.inputs[0].shape
        k = x[-1] if x is not None and len(x) and isinstance(x[-1], int) else None
    return None if k is None else float(n * k)


def nbits_share(model: ir.Model) -> float | None:
    """The share of the model's multiply-adds its MatMulNBits nodes do (None: unknown shapes)."""
    total = nbits = 0.0
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.op_type in _REDUCING:
            m = _macs(n)
            if m is None:
                return None
            total += m
            nbits += m if n.op_type == "MatMulNBits" else 0.0
    return nbits / total if total else None


def _set_level(nodes: list[ir.Node], level: int) -> None:
    for n in nodes:
        n.attributes["accuracy_level"] = ir.Attr("accuracy_level", ir.AttributeType.INT, level)


def choose_accuracy_level(float_model: ir.Model | None, model: ir.Model, data, batch_size: int = 8,
                          reference: list | None = None, keep: dict | None = None) -> dict:
    """Set `model`'s level-0 MatMulNBits nodes to level 4 when that is measured negligible (module
    doc); returns the report entry: the level, why, and per output SQNR at both levels and the margin.
    `reference`: the float model's outputs per batch of `data` (`validate.reference_outputs`); on
    more than SAMPLES samples the first ceil(SAMPLES / batch_size) batches of it are used. Without
    it the float model runs on the first SAMPLES. One session exists at a time; when level 4 is
    kept its session goes to keep["session"] (for validation) if `keep` is given."""
    nodes = _nbits_nodes(model)
    entry = {"policy": "auto", "nodes": len(nodes), "margin_db": MARGIN_DB}
    if not nodes:
        return entry | {"level": None, "reason": "no MatMulNBits node"}
    if float_model is None or data is None:
        return entry | {"level": 0, "reason": "not measured (no validation): level 0, exact"}
    share = nbits_share(model)
    if share is not None and share < MIN_SHARE:
        return entry | {"level": 0, "reason": f"not measured: the MatMulNBits nodes do {100 * share:.1f}% of the "
                                              f"multiply-adds, level 4 cannot speed the model up (level 0, exact)"}
    names = output_names(float_model, model)
    if reference is None:
        data = data.take(0, SAMPLES)
        reference = reference_outputs(float_model, names, data, batch_size)
    elif len(data) > SAMPLES:
        k = -(-SAMPLES // batch_size)
        data, reference = data.take(0, min(len(data), k * batch_size)), reference[:k]
    runs = {}
    for level in (0, LEVEL):  # one compiled session at a time
        _set_level(nodes, level)
        sess = make_session(model, level="all", threads=compile_threads())
        runs[level] = [sess.run(names, batch) for batch in data.batches(batch_size)]
        if level != LEVEL:
            del sess
    _set_level(nodes, 0)
    sums = {name: np.zeros(4) for name in names}  # signal, level-0 error, level-4 error, level-4 change
    for refs, outs0, outs4 in zip(reference, runs[0], runs[LEVEL], strict=True):
        for name, f, y0, y4 in zip(names, refs, outs0, outs4):
            f, y0, y4 = (np.asarray(a, dtype=np.float64) for a in (f, y0, y4))
            sums[name] += [np.sum(f**2), np.sum((f - y0) ** 2), np.sum((f - y4) ** 2), np.sum((y0 - y4) ** 2)]
    outputs = {name: {"sqnr_level0_db": _db(s[0], s[1]), "sqnr_level4_db": _db(s[0], s[2]),
                      "weight_error_over_level4_change_db": _db(s[1], s[3])} for name, s in sums.items()}
    worst = min(outputs, key=lambda n: outputs[n]["weight_error_over_level4_change_db"], default=None)
    ok = all(s[3] <= s[1] * 10 ** (-MARGIN_DB / 10) for s in sums.values())
    if ok:
        _set_level(nodes, LEVEL)
        if keep is not None:
            keep["session"] = sess  # the model as it now is: validation runs it instead of building another
    del sess
    gap = outputs[worst]["weight_error_over_level4_change_db"] if worst else math.inf
    relation = ">=" if ok else "<"
    reason = (f"weight quantization error / level-4 change = {gap:.1f} dB on output {worst!r} (the worst), "
              f"{relation} the {MARGIN_DB:.0f} dB margin")
    return entry | {"level": LEVEL if ok else 0, "reason": reason, "outputs": outputs}


def _db(num: float, den: float) -> float:
    """10 log10(num / den), rounded; inf when den is 0."""
    if den == 0:
        return math.inf
    return round(10 * math.log10(max(num, 1e-300) / den), 3)
