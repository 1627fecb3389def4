"""The step scripts run standalone, as the README tells users to run them.

- ``python test_stepN_*.py`` from the repository root, with ``QWEN_MODEL_PATH`` and ``VIDEO_PATH``
  unset, exits 0 and prints its report (step 5 skips every check without weights). Slow: each
  script is a fresh interpreter that imports torch and transformers.
- Outside pytest a check still gets the fixtures it asks for (``monkeypatch``, ``tmp_path``: step 2
  uses one); a check asking for any other fixture fails instead of passing unrun.
- A set ``QWEN_MODEL_PATH``/``VIDEO_PATH`` that names nothing usable: every problem is reported at
  once, one line each, and a script that reads them exits 2 before loading anything (no traceback).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.report import check_environment, environment_problems, run_checks

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in ROOT.glob("test_step*.py"))
READS = {  # the environment variables each step script reads
    "test_step1_cache.py": ("QWEN_MODEL_PATH", "VIDEO_PATH"),
    "test_step4_choice_cache.py": ("QWEN_MODEL_PATH", "VIDEO_PATH"),
    "test_step5_e2e.py": ("QWEN_MODEL_PATH",),
    "test_step6_stream_vs_native.py": ("QWEN_MODEL_PATH", "VIDEO_PATH"),
    "test_step7_multi_chunk.py": ("QWEN_MODEL_PATH", "VIDEO_PATH"),
}


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("QWEN_MODEL_PATH", "VIDEO_PATH")}
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, env={**environ, **env}, capture_output=True,
                          text=True, timeout=600)


def test_there_are_seven_step_scripts():
    assert SCRIPTS == [f"test_step{i}_{n}.py" for i, n in enumerate(
        ["cache", "cache_logic", "prompt", "choice_cache", "e2e", "stream_vs_native", "multi_chunk"], 1)]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_step_script_passes_standalone(script):
    out = run_script(script)
    assert out.returncode == 0, f"{script} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout or script in ("test_step6_stream_vs_native.py", "test_step7_multi_chunk.py")
    if script == "test_step5_e2e.py":
        assert "0 passed, 0 failed, 3 skipped" in out.stdout


# Runs each script as ``python SCRIPT`` would (``__main__``, its own argv), one after another in one
# interpreter: torch and transformers are imported once, not once per script.
RUN_EACH = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script]
    print(f"=== {script}", file=sys.stderr, flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
        print("exit 0", file=sys.stderr, flush=True)
    except SystemExit as stop:
        print(f"exit {stop.code}", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_bad_paths_exit_2_with_one_line_each_before_loading_anything(tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    out = run_script("-c", RUN_EACH, *sorted(READS), QWEN_MODEL_PATH=str(tmp_path / "no-checkpoint"),
                     VIDEO_PATH=str(not_a_video))
    assert out.returncode == 0 and out.stdout == "", (out.stdout[-2000:], out.stderr[-3000:])  # nothing loaded or run
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    reports = dict(part.split("\n", 1) for part in out.stderr.split("=== ")[1:])
    assert sorted(reports) == sorted(READS), out.stderr
    for script, report in reports.items():
        # ours: one line per variable (FFmpeg may add its own line about the bad file, written by the C library)
        lines = [line for line in report.splitlines() if line.startswith(("Model not found", "Cannot "))]
        assert report.strip().endswith("exit 2") and len(lines) == len(READS[script]), (script, report)
        assert lines[0].startswith("Model not found: QWEN_MODEL_PATH=") and "no-checkpoint" in lines[0]
        if "VIDEO_PATH" in READS[script]:
            assert lines[1].startswith("Cannot open video") and "notes.mp4" in lines[1] and "VIDEO_PATH" in lines[1]


def test_check_environment_reports_every_bad_path_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QWEN_MODEL_PATH", str(tmp_path / "missing-model"))
    monkeypatch.setenv("VIDEO_PATH", str(tmp_path / "missing.mp4"))
    with pytest.raises(SystemExit) as stop:
        check_environment("QWEN_MODEL_PATH", "VIDEO_PATH")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Model not found: QWEN_MODEL_PATH=") and "missing-model" in lines[0]
    assert lines[1].startswith("Cannot open video: VIDEO_PATH=") and "missing.mp4" in lines[1]
    assert all("unset" in line for line in lines)  # each says how to fix it
    monkeypatch.setenv("QWEN_MODEL_PATH", str(tmp_path))  # a folder: fine
    monkeypatch.delenv("VIDEO_PATH")
    assert environment_problems("QWEN_MODEL_PATH", "VIDEO_PATH") == []
    check_environment("QWEN_MODEL_PATH", "VIDEO_PATH")  # returns


def test_a_standalone_check_gets_the_fixtures_it_asks_for(capsys):
    seen = {}

    def test_patches(monkeypatch, tmp_path):
        monkeypatch.setenv("STEP_FIXTURE_PROBE", "set")
        seen["env"], seen["tmp"] = os.environ["STEP_FIXTURE_PROBE"], tmp_path
        assert tmp_path.is_dir()

    def test_needs_capsys(capsys):
        pass

    assert run_checks("fixtures", [test_patches]) == 0
    assert seen["env"] == "set" and "STEP_FIXTURE_PROBE" not in os.environ and not seen["tmp"].exists()  # undone and removed afterwards
    assert run_checks("unknown fixture", [test_needs_capsys]) == 1
    assert "needs pytest fixture(s) ['capsys']" in capsys.readouterr().out
