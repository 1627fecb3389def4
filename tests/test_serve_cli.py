"""``python -m model.serve``: flags checked before anything heavy loads; a real server process serves and stops.

- ``--help`` and bad flags answer at once, with exit 2 and one line naming the flag, without
  importing torch, transformers, FastAPI or Ray;
- started on a free loopback port it answers /healthz, serves a session, writes JSON log lines,
  and stops cleanly on SIGTERM (its sessions closed).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test starts the server's interpreter
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HEAVY = {"torch", "transformers", "fastapi", "ray", "uvicorn"}


@pytest.mark.parametrize("args, code, words", [
    (["--help"], 0, ""),
    (["--port", "70000"], 2, "--port"),
    (["--memory-gib", "0"], 2, "--memory-gib"),
    (["--api-key", "short"], 2, "API key"),
    (["--default-fps", "40"], 2, "--default-fps"),
    (["--default-budget-tokens", "100000"], 2, "--default-budget-tokens"),
    (["--max-choices", "0"], 2, "max_choices"),
    (["--idle-timeout", "-1"], 2, "idle_timeout_s"),
    (["--model", "/nonexistent/folder"], 2, "--model"),
    (["--pool-tokens", "0"], 2, "--pool-tokens"),
    (["--no-pool", "--pool-tokens", "4096"], 2, "--no-pool"),
])
def test_help_and_bad_flags_answer_before_anything_heavy_loads(args, code, words):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "model.serve", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert proc.returncode == code, proc.stderr[-2000:]
    assert not HEAVY & imported, HEAVY & imported
    assert time.monotonic() - start < 5.0
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    if code:
        assert len(errors) == 1 and words in errors[0], errors
    else:
        assert "--memory-gib" in proc.stdout and "--api-key" in proc.stdout


def test_a_budget_too_small_for_the_pool_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "model.serve", "--device", "cpu", "--memory-gib", "0.00001"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--memory-gib" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_a_server_process_serves_and_stops_cleanly(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "model.serve", "--port", str(port), "--device", "cpu",
                             "--memory-gib", "1"], cwd=ROOT, env={**ENV, "SERVE_API_KEY": "cli-test-key-123"},
                            stdout=log, stderr=subprocess.STDOUT)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer cli-test-key-123"}
    try:
        for _ in range(600):
            try:
                health = httpx.get(f"{url}/healthz", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.1)
        assert health["status"] == "ok" and health["model"] == "random-weight tiny qwen2_5_vl model (CPU)"
        assert httpx.post(f"{url}/v1/sessions").status_code == 401  # the key came from $SERVE_API_KEY
        sid = httpx.post(f"{url}/v1/sessions", headers=auth).json()["id"]
        info = httpx.get(f"{url}/v1/info", headers=auth).json()
        # the pool's pages: the 1 GiB given, less the scratch slots of its captured batches
        assert 2**30 - 2**20 < info["memory_budget_bytes"] <= 2**30 and info["route_header"] is None
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT if sys.platform == "win32" else signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
    events = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    assert events[-1]["message"].startswith("Finished server process")
    kinds = [e.get("event") for e in events]
    assert "session_created" in kinds and "request" in kinds
    ended = [e for e in events if e.get("event") == "session_ended"]
    assert ended and ended[0]["session"] == sid and ended[0]["reason"] == "server shutting down"
    assert all("cli-test-key-123" not in json.dumps(e) for e in events), "the API key was logged"
