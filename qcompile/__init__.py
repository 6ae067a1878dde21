"""qcompile: an ONNX quantization compiler.

    import qcompile
    result = qcompile.compile("model.onnx", target="int8", calib="calib.npz")
    qcompile.save_model(result.model, "model.int8.onnx")
    print(result.report["outputs"])
"""
__version__ = "0.1.0"

from qcompile.errors import InputError, QCompileError, UnsupportedModelError, ValidationFailed  # noqa: E402
from qcompile.formats import FORMATS, parse_format  # noqa: E402
from qcompile.plan import QuantPlan, QuantSpec  # noqa: E402
from qcompile.targets import TARGETS  # noqa: E402
from qcompile.pipeline import CompileResult, compile, load_model, save_model  # noqa: E402
from qcompile.api import explain, lower, validate  # noqa: E402

__all__ = [
    "compile", "validate", "lower", "explain", "CompileResult", "load_model", "save_model", "FORMATS", "parse_format", "TARGETS",
    "QuantPlan", "QuantSpec", "QCompileError", "InputError", "UnsupportedModelError", "ValidationFailed",
]
