"""Passes over onnx_ir models, one per file."""
