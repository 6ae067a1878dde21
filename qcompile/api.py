"""Library entry points besides `compile`."""
from __future__ import annotations

import os

import onnx
import onnx_ir as ir

from qcompile.data import InputInfo
from qcompile.pipeline import _as_dataset, load_model
from qcompile.validate import compare, verdict


def validate(float_model: str | os.PathLike | ir.Model | onnx.ModelProto,
             compiled: str | os.PathLike | ir.Model | onnx.ModelProto,
             eval, min_sqnr: float | None = None, batch_size: int = 8) -> dict:
    """Compare a compiled model against its float model on `eval` data (ENABLE_ALL sessions).

    Returns {"outputs": per-output metrics, "verdict": {...}} (verdict only when min_sqnr is given).
    """
    f, c = load_model(float_model), load_model(compiled)
    data = _as_dataset(eval, InputInfo.of_model(f))
    out = {"outputs": compare(f, c, data, batch_size)}
    if min_sqnr is not None:
        out["verdict"] = verdict(out["outputs"], min_sqnr)
    return out
