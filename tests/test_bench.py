"""`qcompile bench --quick`: the CI-sized bench runs end to end and writes its three outputs.

It measures nothing for a verdict (tests do not assert wall-clock times or quality here; quality
has its own tests): it checks that qcompile and onnxruntime rows come out side by side, that the
JSON has every raw figure the table is made from, and that the PNG is written. About 1.5 min on
the project's 2-core machine (MiniLM, int8, 32/32 samples, two baselines, 5 runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc, out


def test_quick_bench_exits_0_with_table(quick):
    proc, _ = quick
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert table and "SQNR dB" in table[0], proc.stdout
    tools = {ln.split("|")[3].strip() for ln in table[2:]}
    assert {"qcompile", "onnxruntime"} <= tools, proc.stdout
    assert "qcompile bench:" in proc.stderr and "qcompile bench:" not in proc.stdout  # progress on stderr only


def test_quick_bench_json_has_raw_figures(quick):
    proc, out = quick
    results = json.loads((out / "bench.json").read_text())
    assert results["schema"] == "qcompile.bench/1"
    env = results["environment"]
    assert {"onnxruntime", "onnx", "qcompile", "cpu", "date", "command"} <= set(env)
    assert results["settings"]["quick"] and results["settings"]["runs"] == 5
    info = results["models"]["minilm"]
    assert info["error"] is None and info["bits_per_weight"] == pytest.approx(32.0, abs=0.1)
    assert info["load"]["session_seconds"] > 0 and info["load"]["peak_rss_bytes"] > 0
    rows = results["rows"]
    assert {r["tool"] for r in rows} == {"qcompile", "onnxruntime"}
    assert {r["config"] for r in rows} == {"qcompile int8", "ort-dynamic", "ort-static-matmul-minmax"}
    for r in rows:
        assert r["error"] is None, r
        m = r["metrics"]["sentence_embedding"]
        assert {"sqnr_db", "cosine_mean", "cosine_min", "samples"} <= set(m) and m["samples"] == 32
        assert r["size"]["file_bytes"] > 0 and 0 < r["size"]["bits_per_weight"] < 32
        assert r["compile"]["seconds"] > 0 and r["compile"]["peak_rss_bytes"] > 0
        load = r["load"]  # session creation in a fresh process: time and peak RSS
        assert load["session_seconds"] > 0 and load["session_peak_rss_bytes"] >= load["rss_before_bytes"] > 0, load
        assert load["file_bytes"] == r["size"]["file_bytes"] and load["session_rss_over_file"] >= 0
        assert set(r["latency"]) == {"batch1", "batch8"}
        for lat in r["latency"].values():
            assert len(lat["raw_float_ms"]) == len(lat["raw_quant_ms"]) == 5
            assert lat["ratio"] > 0 and {"median", "p10", "p90"} <= set(lat["quant_ms"])


def test_quick_bench_writes_png(quick):
    _, out = quick
    png = out / "bench.png"
    assert png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_model_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", "bench", "--models", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown model nope" in proc.stderr
