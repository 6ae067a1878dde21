"""onnxruntime as a qcompile backend: its capability facts, its sessions, its lowering stages.

The protocol (`qcompile.backends`' docstring) is what the pipeline needs of a runtime; this module
is its first implementation. The lowering stages run on a Q/DQ model alone (everything they need is
in the graph: `qcompile.stored`, node metadata), so `qcompile lower` can run them on a saved one.
"""
from __future__ import annotations

from qcompile.backends.onnxruntime.capabilities import CAPABILITIES
from qcompile.backends.onnxruntime.kernels import KERNELS, LOWERINGS, choose
from qcompile.backends.onnxruntime.lower_native import NativeFakeQuantPass, NativeRotationQuantizePass
from qcompile.backends.onnxruntime.lower_nbits import LowerToMatMulNBitsPass
from qcompile.backends.onnxruntime.lowering import LowerForOnnxruntimePass
from qcompile.backends.onnxruntime.session import make_session

NAME = "onnxruntime"
capabilities = CAPABILITIES
session = make_session


def lowering_passes(lowering: str = "auto", accuracy_level: int = 0, caps=CAPABILITIES) -> list:
    """The backend passes, in order, that turn a Q/DQ model into what onnxruntime runs."""
    passes = [LowerForOnnxruntimePass(caps), LowerToMatMulNBitsPass(lowering, accuracy_level, caps)]
    if lowering == "native":
        passes += [NativeFakeQuantPass(), NativeRotationQuantizePass()]
    return passes


__all__ = ["NAME", "KERNELS", "LOWERINGS", "capabilities", "choose", "lowering_passes", "session"]
