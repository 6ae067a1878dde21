"""onnxruntime CPU backend: capability table, sessions, lowering."""
from qcompile.backends.onnxruntime.capabilities import CAPABILITIES, Capabilities

__all__ = ["CAPABILITIES", "Capabilities"]
