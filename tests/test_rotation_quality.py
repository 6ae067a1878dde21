"""Online rotation on real and decoder-shaped models (issue 11): exact in float under `--target none`,
and a gain on real MiniLM weights and sentences.

- Exactness (acceptance 1): MiniLM (real weights) and llama-tiny (a random-init Llama export: RMSNorm,
  rotary embeddings, SwiGLU), each rotation kind alone, under `--target none`: the float outputs within
  1e-5 of the original, relative to the output's largest magnitude, max over a held-out batch.
- Benefit (acceptance 2, measured at ENABLE_ALL by the compile's own validation; bench/rotation.py
  adds DISABLE_ALL and latency): MiniLM `int8` with the default rotation (block-diagonal Hadamard,
  block 128) gains >= 3 dB output SQNR over `int8` alone (SmoothQuant's search) and reaches >= 26 dB;
  `w4a8` with SmoothQuant then rotation gains >= 0.5 dB over w4a8 (rotation alone: ~0.4).
- Fused rotations (acceptance 4): llama-tiny (RMSNorm) takes R1 + R2 fused, R4 online; OPT (a
  LayerNorm stream, TorchScript and dynamo exports) is centered into RMSNorms first; MiniLM
  (post-LN) is refused with a reason.
- Choice (acceptance 5): `--rotate auto` is never worse than the better of none and hadamard by more
  than 0.2 dB on int8, w4a8, mxfp4 and nvfp4. The README's rotation table has the figures.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from quality import N_CALIB, N_EVAL
from quality import output_sqnr as _sqnr

import qcompile
from qcompile import zoo
from qcompile.backends.onnxruntime.session import make_session
from qcompile.data import InputInfo
from qcompile.stages import as_dataset

pytestmark = pytest.mark.slow

EXACT_REL = 1e-5  # acceptance 1: max |y' - y| / max |y|; float32 rounding of x R and R^T W gives ~1e-7
INT8_GAIN_DB, INT8_MIN_DB, W4A8_GAIN_DB = 3.0, 26.0, 0.5  # acceptance 2
AUTO_SLACK_DB = 0.2  # acceptance 5


def _max_rel_err(original: str, transformed: ir.Model, eval_npz: str) -> float:
    inputs = InputInfo.of_model(ir.load(original))
    ref_sess, got_sess = make_session(original, level="disable"), make_session(transformed, level="disable")
    worst = 0.0
    for batch in as_dataset(eval_npz, inputs).batches(8):
        for r, g in zip(ref_sess.run(None, batch), got_sess.run(None, batch)):
            r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
            if r.dtype.kind == "f" and r.size:
                worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)))
    return worst


@pytest.mark.parametrize("name,rotate,block,smooth", [
    (name, *case) for name in ("minilm", "llama-tiny")
    for case in [("hadamard", None, None), ("hadamard", 16, None), ("none", None, 0.5), ("random", None, 0.5)]
] + [("minilm", "hadamard", 384, None)])
def test_rotation_is_exact_under_target_none(name, rotate, block, smooth):
    """Each transform alone, and SmoothQuant (alpha 0.5) then a random rotation together (random
    signs alone are covered there and in the OPT and native tests). The
    default block 128 is emitted in the fast form (16 x 8); 384 on MiniLM is the whole width, the
    Paley-12 x Sylvester-32 Hadamard (24 x 16 fast form); at block 16 MiniLM's attention outputs
    take their rotation in the value projections (12 heads of 32)."""
    model = str(zoo.get_model(name))
    calib, eval_ = str(zoo.get_data(name, "calib", 16)), str(zoo.get_data(name, "eval", 16))
    r = qcompile.compile(model, "none", calib=calib, eval=eval_, rotate=rotate, rotate_block=block, smooth=smooth)
    assert bool(r.plan.rotations) == (rotate != "none") and bool(r.plan.smoothing) == (smooth is not None), name
    assert all(e["nodes"] for e in r.report["transforms"] if "rotation" in e), "every chosen rotation is applied"
    rot = [e for e in r.report["transforms"] if e["transform"] == "rotate" and "rotation" in e]
    if name == "minilm" and rotate == "hadamard":
        assert {e["rotation"]["block"] for e in rot} == {block or 128}
        assert all(e["rotation"].get("factor") for e in rot) == (block != 16), "blocks from 128 up: the fast form"
        in_values = [e for e in rot if e["folded_into_values"]]
        assert len(in_values) == (6 if block == 16 else 0) and all(not e["emitted"] for e in in_values)
    err = _max_rel_err(model, r.model, eval_)
    assert err <= EXACT_REL, f"{name} {rotate}@{block} smooth {smooth}: max relative error {err:.2e}"


def test_native_emission_is_exact_on_minilm(native_lib):
    """`--lowering native`: every online rotation is one qcompile.native BlockHadamard (Sylvester
    blocks, random signs as its second input), and the float function is unchanged."""
    model = str(zoo.get_model("minilm"))
    calib, eval_ = str(zoo.get_data("minilm", "calib", 16)), str(zoo.get_data("minilm", "eval", 16))
    r = qcompile.compile(model, "none", calib=calib, eval=eval_, rotate="random", lowering="native")
    ops = {n.name: n.op_type for n in r.model.graph}
    rot = [e for e in r.report["transforms"] if e["transform"] == "rotate" and "rotation" in e]
    assert len(rot) == 24 and all([ops[n] for n in e["emitted"]] == ["BlockHadamard"] for e in rot)
    assert all(not e["rotation"].get("factor") for e in rot), "Sylvester blocks, not the fast form"
    err = _max_rel_err(model, r.model, eval_)
    assert err <= EXACT_REL, f"native rotation: max relative error {err:.2e}"


@pytest.fixture(scope="module")
def opt_export(tmp_path_factory):
    """Foreign graphs: transformers' OPT (pre-LN LayerNorm decoder, biased linears, learned
    positions, an MLP of Gemms on rows flattened to 2-D, Shape reads of the stream, symbolic
    dims), random init, exported by the TorchScript exporter (dynamo=False) at opset 17 or by the
    dynamo exporter at opset 18 (weights in an external-data file, so every fold is lazy:
    `external.derived`); random token data. export(exporter) -> (model, calib, eval)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, ffn_dim=1024,
                                 num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=256,
                                 tie_word_embeddings=False, do_layer_norm_before=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = transformers.OPTForCausalLM(cfg).eval()
        with torch.no_grad():  # trained-like norms: gains and biases the folds must carry (init: ones, zeros)
            for mod in lm.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.2)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    done = {}

    def export(exporter: str):
        if exporter not in done:
            d = tmp_path_factory.mktemp(f"opt-{exporter}")
            ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
            axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}}
            # eval(): the TorchScript exporter restores the wrapper's training mode, and with it the model's
            torch.onnx.export(Logits().eval(), (ids, torch.ones_like(ids)), str(d / "opt.onnx"), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=17 if exporter == "torchscript" else 18,
                              dynamo=exporter == "dynamo")
            rng = np.random.default_rng(0)
            for split in ("calib", "eval"):
                tokens = rng.integers(0, 1024, (16, 24)).astype(np.int64)
                np.savez(d / f"{split}.npz", input_ids=tokens, attention_mask=np.ones_like(tokens))
            done[exporter] = str(d / "opt.onnx"), str(d / "calib.npz"), str(d / "eval.npz")
        return done[exporter]

    return export


@pytest.mark.parametrize("exporter,rotate,smooth", [("torchscript", "hadamard", None), ("dynamo", "random", 0.5)])
def test_fused_rotation_of_a_layernorm_stream_is_exact_on_opt_exports(opt_export, exporter, rotate, smooth):
    """Acceptance 1 and the issue's LayerNorm -> RMSNorm on graphs we did not shape: the stream
    (token + position tables, 4 biased writers: out_proj MatMul + Add, fc2 Gemm) is centered and
    its 5 LayerNorms become RMSNorms; then R1 over the whole width (9 readers: q, k, v, fc1 of 2
    layers and the head, with beta in their biases), R2 on both attention blocks; online
    rotation is left for the 2 fc2 inputs (R4) and the 2 out_proj inputs. Float outputs within
    1e-5 of the original, no LayerNormalization left."""
    model, calib, eval_ = opt_export(exporter)
    r = qcompile.compile(model, "none", calib=calib, eval=eval_, rotate=rotate, smooth=smooth)
    by = {k: [e for e in r.report["transforms"] if e["transform"] == k] for k in ("layernorm-to-rmsnorm", "fused-rotation", "rotate")}
    (ln,), (fused,) = by["layernorm-to-rmsnorm"], by["fused-rotation"]
    assert len(ln["norms"]) == 5 and len(ln["centered"]) == 6, ln
    assert fused["rotation"]["block"] == 256 and len(fused["sources"]) == 2 and len(fused["writers"]) == 4
    assert len(fused["readers"]) == 9 and len(fused["R2"]) == 2, fused
    online = [e for e in by["rotate"] if "rotation" in e]
    assert len(online) == 4 and not {n for e in online for n in e["nodes"]} & set(fused["readers"])
    assert not any(n.op_type == "LayerNormalization" for n in r.model.graph)
    err = _max_rel_err(model, r.model, eval_)
    assert err <= EXACT_REL, f"OPT ({exporter}) {rotate} smooth {smooth}: max relative error {err:.2e}"


def test_layernorm_to_rmsnorm_pass_contract_and_int8_on_opt(opt_export, tmp_path):
    """LayerNormToRMSNormPass obeys the pass contract (a second run finds RMSNorms and changes
    nothing) on the normalized OPT graph; the pass alone (no rotation) is exact; and the int8
    compile with the fused rotations loads in onnxruntime and passes its gate."""
    import helpers

    from qcompile.passes.layernorm_to_rmsnorm import LayerNormToRMSNormPass
    from qcompile.streams import find_streams

    model, calib, eval_ = opt_export("torchscript")
    qcompile.compile(model, "none", calib=calib, eval=eval_, dump_after=["FoldBatchNormPass"], dump_dir=str(tmp_path))
    m = ir.load(tmp_path / "after-FoldBatchNormPass.onnx")
    (s,), reasons = find_streams(m.graph)
    assert s.kinds == {"layer"} and not reasons
    p = LayerNormToRMSNormPass({s.gather.name})
    helpers.assert_pass_contract(p, m, expect_modified=True)
    assert find_streams(m.graph)[0][0].kinds == {"rms"}
    err = _max_rel_err(model, m, eval_)
    assert err <= EXACT_REL, f"LayerNorm -> RMSNorm alone: max relative error {err:.2e}"

    r = qcompile.compile(model, "int8", calib=calib, eval=eval_, rotate="hadamard")
    assert r.report["verdict"]["passed"] and any(e["transform"] == "layernorm-to-rmsnorm" for e in r.report["transforms"])


@pytest.fixture(scope="module")
def minilm_data():
    return (str(zoo.get_model("minilm")), str(zoo.get_data("minilm", "calib", N_CALIB)),
            str(zoo.get_data("minilm", "eval", N_EVAL)))


def test_rotation_gains_on_minilm_int8(minilm_data):
    base = _sqnr(minilm_data, "int8")
    rot = _sqnr(minilm_data, "int8", rotate="hadamard")
    print(f"MiniLM int8: {base:.2f} dB, with rotation {rot:.2f} dB")
    assert rot - base >= INT8_GAIN_DB and rot >= INT8_MIN_DB, (base, rot)


def test_native_fused_rotation_keeps_the_int8_gain(native_lib, minilm_data):
    """The fastest emission (`--lowering native`: BlockHadamardQuantize, +8% latency over
    unrotated int8 when written) meets acceptance 2's int8 floors like the standard-op one."""
    base = _sqnr(minilm_data, "int8")
    rot = _sqnr(minilm_data, "int8", rotate="hadamard", lowering="native")
    print(f"MiniLM int8: {base:.2f} dB, with the native fused rotation {rot:.2f} dB")
    assert rot - base >= INT8_GAIN_DB and rot >= INT8_MIN_DB, (base, rot)


def test_smoothing_then_rotation_gains_on_minilm_w4a8(minilm_data):
    """Rotation alone gains only ~0.4 dB on w4a8 (its int4 weights, not the activations, dominate
    the error). SmoothQuant's search first (w4a8 does not smooth by default), then the rotation of
    the smoothed activations, whose R^T spreads the weight rows smoothing scaled up: >= 0.5 dB over
    w4a8 (acceptance 2; +1.77 when written), and the rotation still adds on top of the smoothing
    (+0.32 when written; the floor 0.15 is half of it, the rest is the search's sampling noise)."""
    base = _sqnr(minilm_data, "w4a8")
    smooth = _sqnr(minilm_data, "w4a8", smooth="auto")
    both = _sqnr(minilm_data, "w4a8", smooth="auto", rotate="hadamard")
    print(f"MiniLM w4a8: {base:.2f} dB, smoothed {smooth:.2f}, smoothed and rotated {both:.2f}")
    assert both - base >= W4A8_GAIN_DB and both - smooth >= 0.15, (base, smooth, both)


# --- rotation choice (acceptance 5); in this module, so its none / hadamard compiles are shared -----
@pytest.mark.parametrize("target", ["int8", "w4a8", "mxfp4", "nvfp4"])
def test_rotate_auto_is_never_worse_than_the_better_of_none_and_hadamard(minilm_data, target):
    """Acceptance 5: per value, auto keeps a rotation only where it measures a smaller quantized
    output error on calibration rows; on nvfp4 (where every Hadamard block loses 1.2-1.9 dB) it
    must keep (almost) none, on int8 (+5 dB) (almost) all. On the 256 + 256 sentences of
    acceptance 2: with 64 + 64 the choice is noisier and auto fell 0.22-0.30 dB below the best
    fixed setting on int8, w4a8 and mxfp4 (when written; the 256 figures are in the README)."""
    none, had, auto = (_sqnr(minilm_data, target, **({"rotate": r} if r != "none" else {})) for r in ("none", "hadamard", "auto"))
    print(f"MiniLM {target}: none {none:.2f} dB, hadamard {had:.2f}, auto {auto:.2f}")
    assert auto >= max(none, had) - AUTO_SLACK_DB, (none, had, auto)


# --- fused residual-stream rotation (acceptance 4) -------------------------------------------------
def test_fused_r1_r2_on_llama_tiny_and_refused_on_minilm():
    """llama-tiny's pre-norm stream takes R1 over its whole width (512) and R2 on the 4 attention
    blocks' V/O; online rotation is left for the down projections' inputs (R4) and the o_proj
    inputs. The pass obeys the contract (a second run changes nothing). MiniLM (post-LN) is
    refused with a reason and keeps the online rotation."""
    import helpers

    from qcompile.passes.residual_rotate import FusedResidualRotationPass, find_streams
    from qcompile.rotation import Rotation

    name = "llama-tiny"
    model = str(zoo.get_model(name))
    calib, eval_ = str(zoo.get_data(name, "calib", 16)), str(zoo.get_data(name, "eval", 16))
    r = qcompile.compile(model, "none", calib=calib, eval=eval_, rotate="hadamard")
    fused = [e for e in r.report["transforms"] if e["transform"] == "fused-rotation"]
    assert len(fused) == 1 and fused[0]["rotation"]["block"] == 512 and len(fused[0]["R2"]) == 4
    assert all(e["head_dim"] == 64 for e in fused[0]["R2"])
    online = {e["value"]: e["nodes"] for e in r.report["transforms"] if e["transform"] == "rotate"}
    assert len(online) == 8, "4 down_proj inputs (R4) and 4 o_proj inputs"
    assert len(fused[0]["readers"]) == 4 * 5 + 1, "q, k, v, gate, up of 4 layers and the head read the rotated stream"
    assert not set(sum(online.values(), [])) & set(fused[0]["readers"]), "no online rotation where R1 already is"

    m = ir.load(model)
    streams, reasons = find_streams(m.graph)
    assert len(streams) == 1 and not reasons
    p = FusedResidualRotationPass({streams[0].gather.name: Rotation(512, 512, "random", 3)}, {streams[0].gather.name})
    helpers.assert_pass_contract(p, m, expect_modified=True)

    mini = qcompile.compile(str(zoo.get_model("minilm")), "none", calib=str(zoo.get_data("minilm", "calib", 16)),
                            eval=str(zoo.get_data("minilm", "eval", 16)), rotate="hadamard")
    refused = [e for e in mini.report["transforms"] if e["transform"] == "fused-rotation"]
    assert refused and all(not e["applied"] and e["reason"] for e in refused) and mini.plan.rotations


@pytest.mark.parametrize("target", ["mxfp4", "nvfp4"])
def test_llama_tiny_w4a4_with_fused_rotations_validates(target):
    """W4A4 block FP4 with R1 + R2 fused and R4 online: the graph loads in onnxruntime and passes
    the target's gate (random-init weights have no outlier channels, so no gain is expected:
    mxfp4 6.57 -> 6.54, nvfp4 8.52 -> 8.35 dB when written)."""
    name = "llama-tiny"
    r = qcompile.compile(str(zoo.get_model(name)), target, calib=str(zoo.get_data(name, "calib", 16)),
                         eval=str(zoo.get_data(name, "eval", 16)), rotate="hadamard")
    assert r.report["verdict"]["passed"]
    kinds = {e["transform"] for e in r.report["transforms"]}
    assert {"fused-rotation", "rotate"} <= kinds
