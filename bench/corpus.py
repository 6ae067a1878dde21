"""The foreign-model corpus: onnx's backend test models x qcompile targets (issue 9, acceptance 4).

    python bench/corpus.py [--suites node,light,...] [--targets int8,fp8,...] [--jobs 1]
                           [--timeout 120] [--only GLOB] [--json corpus.json]

Every model of `onnx/backend/test/data` (light/, simple/, pytorch-converted/, pytorch-operator/ as
the wheel ships them; node/, which the wheel does not ship, generated once from the wheel's own
node test cases into $QCOMPILE_CACHE/onnx-node-data/<onnx version>/) is compiled with
`qcompile.compile` for each target, calibrated and validated on its own test inputs
(test_data_set_0/input_*.pb; light/ models have none: seeded uniform [0, 1) inputs of their
declared shapes, as onnx's runner makes them). Each case is classified:

- ok:        compiled; the output, saved and reloaded from its file, loads and runs at ENABLE_ALL and
             its worst output SQNR against onnxruntime's float run of the source is >= the
             target's tolerance;
- below:     compiled and ran, but below the tolerance (a bug: validation should have refused);
- refused:   a `QCompileError` with a one-line message (grouped by reason in the summary);
- bug:       a traceback (any other exception), a multi-line refusal, an output that does not load
             or run, a crash or a timeout of the child process.

Cases run in child processes (`--jobs` of them), one model (all its targets) per task, so a crash
or a hang costs only that model. Models without a quantizable op are still compiled: qcompile
refuses them in its first analysis, before any pass runs, which keeps the sweep fast.
Prints counts per target and writes every case to the JSON file.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("node", "light", "simple", "pytorch-converted", "pytorch-operator")
TARGETS = ("int8", "fp8", "w4", "mxfp4", "nvfp4")


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    model: str  # path of model.onnx
    inputs: tuple[str, ...] = ()  # input_k.pb paths, in graph-input order

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}"


@dataclass
class Outcome:
    case: str
    target: str
    status: str  # ok | below | refused | bug
    reason: str = ""  # refusal message, or the bug's kind and first line
    sqnr_db: float | None = None
    seconds: float = 0.0
    detail: str = field(default="", repr=False)  # traceback tail of a bug


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")).resolve()


# --- the corpus ---------------------------------------------------------------------------------

def _write_input(path: Path, value, vi: onnx.ValueInfoProto) -> None:
    """One test input as onnx's cmd_tools writes it (tensor, sequence, optional or map proto)."""
    from onnx import numpy_helper

    t = vi.type
    if t.HasField("sequence_type"):
        proto = numpy_helper.from_list(value, vi.name)
    elif t.HasField("optional_type"):
        proto = numpy_helper.from_optional(value, vi.name)
    elif t.HasField("map_type"):
        proto = numpy_helper.from_dict(value, vi.name)
    elif isinstance(value, onnx.TensorProto):
        proto = value
    else:
        proto = numpy_helper.from_array(np.asarray(value), vi.name)
    path.write_bytes(proto.SerializeToString())


def _write_node_cases(cases, root: Path) -> None:
    for c in cases:
        d = root / c.name
        (d / "test_data_set_0").mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(c.model.SerializeToString())
        inputs, outputs = c.data_sets[0] if c.data_sets else ([], [])
        for j, value in enumerate(inputs):
            _write_input(d / "test_data_set_0" / f"input_{j}.pb", value, c.model.graph.input[j])
        for j, value in enumerate(outputs):
            _write_input(d / "test_data_set_0" / f"output_{j}.pb", value, c.model.graph.output[j])


def node_data() -> Path:
    """node/ generated from the installed onnx's node test cases (the wheel ships none), once."""
    root = cache_dir() / "onnx-node-data" / onnx.__version__
    if (root / "COMPLETE").exists():
        return root
    import shutil
    import warnings

    from onnx.backend.test.case import node

    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    _write_node_cases(cases, tmp)
    (tmp / "COMPLETE").write_text(f"{len(cases)} node cases of onnx {onnx.__version__}\n")
    if root.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(root)
    return root


def node_sample(modules: list[str], root: Path) -> list[Case]:
    """The node cases of a few of onnx's case modules (`matmul`, `if_`, ...), written under `root`:
    importing a module runs its exporters, much cheaper than collecting all 1,900 cases."""
    import importlib
    import warnings

    from onnx.backend.test.case import node

    before = len(node._NodeTestCases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in modules:
            importlib.import_module(f"onnx.backend.test.case.node.{m}")
    new = node._NodeTestCases[before:]
    _write_node_cases(new, root)
    return [c for c in _dir_cases("node", root) if c.name in {n.name for n in new}]


def light_inputs(model: Path) -> tuple[str, ...]:
    """Seeded uniform [0, 1) inputs of the declared shapes for a light/ model (free dims 1), as
    onnx's runner makes them (`Runner.generate_dummy_data(random=True)`), written once."""
    from onnx.backend.test.runner import Runner

    out = cache_dir() / "onnx-light-inputs" / onnx.__version__ / model.stem
    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    paths = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        p = out / f"input_{len(paths)}.pb"
        if not p.exists():
            out.mkdir(parents=True, exist_ok=True)
            a = Runner.generate_dummy_data(vi, seed=len(paths), random=True)
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            tmp.write_bytes(onnx.numpy_helper.from_array(a, vi.name).SerializeToString())
            tmp.rename(p)
        paths.append(str(p))
    return tuple(paths)


def _dir_cases(suite: str, root: Path) -> list[Case]:
    out = []
    for d in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        inputs = sorted((d / "test_data_set_0").glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        out.append(Case(suite, d.name, str(d / "model.onnx"), tuple(str(p) for p in inputs)))
    return out


def corpus(suites=SUITES) -> list[Case]:
    """Every model of the chosen suites, sorted by suite then name."""
    cases = []
    for s in suites:
        if s == "node":
            cases += _dir_cases(s, node_data())
        elif s == "light":
            cases += [Case(s, p.stem, str(p), light_inputs(p)) for p in sorted((DATA / s).glob("*.onnx"))]
        else:
            cases += _dir_cases(s, DATA / s)
    return cases


# --- one case -----------------------------------------------------------------------------------

def read_outputs(case: Case) -> list[np.ndarray] | None:
    """The test's expected outputs (output_k.pb next to its inputs), when they are plain tensors."""
    if not case.inputs or case.suite == "light":  # light/ outputs belong to onnx's own dummy inputs
        return None
    d = Path(case.inputs[0]).parent
    outs = []
    for p in sorted(d.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1])):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(p.read_bytes())
            outs.append(onnx.numpy_helper.to_array(t))
        except Exception:  # noqa: BLE001 - not a TensorProto
            return None
    return outs or None


def read_inputs(case: Case) -> dict[str, np.ndarray] | None:
    """{graph input name: array} of the case's test inputs, or None when one is not a plain tensor
    (sequences, optionals, maps: the compile then synthesizes data and decides)."""
    m = onnx.load(case.model, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [vi.name for vi in m.graph.input if vi.name not in inits]
    feeds = {}
    for name, path in zip(names, case.inputs):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(Path(path).read_bytes())
            feeds[name] = onnx.numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001 - not a TensorProto: a sequence / optional / map input
            return None
    return feeds if len(feeds) == len(names) else None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    noise = float(np.sum((ref64 - out64) ** 2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(float(np.sum(ref64**2)), 1e-300) / noise))


def run_compiled(source: str, compiled: str, feeds: dict | None, expected: list | None = None) -> float | None:
    """Load the saved compiled model from its file at ENABLE_ALL (1 thread) and run it on the test
    inputs; the worst SQNR over float outputs against onnxruntime's float run of the source, or the
    test's `expected` outputs when onnxruntime cannot run the source (None when there are no inputs
    to run or no float output to compare). Raises when it does not load or run."""
    import onnxruntime as ort

    from qcompile.backends.onnxruntime.session import session_options

    def run(path: str) -> list:
        sess = ort.InferenceSession(path, session_options("all", 1), providers=["CPUExecutionProvider"])
        if feeds is None:
            return []
        if not any(a.dtype == ml_dtypes.bfloat16 for a in feeds.values()):
            return sess.run(None, feeds)
        # onnxruntime's Python API takes no bfloat16 arrays: feed OrtValues; bfloat16 outputs have
        # no numpy type there either and are only checked to be produced
        vals = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), onnx.TensorProto.BFLOAT16)
                if a.dtype == ml_dtypes.bfloat16 else ort.OrtValue.ortvalue_from_numpy(a) for k, a in feeds.items()}
        outs = sess.run_with_ort_values([o.name for o in sess.get_outputs()], vals)
        return [o.numpy() if o.data_type() != "tensor(bfloat16)" else None for o in outs]

    outs = run(compiled)
    if feeds is None:
        return None
    try:
        ref = run(source)
    except Exception:  # noqa: BLE001 - onnxruntime cannot run the source (a bfloat16 Mul...): the test's own outputs
        ref = expected or []
    vals = [sqnr_db(r, o) for r, o in zip(ref, outs)
            if isinstance(r, np.ndarray) and r.dtype.kind == "f" and np.all(np.isfinite(r))]
    return min(vals) if vals else None


def run_case(case: Case, target: str, workdir: str) -> Outcome:
    import qcompile
    from qcompile.errors import QCompileError, ValidationFailed
    from qcompile.targets import get_target

    t0 = time.perf_counter()
    out = Outcome(case.id, target, "bug")
    try:
        feeds = read_inputs(case)
        data = {k: v[None] for k, v in feeds.items()} if feeds else None  # one whole sample per input
        try:
            result = qcompile.compile(case.model, target, calib=data, eval=data)
        except ValidationFailed as e:
            out.status, out.reason = "refused", f"validation: {e}"
            out.sqnr_db = e.report["verdict"]["worst_output_sqnr_db"] if e.report else None
        except QCompileError as e:
            msg = str(e)
            out.status, out.reason = ("refused", msg) if msg and "\n" not in msg.strip() else ("bug", f"multi-line refusal: {msg[:300]!r}")
        else:
            path = str(Path(workdir) / f"{target}.onnx")
            qcompile.save_model(result.model, path)
            try:
                out.sqnr_db = run_compiled(case.model, path, feeds, read_outputs(case))
            except Exception as e:  # noqa: BLE001
                out.reason = f"unloadable or fails to run: {_first_line(e)}"
                out.detail = traceback.format_exc()[-2000:]
            else:
                tol = get_target(target).min_sqnr_db
                ok = out.sqnr_db is None or out.sqnr_db >= tol - 1e-6
                out.status = "ok" if ok else "below"
                out.reason = "" if ok else f"output SQNR {out.sqnr_db:.2f} dB < {tol} dB"
    except Exception as e:  # noqa: BLE001 - a traceback is what the sweep exists to find
        out.status, out.reason = "bug", f"traceback: {_first_line(e)}"
        out.detail = traceback.format_exc()[-3000:]
    out.seconds = round(time.perf_counter() - t0, 3)
    return out


def _worker(conn, targets) -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)  # qcompile's warnings (synthesized data...) are not results
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        case = conn.recv()
        if case is None:
            return
        with tempfile.TemporaryDirectory() as d:
            for t in targets:
                conn.send(asdict(run_case(case, t, d)))
        conn.send("done")


class Worker:
    """A child process that runs cases; restarted after a crash or a timeout."""

    def __init__(self, targets) -> None:
        self.targets = targets
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.targets), daemon=True)
        self.proc.start()

    def run(self, case: Case, timeout: float) -> list[Outcome]:
        self.conn.send(case)
        done: list[Outcome] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(min(left, 1.0)):
                if left > 0 and self.proc.is_alive():
                    continue
                kind = "timeout" if self.proc.is_alive() else f"crash (exit {self.proc.exitcode})"
                self.proc.kill()
                self.proc.join()
                self._start()
                seen = {o.target for o in done}
                return done + [Outcome(case.id, t, "bug", f"{kind} after {timeout:.0f} s" if kind == "timeout" else kind)
                               for t in self.targets if t not in seen]
            try:
                msg = self.conn.recv()
            except EOFError:
                continue
            if msg == "done":
                return done
            done.append(Outcome(**msg))

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


# --- the sweep ----------------------------------------------------------------------------------

def reason_group(reason: str) -> str:
    """A refusal without its names and numbers, to count refusals by kind."""
    r = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    r = re.sub(r"\btarget [\w:,-]+:", "target T:", r)
    r = re.sub(r"\b\d+(\.\d+)?\b", "N", r)
    r = re.sub(r"(?<![\w])/[\w./-]+", "PATH", r)
    return r[:160]


def sweep(cases: list[Case], targets=TARGETS, jobs: int = 1, timeout: float = 120.0, progress=True) -> list[Outcome]:
    import threading

    results: list[Outcome] = []
    lock = threading.Lock()
    todo = list(cases)
    t0 = time.perf_counter()

    def loop() -> None:
        w = Worker(targets)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    case = todo.pop(0)
                res = w.run(case, timeout)
                with lock:
                    results.extend(res)
                    if progress:
                        n = len(results) // len(targets)
                        bad = [f"{o.target}:{o.status}" for o in res if o.status in ("bug", "below")]
                        print(f"[{n}/{len(cases)} {time.perf_counter() - t0:.0f}s] {case.id} "
                              + " ".join(f"{o.target}={o.status}" for o in res) + (" <-- " + "; ".join(
                                  o.reason for o in res if o.status in ("bug", "below")) if bad else ""),
                              file=sys.stderr, flush=True)
        finally:
            w.close()

    threads = [threading.Thread(target=loop) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {c.id: k for k, c in enumerate(cases)}
    return sorted(results, key=lambda o: (order[o.case], targets.index(o.target)))


def summarize(results: list[Outcome], targets=TARGETS) -> dict:
    per_target = {t: {"ok": 0, "below": 0, "refused": 0, "bug": 0} for t in targets}
    reasons: dict[str, dict[str, int]] = {}
    for o in results:
        per_target[o.target][o.status] += 1
        if o.status == "refused":
            g = reasons.setdefault(reason_group(o.reason), {})
            g[o.target] = g.get(o.target, 0) + 1
    return {"per_target": per_target,
            "refusals": dict(sorted(reasons.items(), key=lambda kv: -sum(kv[1].values()))),
            "bugs": [asdict(o) for o in results if o.status in ("bug", "below")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--only", action="append", default=[], help="fnmatch glob(s) on suite/name")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model (all its targets)")
    ap.add_argument("--json", default="corpus.json")
    a = ap.parse_args(argv)
    suites, targets = tuple(a.suites.split(",")), tuple(a.targets.split(","))
    cases = corpus(suites)
    if a.only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, g) for g in a.only)]
    t0 = time.perf_counter()
    results = sweep(cases, targets, a.jobs, a.timeout)
    secs = time.perf_counter() - t0
    s = summarize(results, targets)
    s.update(models=len(cases), suites=list(suites), seconds=round(secs, 1), onnx=onnx.__version__)
    Path(a.json).write_text(json.dumps({"summary": s, "cases": [asdict(o) for o in results]}, indent=1))
    print(f"{len(cases)} models x {len(targets)} targets in {secs:.0f} s ({a.jobs} jobs)")
    print(f"{'target':8} {'ok':>6} {'refused':>8} {'below':>6} {'bug':>5}")
    for t, c in s["per_target"].items():
        print(f"{t:8} {c['ok']:6} {c['refused']:8} {c['below']:6} {c['bug']:5}")
    print("refusals by reason:")
    for r, c in list(s["refusals"].items())[:40]:
        print(f"  {sum(c.values()):5}  {r}")
    for b in s["bugs"][:60]:
        print(f"BUG {b['case']} {b['target']}: {b['reason']}")
    return 1 if s["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
