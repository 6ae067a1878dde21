"""NativeFakeQuantPass: the activation quantizers left as qcompile function ops run natively.

With `--lowering native`, LowerToMatMulNBitsPass already folds the MXFP4/NVFP4 quantizer of each
weight MatMul's input into MatMulFp4. The others (both inputs of attention's activation MatMuls,
and every block-format activation of mxfp8/mxfp6/mxint8 targets) stay FakeQuantMX/FakeQuantNVFP4
function ops: ~150 standard ops each. This pass moves them to the native library's ops of the same
name, attributes and inputs (domain qcompile.native), which compute the same values bit for bit:

    qcompile.FakeQuantMX(x) <attrs>             -> qcompile.native.FakeQuantMX(x) <attrs>
    qcompile.FakeQuantNVFP4(x, s_t) <attrs>     -> qcompile.native.FakeQuantNVFP4(x, s_t) <attrs>

and drops the function definitions no node uses any more.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile import functions, native


class NativeFakeQuantPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.moved = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == functions.DOMAIN and node.op_type in native.FAKE_QUANT_OPS:
                node.domain = native.DOMAIN
                self.moved += 1
        if self.moved:
            model.opset_imports.setdefault(native.DOMAIN, native.VERSION)
            functions.attach(model)
        return ir.passes.PassResult(model, modified=bool(self.moved))
