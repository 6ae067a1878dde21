"""Backends: capability facts and lowering for the runtimes qcompile emits for.

A backend is a module with (onnxruntime's: `qcompile.backends.onnxruntime.backend`):

    NAME                                   its name
    capabilities                           facts only (`Capabilities`: Q/DQ types, fusions, limits), each tested
    session(model, level, threads)         a session on an in-memory or saved model
    lowering_passes(lowering, level, caps) the passes that take a Q/DQ model to what it runs
    KERNELS, choose(layer, lowering)       its one lowering policy: an ordered table of kernels,
                                           each with `applies(layer) -> reason | None`

Core modules (formats, codec, plan, targets, passes) import no backend; they take a backend's
`Capabilities` as a parameter.
"""
