"""The sensitivity sweep of target "auto": (layer, candidate) -> the output noise / signal with
only that layer quantized as that candidate (`restore.Simulator.noise`), on an executor.

- "serial": in this process;
- "process" (default): a pool of spawned workers (not forked: onnxruntime's thread pools do not
  survive a fork), each building its Simulator once from the state it is handed at start; in
  this process when the first simulation predicts a sweep under SERIAL_SECONDS, or when the main
  module cannot be re-run (a script read from stdin);
- "ray": Ray tasks on a local `ray.init` or the cluster of RAY_ADDRESS (`pip install
  qcompile[ray]`); the state (the model's bytes, the calibrated plans, the bias-correction means
  and the calibration batches) is put once in Ray's object store and every task reads it from
  there, each worker process keeping its Simulator between tasks.

A task is (candidate, a batch of its layers). Every simulation is a single-threaded
onnxruntime session on the same samples, so every executor gives the same numbers. Results are
cached on disk, a file per candidate under a key of everything its noises depend on (`_key`):
a sweep that stops is resumed, finished tasks are not run again, and a new candidate is the only
one measured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile import __version__, restore
from qcompile.plan import QuantPlan

log = logging.getLogger(__name__)
EXECUTORS = ("serial", "process", "ray")
SERIAL_SECONDS = 15.0  # "process" runs in this process when the first simulation predicts a shorter sweep

_SIM: dict = {}  # per process (a worker, or this one): state key -> (Simulator, candidate plans)


def _simulator(state: bytes, key: str) -> restore.Simulator:
    if key not in _SIM:
        model, plans, means, batches, batch_size, caps = pickle.loads(state)
        snap = ir.from_proto(onnx.load_from_string(model))
        _SIM.clear()
        _SIM[key] = (restore.Simulator(snap, QuantPlan.from_json(next(iter(plans.values()))), means, batches,
                                       batch_size, caps), {c: QuantPlan.from_json(p) for c, p in plans.items()})
    return _SIM[key]


def _run_task(state: bytes, key: str, cand: str, layers: list[str], samples: int) -> dict[str, float]:
    sim, plans = _simulator(state, key)
    sim.plan = plans[cand]
    return {n: sim.noise([n], samples) for n in layers}


_STATE: tuple | None = None  # a pool worker's state, set once by its initializer


def _init_worker(state: bytes, key: str) -> None:
    global _STATE
    _STATE = (state, key)


def _pool_task(cand: str, layers: list[str], samples: int) -> tuple[str, dict[str, float]]:
    return cand, _run_task(*_STATE, cand, layers, samples)


def _spawnable() -> bool:
    """A spawned worker re-runs the main module's file: impossible when it is stdin ("<stdin>");
    `python -c`, a REPL or a notebook have none to re-run, and spawn fine."""
    return not str(getattr(sys.modules.get("__main__"), "__file__", "") or "").startswith("<")


def _key(model_bytes: bytes, plans: dict, means, batches, samples: int) -> str:
    """What the noises depend on: the model, the calibrated plans, the means, the samples, the
    qcompile and onnxruntime versions."""
    import onnxruntime

    h = hashlib.sha256()
    h.update(model_bytes)
    h.update(json.dumps(plans, sort_keys=True).encode())
    for name in sorted(means or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(means[name]).tobytes())
    for b in batches:
        for name in sorted(b):
            h.update(name.encode())
            h.update(np.ascontiguousarray(b[name]).tobytes())
    h.update(f"{samples}|{__version__}|{onnxruntime.__version__}".encode())
    return h.hexdigest()[:24]


def _means_of(plan: QuantPlan, means: dict | None) -> dict | None:
    """The bias-correction means a plan's simulations read: those of its nodes' inputs."""
    if means is None:
        return None
    values = {q.value for n in plan.nodes.values() for q in n.inputs.values()}
    return {v: m for v, m in means.items() if v in values}


def cache_dir() -> Path:
    env = os.environ.get("QCOMPILE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "qcompile") / "sensitivity"


def sweep(snapshot: ir.Model, plans: dict[str, QuantPlan], means: dict | None, batches: list[dict], batch_size: int,
          caps, samples: int, executor: str = "process", workers: int | None = None, cache: bool = True) -> dict[tuple[str, str], float]:
    """(layer, candidate) -> noise for every layer each plan quantizes; see the module doc."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    model_bytes = ir.to_proto(snapshot).SerializeToString()
    plans_json = {c: p.to_json() for c, p in plans.items()}
    key = _key(model_bytes, plans_json, means, batches, samples)  # the workers' state
    paths = {c: cache_dir() / f"{_key(model_bytes, {c: plans_json[c]}, _means_of(plans[c], means), batches, samples)}.json"
             for c in plans}  # one file per candidate: adding a candidate re-measures only it
    done: dict[str, float] = {}
    for c, path in paths.items():
        if cache and path.exists():
            done.update({f"{n}\t{c}": v for n, v in json.loads(path.read_text()).items()})
    todo = {c: [n for n in p.nodes if f"{n}\t{c}" not in done] for c, p in plans.items()}
    todo = {c: ls for c, ls in todo.items() if ls}
    if todo:
        cores = os.cpu_count() or 1
        workers = workers or (min(2, cores) if executor == "ray" else cores)  # a local Ray: 2 CPUs, as CI runs it
        n_tasks = max(1, workers * 2)
        per = max(1, math.ceil(sum(len(v) for v in todo.values()) / n_tasks))
        tasks = [(c, ls[i:i + per]) for c, ls in todo.items() for i in range(0, len(ls), per)]
        state = pickle.dumps((model_bytes, plans_json, means, batches, batch_size, caps))
        log.info("sensitivity sweep: %d simulations in %d tasks on %s (%d workers)",
                 sum(len(ls) for _, ls in tasks), len(tasks), executor, workers)

        def record(cand: str, noises: dict[str, float]) -> None:
            done.update({f"{n}\t{cand}": v for n, v in noises.items()})
            if cache:
                path = paths[cand]
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({k.split("\t")[0]: v for k, v in done.items() if k.endswith(f"\t{cand}")}))
                os.replace(tmp, path)
            log.info("sensitivity sweep: %d of %d simulations done", len(done), sum(len(p.nodes) for p in plans.values()))

        if executor != "ray" and key not in _SIM:  # in this process: from the snapshot itself, not a copy from the bytes
            _SIM.clear()
            _SIM[key] = (restore.Simulator(snapshot, next(iter(plans.values())), means, batches, batch_size, caps), plans)
        if executor == "process" and (workers == 1 or not _spawnable()):
            executor = "serial"
        if executor == "process":  # worth a pool only when the sweep outlasts the workers' start (~2-4 s each)
            c, ls = tasks[0]
            t0 = time.perf_counter()
            record(c, _run_task(state, key, c, ls[:1], samples))
            tasks[0] = (c, ls[1:])
            if (time.perf_counter() - t0) * sum(len(t[1]) for t in tasks) < SERIAL_SECONDS:
                executor = "serial"
        tasks = [t for t in tasks if t[1]]
        if executor == "serial":
            for c, ls in tasks:
                record(c, _run_task(state, key, c, ls, samples))
        elif executor == "process":
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(state, key)) as pool:
                for f in as_completed([pool.submit(_pool_task, c, ls, samples) for c, ls in tasks]):
                    record(*f.result())
        else:
            _ray_sweep(state, key, tasks, samples, workers, record)
    _SIM.clear()  # this process's copy of the model, if the sweep ran here
    return {(n, c): done[f"{n}\t{c}"] for c, p in plans.items() for n in p.nodes}


def _ray_sweep(state: bytes, key: str, tasks, samples: int, workers: int, record) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install 'qcompile[ray]'") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"num_cpus": workers}), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    remote = ray.remote(num_cpus=1)(_run_task)
    ref = ray.put(state)  # once, in the object store: every task reads it from there
    futures = {remote.remote(ref, key, c, ls, samples): c for c, ls in tasks}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for f in ready:
            record(futures[f], ray.get(f))
