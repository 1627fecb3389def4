"""The load generator end to end on CPU: it starts the server, drives 1 and 2 cameras, writes its report.

Every question is answered, nothing is dropped at 2 fps on the tiny model, the client's TTFT is
at least the engine's own, and the JSON, the plot and the server's log are written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_serve_measures_each_n_and_writes_its_report(tmp_path):
    out = tmp_path / "serve"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_serve.py"), "--sessions", "1,2",
                          "--seconds", "3", "--question-every", "1", "--max-new-tokens", "4", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "largest N held in real time: 2" in run.stdout
    report = json.loads((out / "bench_serve.json").read_text())
    assert [r["n"] for r in report["runs"]] == [1, 2] and report["largest_realtime_n"] == 2
    for r in report["runs"]:
        assert r["questions"] == r["answered"] >= 2 * r["n"]
        assert r["frames_sent"] >= 5 * r["n"] and r["frames_dropped"] == 0 and r["frames_failed"] == 0
        assert r["frames_ingested"] == r["frames_sent"]
        assert 0 < r["engine_ttft_ms"]["p50"] <= r["ttft_ms"]["p50"] and r["overhead_ms"]["p50"] >= 0
        assert r["memory_gib_max"] > 0 and r["server_cpu_cores"] > 0 and r["realtime"] is True
        pool = r["pool"]  # the scheduler's counters over this N: every chunk's grids and every question went through it
        assert pool["vision_grids"] * 2 >= r["frames_ingested"] and pool["lm_segments"] >= r["questions"], pool
    assert (out / "bench_serve.png").stat().st_size > 10_000
    assert '"event": "session_created"' in (out / "server.log").read_text()
