"""Quantization plans as data.

A `QuantPlan` says, for every quantized node, how each of its float inputs (and optionally its
output) is quantized: a `QuantSpec` = format + granularity + symmetry + scale method, plus the
calibrated clipping range for activations. Analysis and calibration *produce* plans; the Q/DQ
insertion and lowering passes *consume* them. Plans serialize to versioned JSON so a user can save
one, edit one layer and replay it (`--save-plan` / `--plan`).
"""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from qcompile.errors import InputError
from qcompile.formats import parse_format

SCHEMA = "qcompile.plan/1"
Role = Literal["weight", "activation"]


class StrEnum(str, enum.Enum):
    """An enum whose members are their names as strings: equal to them, hashed as them (so
    interchangeable in sets and dict keys), written as them in JSON and by str()."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:
        return hash(self.value)


class Method(StrEnum):
    """How a scale is chosen: the range (min/max), a percentile of |x|, TensorRT's entropy
    threshold, or the clip of least squared error on the format's own grid."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


METHODS = tuple(m.value for m in Method)


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor."""

    def to_json(self) -> dict:
        return {"kind": "tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of `axis` (e.g. output channel of a weight)."""

    axis: int

    def to_json(self) -> dict:
        return {"kind": "channel", "axis": self.axis}


@dataclass(frozen=True)
class PerBlock:
    """One scale per `size` consecutive elements along `axis` (ONNX opset-21 blocked Q/DQ)."""

    axis: int
    size: int

    def to_json(self) -> dict:
        return {"kind": "block", "axis": self.axis, "size": self.size}


Granularity = Union[PerTensor, PerChannel, PerBlock]


@dataclass(frozen=True)
class PairBound:
    """A constraint of the integer kernel that will run a weight (see `weights.pair_sums`).

    The kernel reads the reduction axis in pairs (2i, 2i+1) and adds the two u8 x s8 products in
    int16 with saturation; with activation codes up to 255 no pair can saturate when, for every
    output channel, |q_2i + q_2i+1| <= bound for the pairs whose codes have the same sign.
    axis: the reduction axis of the weight. A Conv weight [Cout, Cin/g, k...] (axis 1) is reduced
    over (k..., Cin/g) flattened with the channel innermost, so pairs run across kernel taps when
    Cin/g is odd. None: the kernel's pairing is unknown, so every two codes of a channel count as
    a pair (the two largest of each sign must fit).
    """

    axis: int | None
    bound: int

    def to_json(self) -> dict:
        return {"axis": self.axis, "bound": self.bound}


def granularity_from_json(d: dict) -> Granularity:
    kind = d.get("kind")
    if kind == "tensor":
        return PerTensor()
    if kind == "channel":
        return PerChannel(int(d["axis"]))
    if kind == "block":
        return PerBlock(int(d["axis"]), int(d["size"]))
    raise InputError(f"plan: unknown granularity kind {kind!r} (tensor, channel, block)")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    format:      a name `qcompile.formats.parse_format` accepts (`int8`, `e4m3fn`, ...).
    symmetric:   zero point 0 (always true for float formats).
    method:      scale selection: minmax | percentile | entropy | mse (format-aware MSE clipping).
    clip:        calibrated (lo, hi) range of an activation; None until calibrated.
    pairs:       a weight's integer-kernel pair bound (`PairBound`), None when unconstrained.
    """

    format: str
    granularity: Granularity = PerTensor()
    symmetric: bool = True
    method: Method = Method.MINMAX
    clip: tuple[float, float] | None = None
    pairs: PairBound | None = None

    def __post_init__(self) -> None:
        # the format object, parsed once (the name is what JSON holds); KeyError lists the known names
        object.__setattr__(self, "_fmt", parse_format(self.format))
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise InputError(f"plan: unknown scale method {self.method!r} (one of {', '.join(METHODS)})") from None

    @property
    def fmt(self):
        return self._fmt

    @property
    def dynamic(self) -> bool:
        """Scales computed at run time from the data (an OCP MX activation): nothing to calibrate."""
        fmt = self.fmt
        return getattr(fmt, "kind", "") == "block" and fmt.tensor_scale is None

    def to_json(self) -> dict:
        d = {
            "format": self.format,
            "granularity": self.granularity.to_json(),
            "symmetric": self.symmetric,
            "method": self.method.value,
        }
        if self.clip is not None:
            d["clip"] = [float(self.clip[0]), float(self.clip[1])]
        if self.pairs is not None:
            d["pairs"] = self.pairs.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> QuantSpec:
        clip, pairs = d.get("clip"), d.get("pairs")
        return cls(
            format=d["format"],
            granularity=granularity_from_json(d.get("granularity", {"kind": "tensor"})),
            symmetric=bool(d.get("symmetric", True)),
            method=d.get("method", "minmax"),
            clip=None if clip is None else (float(clip[0]), float(clip[1])),
            pairs=None if pairs is None else PairBound(None if pairs.get("axis") is None else int(pairs["axis"]),
                                                       int(pairs["bound"])),
        )


@dataclass(frozen=True)
class InputQuant:
    """A quantized input of a node: which value, in which role, with which spec."""

    value: str
    role: Role
    spec: QuantSpec

    def to_json(self) -> dict:
        return {"value": self.value, "role": self.role, **self.spec.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> InputQuant:
        role = d.get("role")
        if role not in ("weight", "activation"):
            raise InputError(f"plan: input role must be 'weight' or 'activation', got {role!r}")
        return cls(value=d["value"], role=role, spec=QuantSpec.from_json(d))


@dataclass(frozen=True)
class NodePlan:
    """The quantization of one node.

    inputs: input index -> InputQuant.
    output: quantize the node's output (after a fused Relu/Clip when `output_value` names it), so
            onnxruntime can run the node as a full integer kernel (QLinearConv). None = float out.
    bias:   quantize the bias input as int32 with scale s_x * s_w (Conv/Gemm with int formats).
    """

    op_type: str
    inputs: dict[int, InputQuant] = field(default_factory=dict)
    output: InputQuant | None = None
    bias: bool = False

    def to_json(self) -> dict:
        d: dict = {"op_type": self.op_type, "inputs": {str(i): q.to_json() for i, q in sorted(self.inputs.items())}}
        if self.output is not None:
            d["output"] = self.output.to_json()
        if self.bias:
            d["bias"] = "int32"
        return d

    @classmethod
    def from_json(cls, d: dict) -> NodePlan:
        return cls(
            op_type=d["op_type"],
            inputs={int(i): InputQuant.from_json(q) for i, q in d.get("inputs", {}).items()},
            output=InputQuant.from_json(d["output"]) if d.get("output") else None,
            bias=d.get("bias") == "int32",
        )


@dataclass(frozen=True)
class QuantPlan:
    """Node name -> NodePlan, plus the target it was made for.

    equalization: producer node -> per-channel cross-layer equalization scales s (W1[i] /= s_i,
    W2[:, i] *= s_i, `passes.equalize`), first of the transforms.
    fused_rotations: embedding Gather node -> {"rotation": R as JSON, "heads": bool}: the residual
    stream it starts carries h R (QuaRot R1, with R2 on the attention heads when "heads";
    `passes.residual_rotate`), applied next.
    smoothing: activation value -> per-channel SmoothQuant scales s (X W = (X/s)(sW)), applied next.
    rotations: activation value (as the smoothed graph names it) -> the orthogonal rotation R
    (`rotation.Rotation` as JSON) applied online before its consumers (X W = (X R)(R^T W),
    `passes.rotate`; the rotated value is named `passes.rotate.rotated_name`), last, before
    calibration. allocation: target "auto"'s measured candidate table, budgets and ILP solution
    (the chosen candidate per layer), so `qcompile allocate` re-solves from the plan alone. Node entries name the values of the *untransformed* graph, so a saved plan
    replays on the original model.
    """

    target: str
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    smoothing: dict[str, list[float]] = field(default_factory=dict)
    rotations: dict[str, dict] = field(default_factory=dict)
    equalization: dict[str, list[float]] = field(default_factory=dict)
    fused_rotations: dict[str, dict] = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)  # target "auto": {"table", "budgets", "solution"} (`qcompile.mixed`)

    def __len__(self) -> int:
        return len(self.nodes)

    def activation_specs(self) -> dict[str, QuantSpec]:
        """Every quantized activation value (inputs and outputs) -> its spec (one spec per value)."""
        out: dict[str, QuantSpec] = {}
        for node in self.nodes.values():
            quants = list(node.inputs.values()) + ([node.output] if node.output else [])
            for q in quants:
                if q.role == "activation":
                    out.setdefault(q.value, q.spec)
        return out

    def with_clips(self, clips: dict[str, tuple[float, float]]) -> QuantPlan:
        """A copy whose activation specs without a clip get the calibrated one."""

        def fill(q: InputQuant | None) -> InputQuant | None:
            if q is None or q.role != "activation" or q.spec.clip is not None or q.value not in clips:
                return q
            return dataclasses.replace(q, spec=dataclasses.replace(q.spec, clip=clips[q.value]))

        nodes = {
            name: NodePlan(n.op_type, {i: fill(q) for i, q in n.inputs.items()}, fill(n.output), n.bias)
            for name, n in self.nodes.items()
        }
        return dataclasses.replace(self, nodes=nodes)

    def with_specs_of(self, other: QuantPlan) -> QuantPlan:
        """A copy keeping this plan's value names but taking every spec from `other` (same nodes)."""

        def take(q: InputQuant | None, o: InputQuant | None) -> InputQuant | None:
            return q if q is None or o is None else dataclasses.replace(q, spec=o.spec)

        nodes = {}
        for name, n in self.nodes.items():
            o = other.nodes.get(name, n)
            nodes[name] = NodePlan(n.op_type, {i: take(q, o.inputs.get(i)) for i, q in n.inputs.items()},
                                   take(n.output, o.output), n.bias)
        return dataclasses.replace(self, nodes=nodes)

    def to_json(self) -> dict:
        d = {"schema": SCHEMA, "target": self.target, "nodes": {k: v.to_json() for k, v in self.nodes.items()}}
        if self.rotations:
            d["rotations"] = {k: dict(v) for k, v in self.rotations.items()}
        if self.smoothing:
            d["smoothing"] = {k: [float(x) for x in v] for k, v in self.smoothing.items()}
        if self.equalization:
            d["equalization"] = {k: [float(x) for x in v] for k, v in self.equalization.items()}
        if self.fused_rotations:
            d["fused_rotations"] = {k: dict(v) for k, v in self.fused_rotations.items()}
        if self.allocation:
            d["allocation"] = self.allocation
        return d

    @classmethod
    def from_json(cls, d: dict) -> QuantPlan:
        if d.get("schema") != SCHEMA:
            raise InputError(f"plan: schema {d.get('schema')!r} is not {SCHEMA!r}")
        try:
            return cls(target=d["target"], nodes={k: NodePlan.from_json(v) for k, v in d["nodes"].items()},
                       smoothing={k: [float(x) for x in v] for k, v in d.get("smoothing", {}).items()},
                       rotations={k: dict(v) for k, v in d.get("rotations", {}).items()},
                       equalization={k: [float(x) for x in v] for k, v in d.get("equalization", {}).items()},
                       fused_rotations={k: dict(v) for k, v in d.get("fused_rotations", {}).items()},
                       allocation=dict(d.get("allocation", {})))
        except KeyError as e:
            raise InputError(f"plan: missing or unknown key {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"plan {path}: {e}") from None
