"""bench/gemv.py (issue 4, point 4) runs end to end on a small chain: every row has its figures.

Timings are not asserted (a benchmark, not a timed test); the structure and the quality are.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gemv_bench_small_chain(tmp_path):
    out = tmp_path / "gemv.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv.py"), "--layers", "2", "--dim", "256", "--runs", "2",
                        "--warmup", "1", "--configs", "0,2,4", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["bandwidth_gbs"] > 0 and [row["target"] for row in res["rows"]] == ["w4", "mxfp4", "mxfp4"]
    for row in res["rows"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["speedup"] > 0 and row["roofline_pct"] > 0
        # kernel bytes per weight: 4-bit planes (+ scales) read by MatMulNBits / MatMulFp4
        assert 2 * 256 * 256 * 0.5 <= row["bytes_read"] <= 2 * 256 * 256 * 1.5, row
        assert row["sqnr_db"] > 8, row
    assert "| w4 (int4, 1 plane), level 0 |" in r.stdout
