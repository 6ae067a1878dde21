"""The one lowering policy: which onnxruntime kernel computes each quantized MatMul/Gemm.

An ordered table; the first kernel whose `applies(layer)` returns None (no objection) takes the
layer, and every kernel before it says why not. `choose` is the only place the decision is made:
`LowerToMatMulNBitsPass` emits what it returns and records the decision on the node (metadata
`qcompile.kernel`: JSON {"kernel", "rejected": {kernel: reason}}), `qcompile explain` prints it,
the report's layer table shows it.

    kernel                       lowerings          applies when
    onnxruntime QDQ fusion       every              the activation arrives through a DequantizeLinear (int8/uint8,
                                                    or int16 which runs as float): left to onnxruntime's QDQ
                                                    handling (QLinearMatMul / MatMulInteger fusions for 8 bits)
    qcompile.native.MatMulFp4    native             E2M1 weights in E8M0/E4M3 blocks along K (`native.check_weight`)
    qcompile.native.MatMulF8     native             E4M3FN/E5M2 weights, a scale per column (`native.check_weight_f8`)
    com.microsoft.MatMulNBits    integer/auto/native exact base-16 digit planes (`nbits.unsupported`); auto and
                                                    native take at most `caps.nbits_auto_max_planes` planes
                                                    (`..._gemv` for one row per sample)
    decoder + MatMul             every              always: the weight's DequantizeLinear / qcompile.Dequantize*
                                                    op stays, onnxruntime folds it to a float constant at load
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from qcompile import native
from qcompile.backends.onnxruntime import nbits
from qcompile.plan import StrEnum
from qcompile.storage import PackedTensor

KERNEL_KEY = "qcompile.kernel"  # node metadata: the policy's decision for this layer (JSON)


class Lowering(StrEnum):
    """`--lowering`: which kernels the policy may choose (see the table above)."""

    AUTO = "auto"
    FUNCTION = "function"
    INTEGER = "integer"
    NATIVE = "native"


LOWERINGS = tuple(m.value for m in Lowering)


@dataclass(frozen=True)
class Layer:
    """What the policy reads of one MatMul/Gemm: the node, its weight's stored form in [K, N]
    orientation (None: the weight is not a decodable constant), and the backend's capabilities."""

    node: ir.Node
    weight: PackedTensor | None
    caps: object

    @property
    def activation(self) -> ir.Value | None:
        return self.node.inputs[0] if self.node.inputs else None

    @property
    def gemv(self) -> bool:
        x = self.activation
        return x is not None and x.shape is not None and len(x.shape) == 2


@dataclass(frozen=True)
class Kernel:
    name: str
    lowerings: frozenset[str]
    applies: Callable[[Layer], str | None]  # None: this kernel takes the layer; else why not
    emits: bool = True  # False: the layer is left as it is (fused by onnxruntime, or decoded at load)


def _integer_qdq(layer: Layer) -> str | None:
    x = layer.activation
    p = x.producer() if x is not None else None
    if p is not None and p.op_type == "DequantizeLinear" and p.domain == "":
        return None
    return "activation is not read through a DequantizeLinear"


def _checked(check: Callable[[PackedTensor], object]) -> Callable[[Layer], str | None]:
    def applies(layer: Layer) -> str | None:
        if layer.weight is None:
            return "no decodable constant weight"
        try:
            check(layer.weight)
        except ValueError as e:
            return str(e)
        return None

    return applies


def _matmulnbits(layer: Layer) -> str | None:
    if layer.weight is None:
        return "no decodable constant weight"
    return nbits.unsupported(layer.node, layer.weight)


def _plane_limit(layer: Layer) -> str | None:
    reason = _matmulnbits(layer)
    if reason is not None:
        return reason
    limit = layer.caps.nbits_auto_max_planes_gemv if layer.gemv else layer.caps.nbits_auto_max_planes
    planes = nbits.plane_count(layer.weight)
    return None if planes <= limit else f"{planes} digit planes (at most {limit} here are not slower than float)"


KERNELS: tuple[Kernel, ...] = (
    Kernel("onnxruntime QDQ fusion", frozenset(LOWERINGS), _integer_qdq, emits=False),
    Kernel("qcompile.native.MatMulFp4", frozenset({"native"}), _checked(native.check_weight)),
    Kernel("qcompile.native.MatMulF8", frozenset({"native"}), _checked(native.check_weight_f8)),
    Kernel("com.microsoft.MatMulNBits", frozenset({"integer"}), _matmulnbits),
    Kernel("com.microsoft.MatMulNBits", frozenset({"auto", "native"}), _plane_limit),
    Kernel("decoder + MatMul", frozenset(LOWERINGS), lambda layer: None, emits=False),
)


@dataclass(frozen=True)
class Decision:
    kernel: Kernel
    rejected: dict[str, str]  # kernel name -> why it did not take the layer (kernels tried before)

    def to_json(self) -> dict:
        return {"kernel": self.kernel.name, "rejected": self.rejected}


def choose(layer: Layer, lowering: str) -> Decision:
    """The first kernel of KERNELS allowed by `lowering` that applies to `layer`."""
    try:
        lowering = Lowering(lowering)
    except ValueError:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}") from None
    rejected: dict[str, str] = {}
    for k in KERNELS:
        if lowering not in k.lowerings:
            continue
        reason = k.applies(layer)
        if reason is None:
            return Decision(k, rejected)
        rejected.setdefault(k.name, reason)
    raise AssertionError("the last kernel applies to every layer")


def record(node: ir.Node, decision: Decision) -> None:
    node.metadata_props[KERNEL_KEY] = json.dumps(decision.to_json())


def recorded(node: ir.Node) -> dict | None:
    text = node.metadata_props.get(KERNEL_KEY)
    return json.loads(text) if text else None
