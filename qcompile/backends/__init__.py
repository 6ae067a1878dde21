"""Backends: capability facts and lowering for the runtimes qcompile emits for."""
