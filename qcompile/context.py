"""What a compile knows: its settings (fixed before the first stage) and its context (filled in by
the stages, read by the ones after). Passed explicitly to every stage (`qcompile.stages`); passes
themselves never see it: they take their settings in `__init__` and write what they learn on the
model (node and model metadata), which a stage then reads into the context.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.analyze import PlanOptions
from qcompile.backends.onnxruntime.kernels import Lowering
from qcompile.cpu import Cpu
from qcompile.data import Dataset, InputInfo
from qcompile.plan import QuantPlan
from qcompile.targets import Target
from qcompile.weights import WeightCache


ROTATE_MODES = ("none", "hadamard", "random", "auto")


@dataclass(frozen=True)
class Allocation:
    """A mixed-precision allocation (target "auto", `qcompile.mixed`): the budgets it must fit --
    the layers' average stored bits per weight (scales included), the model's stored weights in
    MB, its latency as a ratio of float's, any combination --, the candidate targets (None: the target's; float is always one), and where
    the sensitivity sweep runs (`qcompile.sweep.EXECUTORS`)."""

    bits: float | None = None
    mb: float | None = None
    latency: float | None = None  # a ratio of the float model's latency (`qcompile.latency`)
    candidates: tuple[str, ...] | None = None
    executor: str = "process"
    method: str = "ilp"  # or "greedy": the AIMET-style baseline (`allocate.greedy`), for comparisons


@dataclass(frozen=True)
class Transforms:
    """The float-exact transforms a compile folds in before quantizing (the user's control).

    rotate:       "none", or an online rotation (`passes.rotate`) of every activation whose
                  consumers all fold it: "hadamard" (block-diagonal Walsh-Hadamard) or "random"
                  (the same after random signs drawn from the compile's seed), or "auto": per
                  activation, none or the Hadamard block of least quantized output error, measured
                  on calibration rows with the target's quantizers (`passes.rotate.choose_rotations`)
    rotate_block: the Hadamard block (a power of two; "auto" tries every block up to it); None: the activation format's block for
                  block formats (32 MX, 16 NVFP4), else `rotation.DEFAULT_BLOCK`; each value takes the
                  largest power of two dividing its width up to this
    smooth:       SmoothQuant (`passes.smooth_quant`), before the rotations: None: the target's
                  default (int8 searches), "auto": the per-activation search on any target, "off",
                  or a float ALPHA: the paper's rule s_j = max|X_j|^ALPHA / max|W_j|^(1 - ALPHA)
                  for every smoothable activation, unsearched
    cle:          cross-layer equalization (`passes.equalize`) of Conv/MatMul chains, first of all
    """

    rotate: str = "none"
    rotate_block: int | None = None
    smooth: str | float | None = None
    cle: bool = False

    def smooths(self, target_default: bool) -> bool:
        return self.smooth != "off" and (self.smooth is not None or target_default)

    def to_json(self) -> dict:
        return {"rotate": self.rotate, "rotate_block": self.rotate_block, "smooth": self.smooth, "cle": self.cle}


@dataclass(frozen=True)
class Settings:
    """Everything `qcompile.compile` was asked for, validated and resolved (see its docstring)."""

    target: Target
    options: PlanOptions
    deploy: Cpu  # the resolved deployment CPU class
    lowering: Lowering = Lowering.AUTO
    accuracy_level: int | str = "auto"
    validate: bool = True
    min_sqnr: float | None = None
    samples: int | None = None
    seed: int = 0
    batch_size: int = 8
    caps: object = None  # the backend's Capabilities
    input_shapes: dict | None = None
    probe: bool = True  # offer restore's sensitivity measurement when the result misses its gate
    dump_after: tuple[str, ...] = ()  # stage names after which the model is written to dump_dir
    dump_dir: str | os.PathLike | None = None
    transforms: Transforms = field(default_factory=lambda: Transforms())
    allocation: Allocation = field(default_factory=lambda: Allocation())

    @property
    def gate_db(self) -> float:
        return self.target.min_sqnr_db if self.min_sqnr is None else self.min_sqnr


@dataclass
class CompileContext:
    """The state of one compile. Stages read and write these fields; the runner adds `entries`."""

    settings: Settings
    source: object  # what the caller passed as the model (a path, a ModelProto, an ir.Model)
    calib_arg: object = None
    eval_arg: object = None
    plan_arg: QuantPlan | None = None
    progress: Callable | None = None

    model: ir.Model | None = None
    inputs: list[InputInfo] = field(default_factory=list)
    calib: Dataset | None = None
    eval: Dataset | None = None
    synthesized: bool = False
    opset: int = 13
    conversion: dict | None = None  # {from, to, max_abs_err, max_rel_err, samples} when the opset was raised
    float_proto: object = None  # the float model validation compares against (after the exact folds)

    plan: QuantPlan | None = None  # the plan to save: names the float graph's values
    session: object = None  # a session of ctx.model as it is, left by accuracy-level for validate
    work: QuantPlan | None = None  # the same plan naming the graph as it is now (after smoothing)
    replay: bool = False
    kept: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (op type, why it stays float)
    smoothing: dict = field(default_factory=dict)
    means: dict | None = None  # per-channel input means for bias correction
    weights: WeightCache = field(default_factory=WeightCache)  # each weight's scale search runs once
    snapshot: ir.Model | None = None  # the float model restore's simulations start from
    activation_sqnr: dict[str, float] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # the report's per-layer rows
    reference: object = None  # the float model's outputs on the held-out data
    float_model: ir.Model | None = None
    report: dict = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)  # one per stage run: name, seconds, modified

    @property
    def source_path(self) -> str | None:
        return str(self.source) if isinstance(self.source, (str, os.PathLike)) else None
