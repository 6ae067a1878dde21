"""Target name -> plan defaults and validation tolerance.

Reading one target top-down tells the whole story: which formats weights and activations get, at
which granularity, how scales are chosen, and which output SQNR the compiled model must keep. The
pass list every target runs is in `qcompile.pipeline.compile_model`; targets differ only in data.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompile.formats import IntFormat, parse_format


@dataclass(frozen=True)
class WeightPolicy:
    """How constant weights are quantized.

    granularity: "tensor", "channel" (output channel) or "block" (along the reduction axis).
    method:      minmax (absmax) or mse (per-channel/per-block MSE-optimal clipping).
    """

    format: str
    granularity: str = "channel"
    block_size: int = 32
    method: str = "minmax"


@dataclass(frozen=True)
class ActivationPolicy:
    """How activations (per tensor, calibrated) are quantized."""

    format: str
    symmetric: bool = False
    method: str = "mse"


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
    bias_correction: bool = False  # add dW E[x] to the biases (passes/bias_correction.py)
    ops: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # op types it quantizes

    def formats(self):
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
            "W8A8: per-channel symmetric int8 weights, per-tensor int8 activations (MSE clipping), int32 bias",
            WeightPolicy("int8"),
            ActivationPolicy("int8"),
            min_sqnr_db=15.0,
            quantize_conv_output=True,
            quantize_bias=True,
            smooth=True,
            bias_correction=True,
        ),
        Target(
            "a16w8",
            "int8 per-channel weights, int16 per-tensor activations",
            WeightPolicy("int8"),
            ActivationPolicy("int16", method="minmax"),
            min_sqnr_db=20.0,
            quantize_conv_output=True,
            quantize_bias=True,
            bias_correction=True,
        ),
        Target("w8", "weight-only int8, per output channel", WeightPolicy("int8"), None, min_sqnr_db=20.0,
               bias_correction=True),
        Target(
            "w4",
            "weight-only int4 MatMul/Gemm weights, blocks of 32 along the reduction axis (MatMulNBits)",
            WeightPolicy("int4", granularity="block", method="mse"),
            None,
            min_sqnr_db=10.0,
            bias_correction=True,
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
            bias_correction=True,
        ),
        Target(
            "fp8-e5m2",
            "FP8 E5M2 weights (per channel) and activations (per tensor)",
            WeightPolicy("e5m2"),
            ActivationPolicy("e5m2", symmetric=True, method="mse"),
            min_sqnr_db=10.0,
            bias_correction=True,
        ),
    ]
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None
