"""Typed exceptions of the library. The CLI maps them to exit codes; the library never exits."""
from __future__ import annotations

import onnx_ir as ir


class QCompileError(Exception):
    """Base class: a one-line, user-facing reason."""

    exit_code = 1


class InputError(QCompileError):
    """The model, data or plan given by the user cannot be used."""


class UnsupportedModelError(QCompileError):
    """The model is valid ONNX but there is nothing the target can do with it."""


class PreconditionError(QCompileError, ir.passes.PreconditionError):
    """A pass cannot run on this model (its `requires` failed). Also an onnx_ir PreconditionError,
    so the pass manager re-raises it as is instead of wrapping away the reason."""


class ValidationFailed(QCompileError):
    """The compiled model is below the target's tolerance; carries the report."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None, result=None) -> None:
        super().__init__(message)
        self.report = report
        self.result = result  # the CompileResult, so a caller can still inspect (or save) the model
