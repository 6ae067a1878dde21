"""Statistics of a model's values on data, streamed out of one backend session per pass.

`stream_values` instruments the float graph once (the values become extra outputs, threaded out of
If / Loop / Scan bodies) and yields one batch of values at a time; the summaries that consume the
stream keep bounded memory (`calibrate.Histogram`, `smooth_quant.channel_stats`,
`bias_correction.channel_means`). This module is the only place the compile's statistics touch a
session.
"""
from __future__ import annotations

import functools

from qcompile.calibrate import Histogram


def stream_values(model, names: list[str], batches):
    """Yield {name: array} for each batch: the float model with `names` exposed as outputs.

    The model is instrumented once (the values become extra graph outputs, threaded out of If /
    Loop / Scan bodies by `subgraphs.expose`, and removed again right after the session is built)
    and runs in one onnxruntime session at ENABLE_BASIC, so no fusion hides a value. The session
    computes the next batch while the consumer reads the current one (`_ahead`; its idle workers
    sleep instead of spinning, so they leave the consumer a core): at most two batches of values
    are alive. A value inside a body is empty for a sample that does not run it, stacked over
    iterations for a Loop / Scan.
    """
    from qcompile import external
    from qcompile.backends.onnxruntime.session import compile_threads, make_session
    from qcompile.subgraphs import expose

    with expose(model, names) as outputs:  # a session file referring to the weights' files in place
        sess = make_session(model, level="basic", prepack=external.prepack(model), threads=compile_threads(), spin=False)
    run = functools.partial(sess.run, [outputs[h] for h in names])
    try:
        for batch, values in _ahead(run, batches):
            yield batch, dict(zip(names, values))
    finally:
        del sess, run
        release_memory()


def _ahead(run, batches):
    """(batch, run(batch)) for each batch, the next batch's run started before the current one is
    yielded: the session computes (without the GIL) while the consumer summarises the previous
    values, so the two overlap instead of taking turns. At most two batches of values are alive."""
    from concurrent.futures import ThreadPoolExecutor

    it = iter(batches)
    with ThreadPoolExecutor(1) as pool:
        batch = next(it, None)
        pending = None if batch is None else pool.submit(run, batch)
        while pending is not None:
            values = pending.result()
            current, batch = batch, next(it, None)
            pending = None if batch is None else pool.submit(run, batch)
            yield current, values


def release_memory() -> None:
    """Hand the heap pages a finished session freed back to the OS (glibc keeps them otherwise, and
    the next session's allocations then add to the process's peak RSS instead of reusing them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def histogrammed(stream, hists: dict[str, Histogram], progress=None):
    """`stream` passed on, each batch's values first added to their histograms in `hists` (so one
    pass can feed histograms and other summaries at once)."""
    for batch, values in stream:
        for name, h in hists.items():
            h.update(values[name])
        if progress is not None:
            progress(next(iter(batch.values())).shape[0])
        yield batch, values


def collect(model, heads: list[str], batches, progress=None) -> dict[str, Histogram]:
    """Histograms of the named values over all batches (bounded memory, see `calibrate.Histogram`)."""
    hists = {h: Histogram() for h in heads}
    for _ in histogrammed(stream_values(model, heads, batches), hists, progress):
        pass
    return hists
