"""Target name -> plan defaults and validation tolerance.

Reading one target top-down tells the whole story: which formats weights and activations get, at
which granularity, how scales are chosen, and which output SQNR the compiled model must keep. The
stage list every target runs is declared by `qcompile.stages.pipeline_for`; targets differ only in data.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompile.formats import BlockFormat, IntFormat, parse_format
from qcompile.plan import Method


@dataclass(frozen=True)
class WeightPolicy:
    """How constant weights are quantized.

    granularity: "tensor", "channel" (output channel) or "block" (along the reduction axis).
                 A block format (MX, NVFP4) is always blocked, with its own block size.
    method:      minmax (absmax) or mse (per-channel/per-block MSE-optimal clipping; for block formats the
                 block scale of least error around the spec's rule, `codec.quantize_block`).
    """

    format: str
    granularity: str = "channel"
    block_size: int = 32
    method: Method = Method.MINMAX

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))


@dataclass(frozen=True)
class ActivationPolicy:
    """How activations are quantized: per tensor with a calibrated range (scalar formats), or
    dynamically per block along the reduction axis (MX; NVFP4 with a calibrated tensor scale)."""

    format: str
    symmetric: bool = False
    method: Method = Method.MSE

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    weights: WeightPolicy
    activations: ActivationPolicy | None  # None: weight-only
    min_sqnr_db: float  # validation gate on every output; below it the compile fails (exit 3)
    quantize_conv_output: bool = False  # Q after Conv(+Relu) so onnxruntime builds QLinearConv
    quantize_bias: bool = False  # int32 bias with scale s_x*s_w for Conv/Gemm
    smooth: bool = False  # SmoothQuant with a per-layer alpha search before calibration
    bias_correction: bool = True  # add dW E[x] to Conv/Gemm biases (passes/bias_correction.py)
    ops: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # op types it quantizes
    quantize: bool = True  # False ("none"): the plan only locates the layers the transforms fold into
    candidates: tuple[str, ...] = ()  # "auto": the targets a layer may take (`qcompile.mixed`), float besides

    def formats(self):
        if self.candidates:
            return [f for c in self.candidates for f in get_target(c).formats()]
        out = [parse_format(self.weights.format)]
        if self.activations:
            out.append(parse_format(self.activations.format))
        return out

    @property
    def integer_activations(self) -> bool:
        return self.activations is not None and isinstance(parse_format(self.activations.format), IntFormat)


# Tolerances: output SQNR in dB on held-out data. They catch broken models (a wrong scale, a
# saturated layer: typically < 10 dB), not small regressions; per-model quality is measured by the
# bench and the tests. 8-bit integer keeps ~20-40 dB on real models, FP8 E4M3 ~25-31 dB (3 mantissa
# bits), E5M2 ~19-25 dB (2 mantissa bits), 4-bit weights ~15-20 dB.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "int8",
            "W8A8: per-channel symmetric int8 weights, per-tensor asymmetric 8-bit activations (MSE clipping), int32 bias",
            WeightPolicy("int8"),
            # An asymmetric 8-bit grid is stored as uint8: onnxruntime's u8 kernels run faster than its
            # s8 ones (MiniLM 0.43x vs 0.54x float, EfficientNet-Lite0 0.57x vs 0.84x on a VNNI CPU), and
            # u8 x u8 products (activation x activation MatMuls) are exact on every CPU (capabilities.py).
            ActivationPolicy("uint8"),
            min_sqnr_db=15.0,
            quantize_conv_output=True,
            quantize_bias=True,
            smooth=True,
        ),
        Target(
            "a16w8",
            "int8 per-channel weights, int16 per-tensor activations",
            WeightPolicy("int8"),
            ActivationPolicy("int16", method="minmax"),
            min_sqnr_db=20.0,
            quantize_conv_output=True,
            quantize_bias=True,
        ),
        Target("w8", "weight-only int8, per output channel", WeightPolicy("int8"), None, min_sqnr_db=20.0),
        # No quantization: the transforms alone (--rotate ...), written in float so a user can check
        # they are exact. Its plan is int8's, only to locate the layers; the gate catches a broken
        # rewrite (an exact one keeps ~120 dB: float32 rounding).
        Target("none", "no quantization: only the float-exact transforms (--rotate, --smooth), to check them",
               WeightPolicy("int8"), ActivationPolicy("uint8"), min_sqnr_db=80.0, bias_correction=False, quantize=False),
        Target(
            "w4",
            "weight-only int4 MatMul/Gemm weights, blocks of 32 along the reduction axis (MatMulNBits)",
            WeightPolicy("int4", granularity="block", method="mse"),
            None,
            min_sqnr_db=10.0,
            # Conv weights stay float: 4-bit per-channel depthwise/stem kernels break CNNs
            # (EfficientNet-Lite0: 1.8 dB output SQNR, and unfused DQ->Conv runs 3.6x slower).
            ops=("MatMul", "Gemm"),
        ),
        Target(
            "fp8",
            "FP8 E4M3FN weights (per channel) and activations (per tensor)",
            WeightPolicy("e4m3fn"),
            ActivationPolicy("e4m3fn", symmetric=True, method="mse"),
            min_sqnr_db=15.0,
        ),
        Target(
            "fp8-e5m2",
            "FP8 E5M2 weights (per channel) and activations (per tensor)",
            WeightPolicy("e5m2"),
            ActivationPolicy("e5m2", symmetric=True, method="mse"),
            min_sqnr_db=10.0,
        ),
        Target(
            "w4a8",
            "int4 weights in blocks of 32 (MatMulNBits) with FP8 E4M3 per-tensor activations",
            WeightPolicy("int4", granularity="block", method="mse"),
            ActivationPolicy("e4m3fn", symmetric=True, method="mse"),
            min_sqnr_db=8.0,
            ops=("MatMul", "Gemm"),  # as w4: 4-bit conv kernels break CNNs
        ),
        Target("int3", "weight-only int3 MatMul/Gemm weights, blocks of 32 (MSE scales)",
               WeightPolicy("int3", granularity="block", method="mse"), None, min_sqnr_db=5.0, ops=("MatMul", "Gemm")),
        Target("int2", "weight-only int2 MatMul/Gemm weights, blocks of 16 (MSE scales)",
               WeightPolicy("int2", granularity="block", block_size=16, method="mse"), None, min_sqnr_db=0.0,
               ops=("MatMul", "Gemm")),
        Target("fp4", "weight-only FP4 E2M1 weights, blocks of 32 along the reduction axis with float32 scales",
               WeightPolicy("e2m1", granularity="block", method="mse"), None, min_sqnr_db=8.0, ops=("MatMul", "Gemm")),
        Target("fp6", "weight-only FP6 E2M3 weights, blocks of 32 with float32 scales",
               WeightPolicy("e2m3", granularity="block", method="mse"), None, min_sqnr_db=12.0),
        Target("fp6-e3m2", "weight-only FP6 E3M2 weights, blocks of 32 with float32 scales",
               WeightPolicy("e3m2", granularity="block", method="mse"), None, min_sqnr_db=12.0),
        # OCP MX and NVFP4 simulate hardware whose GEMMs take both operands in the format: weights
        # and activations, activations scaled per block at run time (`w:mxfp4` is weight-only).
        Target("mxfp8", "OCP MXFP8 (E4M3 elements, E8M0 scale per 32) weights and activations",
               WeightPolicy("mxfp8_e4m3", method="mse"), ActivationPolicy("mxfp8_e4m3", True, "minmax"), min_sqnr_db=15.0),
        Target("mxfp6", "OCP MXFP6 (E2M3 elements, E8M0 scale per 32) weights and activations",
               WeightPolicy("mxfp6_e2m3", method="mse"), ActivationPolicy("mxfp6_e2m3", True, "minmax"), min_sqnr_db=12.0),
        Target("mxfp4", "OCP MXFP4 (E2M1 elements, E8M0 scale per 32) weights and activations",
               WeightPolicy("mxfp4", method="mse"), ActivationPolicy("mxfp4", True, "minmax"), min_sqnr_db=5.0),
        Target("mxint8", "OCP MXINT8 (int8 elements, E8M0 scale per 32) weights and activations",
               WeightPolicy("mxint8", method="mse"), ActivationPolicy("mxint8", True, "minmax"), min_sqnr_db=15.0),
        Target("nvfp4", "NVIDIA NVFP4 (E2M1, E4M3 scale per 16, fp32 tensor scale) weights and activations",
               WeightPolicy("nvfp4", method="mse"), ActivationPolicy("nvfp4", True, "minmax"), min_sqnr_db=5.0),
        # Mixed precision: a candidate per layer by the ILP of `qcompile.allocate` under the budgets
        # given (--budget-bits / --budget-mb), from measured sensitivities (`qcompile.mixed`). The
        # policies here only locate the layers before the allocation; the gate is the 4-bit one.
        Target("auto", "mixed precision: per layer the candidate (or float) of least measured output error "
               "within --budget-bits / --budget-mb (an ILP, solved to optimality)",
               WeightPolicy("int8"), ActivationPolicy("uint8"), min_sqnr_db=5.0,
               candidates=("int8", "fp8", "a16w8", "w4", "w:int4/128", "int3", "fp6", "w4a8", "mxfp4", "nvfp4")),
    ]
}


# Output-SQNR gate of a composed target by its narrowest format's bits (see the tolerance note above).
_GATE_BY_BITS = {2: 0.0, 3: 4.0, 4: 5.0, 5: 8.0, 6: 10.0, 7: 12.0}


def _bits(fmt) -> int:
    return (fmt.element if isinstance(fmt, BlockFormat) else fmt).bits


def compose(spec: str) -> Target:
    """A target from `w:FORMAT[/BLOCK][,a:FORMAT]` (e.g. `w:e3m4,a:e4m3`, `w:int4/128`, `w:mxfp4`,
    `w:int8/tensor,a:int8`).

    Weights: a block format keeps its own blocks; a scalar format is per output channel, per
    tensor (/tensor), or in blocks of BLOCK along the reduction axis, with MSE-searched scales below 8 bits (block formats: always,
    `codec.quantize_block`). Activations:
    a scalar format is per tensor, symmetric for float formats, calibrated with format-aware MSE;
    a block format is dynamic per block. Without `a:` the target is weight-only.
    """
    parts = {}
    for item in spec.split(","):
        key, sep, val = item.strip().partition(":")
        if not sep or key not in ("w", "a") or key in parts or not val:
            raise KeyError(f"target {spec!r}: expected w:FORMAT[/BLOCK][,a:FORMAT]")
        parts[key] = val.strip()
    if "w" not in parts:
        raise KeyError(f"target {spec!r}: the weight format (w:FORMAT) is required")
    wname, _, block = parts["w"].partition("/")
    wfmt = parse_format(wname)
    if block and (not (block.isdigit() or block == "tensor") or block == "0" or isinstance(wfmt, BlockFormat)):
        raise KeyError(f"target {spec!r}: /BLOCK must be a positive integer or 'tensor', for a scalar weight format")
    granularity = "tensor" if block == "tensor" else "block" if block else "channel"
    weights = WeightPolicy(wname, granularity, int(block) if block.isdigit() else 32,
                           "mse" if isinstance(wfmt, BlockFormat) or _bits(wfmt) < 8 else "minmax")
    acts = None
    if "a" in parts:
        afmt = parse_format(parts["a"])
        if isinstance(afmt, IntFormat) and not isinstance(wfmt, IntFormat):
            # onnxruntime fuses an INT activation Q/DQ next to a float weight into its integer kernels as if
            # the weight were INT: float8 weights fail to load (QLinearConv), folded ones lose 1e-2 (QGemm).
            raise KeyError(f"target {spec!r}: integer activations need integer weights (onnxruntime has no kernel "
                           f"for {parts['a']} activations with {wname} weights); try a:e4m3fn, or w:int8")
        if isinstance(afmt, BlockFormat):
            acts = ActivationPolicy(parts["a"], True, "minmax")
        else:
            symmetric = not isinstance(afmt, IntFormat) or afmt.bits < 8
            name = parts["a"]
            if isinstance(afmt, IntFormat) and afmt.bits == 8 and afmt.signed and not symmetric:
                name = "uint8"  # the same asymmetric grid, unsigned (see the int8 target)
            acts = ActivationPolicy(name, symmetric=symmetric, method="mse")
    narrow = min(_bits(f) for f in [wfmt] + ([parse_format(parts["a"])] if acts else []))
    return Target(spec, f"composed: weights {parts['w']}" + (f", activations {parts['a']}" if acts else " (weight-only)"),
                  weights, acts, min_sqnr_db=_GATE_BY_BITS.get(narrow, 15.0))


def get_target(name: str) -> Target:
    """A named target, or a composed one (`compose`) for names of the form w:...[,a:...]."""
    if name in TARGETS:
        return TARGETS[name]
    if name.startswith("w:"):
        return compose(name)
    raise KeyError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}, or w:FORMAT[/BLOCK][,a:FORMAT]")
