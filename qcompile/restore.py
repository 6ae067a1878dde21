"""Keep the few most sensitive layers in float when the compiled model misses its gate.

Some networks concentrate their sensitivity in a handful of small layers. On EfficientNet-Lite0
the stem and the first depthwise/projection convolutions (0.1 % of the weights) decide the
output: their filters are high-pass (weights summing to ~0) on smooth, large inputs, so the
output they pass on is a small difference of large terms, and the BatchNorm folded into them
scales it up. With only the first depthwise conv's weights in FP8 E4M3 (33.6 dB weight SQNR)
the logits are at 6.5 dB; with every layer in FP8, 4.4 dB; with the five most sensitive in
float, 15.4 dB. Every tool of the field has a fallback for this: HAWQ keeps the first and last
layers out of its allocation, Intel Neural Compressor's accuracy-driven tuning and AIMET's
AutoQuant return layers to float until an accuracy criterion holds.

Here the criterion is the target's own gate, and the choice is measured, on (up to `SAMPLES`)
calibration samples -- never the held-out data the verdict is computed on:

1. Sensitivity of layer i: e_i = noise / signal of the worst model output with *only* layer i
   quantized (its weights, activations and bias correction exactly as planned), against the
   float model (`Simulator`: the plan's Q/DQ on the float model, before lowering), on the first
   RANKING_SAMPLES samples (a ranking; one simulation per layer).
2. Layers go back to float most sensitive first, each step simulated with all the others
   quantized (errors of neighbouring layers compound, so a sum of the e_i under-predicts: on
   EfficientNet-Lite0 FP8 it promised 16 dB with the three largest restored, the compile gave
   9.9 dB; the five largest gave 15.4), until the simulated output reaches the gate + MARGIN_DB, within
   `budget` (share of the quantized weights' float bytes) and MAX_LAYER_SHARE of the layers;
   no restore when the budget runs out first.

The compile then runs again with those layers in float (their biases uncorrected, their weights
exact) and is validated on the held-out data as any other; if it still misses, the goal rises by
the held-out shortfall for one more round.
"""
from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnxruntime.capabilities import Capabilities
from qcompile.backends.onnxruntime.lowering import LowerForOnnxruntimePass
from qcompile.backends.onnxruntime.session import make_session
from qcompile.data import Dataset
from qcompile.passes.bias_correction import BiasCorrectionPass
from qcompile.passes.insert_qdq import InsertQDQPass
from qcompile.plan import QuantPlan
from qcompile.validate import output_names
from qcompile.weights import WeightCache

log = logging.getLogger(__name__)
SAMPLES = 16  # calibration samples a simulation runs on
RANKING_SAMPLES = 8  # of which the single-layer ones (a ranking, run once per layer) use the first
MARGIN_DB = 1.0  # calibration -> held-out: the prediction aims this far above the gate
MAX_LAYER_SHARE = 0.25  # never restore more than this share of the quantized layers
MAX_ROUNDS = 2  # recompiles after the first one
MAX_WEIGHT_BYTES = 256 << 20  # the snapshot keeps the float weights alive through the compile: bounded
# to small models, where one simulation per layer is also cheap
BUDGET = 0.05  # default share of the quantized weights (float bytes) that may be restored


def snapshot(model: ir.Model) -> ir.Model:
    """A copy of `model` the simulations clone: O(nodes), the tensors shared (no pass changes a
    tensor in place). onnx_ir clones only topologically sorted graphs; a graph some pass left out
    of order (the float32 Casts of a half model's inputs go last) is sorted in the copy."""
    try:
        return model.clone()
    except RuntimeError:
        copy = ir.from_proto(ir.to_proto(model))
        copy.graph.sort()
        return copy


class Simulator:
    """Output noise of `snapshot` (the float model the plan names, before bias correction) with a
    subset of the plan's layers quantized -- their Q/DQ inserted and their biases corrected with
    `means`, as the compile does -- against the float model, on up to SAMPLES samples of `data`
    (a Dataset, or its batches as a list)."""

    def __init__(self, snapshot: ir.Model, plan: QuantPlan, means: dict[str, np.ndarray] | None, data: Dataset,
                 batch_size: int, caps: Capabilities) -> None:
        self.snapshot, self.plan, self.means, self.caps = snapshot, plan, means, caps
        self.batch_size = batch_size
        self.batches = data if isinstance(data, list) else list(data.take(0, min(SAMPLES, len(data))).batches(batch_size))
        self.samples = sum(len(next(iter(b.values()))) for b in self.batches)
        self.names = output_names(snapshot, snapshot)
        sess = make_session(snapshot, level="all")
        self.refs = [[np.asarray(r) for r in sess.run(self.names, b)] for b in self.batches]
        self.runs = 0
        self.quantized = WeightCache(keep=True)  # each weight's codes computed once for all simulations

    def noise(self, layers, samples: int | None = None) -> float:
        """max over outputs of sum (ref - out)^2 / sum ref^2 with `layers` quantized, on the first
        `samples` (default: all) of the simulator's samples."""
        sub = dataclasses.replace(self.plan, nodes={n: self.plan.nodes[n] for n in layers})
        sim = self.snapshot.clone()
        if self.means:
            BiasCorrectionPass(sub, self.means, self.quantized)(sim)
        InsertQDQPass(sub, self.caps, self.quantized)(sim)
        LowerForOnnxruntimePass(self.caps)(sim)
        sess = make_session(sim, level="all")
        self.runs += 1
        sig, err = np.zeros(len(self.names)), np.zeros(len(self.names))
        for b, refs in zip(self.batches[:self._batches_for(samples)], self.refs):
            for k, (r, o) in enumerate(zip(refs, sess.run(self.names, b))):
                r64 = np.asarray(r, np.float64)
                sig[k] += float(np.sum(r64**2))
                err[k] += float(np.sum((r64 - np.asarray(o, np.float64)) ** 2))
        ratios = [e / s if s > 0 else (0.0 if e == 0 else float("inf")) for s, e in zip(sig, err)]
        return max(ratios, default=0.0)

    def _batches_for(self, samples: int | None) -> int:
        """How many leading batches hold the first `samples` samples (at least one)."""
        return len(self.batches) if samples is None else max(1, -(-samples // self.batch_size))


@dataclass(frozen=True)
class Sensitivity:
    """Per quantized layer: its output noise ratio alone (e_i) and its weights' float bytes."""

    noise: dict[str, float]
    float_bytes: dict[str, int]

    def alone_sqnr_db(self, node: str) -> float:
        return _db(self.noise[node])


def _db(noise: float) -> float:
    return float("inf") if noise <= 0 else round(float(-10 * np.log10(noise)), 3)


def measure(sim: Simulator, float_bytes: dict[str, int]) -> Sensitivity:
    """e_i for every layer of the simulator's plan: only layer i quantized."""
    noise = {n: sim.noise([n], RANKING_SAMPLES) for n in sim.plan.nodes}
    for n, e in noise.items():
        log.debug("sensitivity %s: %.2f dB alone", n, _db(e))
    return Sensitivity(noise, {n: float_bytes.get(n, 0) for n in sim.plan.nodes})


def choose(sim: Simulator, sens: Sensitivity, goal_db: float, budget: float,
           already: tuple[str, ...] = ()) -> tuple[list[str], float] | None:
    """Restore layers most sensitive first (a superset of `already`) until the simulated output
    with the rest quantized reaches `goal_db`; returns them and that simulated SQNR, or None when
    the budget (share of float weight bytes, at most MAX_LAYER_SHARE of the layers) runs out."""
    ranked = sorted(sens.noise, key=lambda n: -sens.noise[n])
    all_bytes = sum(sens.float_bytes.values()) or 1
    cap = max(1, int(len(ranked) * MAX_LAYER_SHARE))
    chosen, used = list(already), sum(sens.float_bytes[n] for n in already)
    goal = 10 ** (-goal_db / 10)
    for n in ranked:
        if n in chosen or len(chosen) >= cap or (used + sens.float_bytes[n]) / all_bytes > budget:
            continue
        chosen.append(n)
        used += sens.float_bytes[n]
        noise = sim.noise([m for m in ranked if m not in chosen])
        log.debug("restore %d layers (%s): %.2f dB simulated", len(chosen), n, _db(noise))
        if noise <= goal:
            return chosen, _db(noise)
    return None
