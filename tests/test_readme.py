"""The README's code runs as written.

- Every ```python block runs in a fresh interpreter, in an empty temporary directory, with
  ``QWEN_MODEL_PATH`` and ``VIDEO_PATH`` unset (so it gets the tiny random model) and the checkout
  on ``PYTHONPATH``, as ``pip install -e .`` would put it: it must exit 0 without a traceback.
- ```bash blocks: each command (continuation lines joined) runs from the repository root with
  this interpreter first on ``PATH``, unless a rule in ``NOT_RUN`` below leaves it out and says
  why. A command no rule matches is run, so a command added to the README is tested until someone
  decides otherwise here. A run command must exit 0, except one that sets ``QWEN_MODEL_PATH`` or
  ``VIDEO_PATH`` to a path that does not exist here (the README's placeholders): run literally it
  must exit 2 with one line naming each such variable and no traceback.

Slow: every block and command is a fresh interpreter that imports torch and transformers.

- The design document the code, tests and docs cite is the repository's own ``DESIGN.md``: no
  file cites one outside it, and every "DESIGN.md section N" / "invariant N" cited exists there.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PATH_VARIABLES = ("QWEN_MODEL_PATH", "VIDEO_PATH")

# (pattern at the start of a command, why it is not run here)
NOT_RUN = [
    (r"python3 -m venv |pip install ", "installs packages: needs the package index and minutes; "
                                       ".ci/run does exactly this in a fresh venv"),
    (r"python -m pytest", "the test suite itself, which contains this test"),
    (r"(SERVE_API_KEY=\S+ )?python -m model\.serve (?!--help)|serve run |ray start ",
     "starts a server or a Ray cluster that runs until stopped (tests/test_serve_*.py start the same server, "
     "the browser page and Ray Serve on loopback and stop them)"),
    (r"python benchmarks/bench_serve\.py +# on the GPU machine", "the GPU measurement (minutes on a GPU, its report "
                                                                 "into benchmarks/results/serve); the CPU trial below "
                                                                 "runs the same code"),
    (r"python -m model(\.eval)? (?!--help)", "streams a video file, camera or URL, or reads benchmark datasets "
                                             "and weights, none of which a checkout has (tests/test_cli.py and "
                                             "tests/test_eval_runner.py run both tools on generated files)"),
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def block_ids(language: str) -> list[str]:
    """README line of each block's opening fence: where to look when one fails."""
    return [f"README.md:{README[:m.start()].count(chr(10)) + 1}"
            for m in re.finditer(rf"^```{language}\n", README, re.M)]


def commands() -> list[str]:
    """Every command of the bash blocks, continuation lines joined, comments and blank lines dropped."""
    out = []
    for block in blocks("bash"):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                out.append(command)
    return out


def left_out(command: str):
    return next((why for pattern, why in NOT_RUN if re.match(pattern, command)), None)


RUN = [c for c in commands() if left_out(c) is None]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PATH_VARIABLES}
    return {**env, **extra}


def test_the_readme_has_code_to_check():
    assert len(blocks("python")) == len(block_ids("python")) >= 2 and RUN, (len(blocks("python")), RUN)
    assert all(c in RUN or left_out(c) for c in commands())


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks("python"), ids=block_ids("python"))
def test_python_block_runs_as_written(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=clean_env(PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, f"exit {out.returncode}\n{code}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN, ids=[" ".join(c.split("#")[0].split())[:60] for c in RUN])
def test_bash_command_runs_as_written(command):
    placeholders = [var for var in PATH_VARIABLES
                    if (m := re.search(rf"(?:^|\s){var}=(\S+)", command)) and not (ROOT / m.group(1)).exists()]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=clean_env(PATH=path))
    assert "Traceback" not in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-3000:]
    if not placeholders:
        assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    for var in placeholders:  # one clear line each, all of them at once
        assert sum(f" {var}=" in line or line.startswith(f"{var}=") for line in out.stderr.splitlines()) == 1, (
            var, out.stderr)


def cited_files() -> list[Path]:
    skip = {".git", ".venv", "venv", "build", "__pycache__", "node_modules"}
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md") and p.is_file()
            and not skip & set(p.relative_to(ROOT).parts)]


def test_design_citations_point_into_the_repository():
    design = (ROOT / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, re.M))
    invariants = set(re.findall(r"^(\d+)\. \*\*", design, re.M))
    cited = 0
    for path in cited_files():
        text = path.read_text(errors="replace")
        assert "shared/" "DESIGN" not in text, f"{path.relative_to(ROOT)} cites a design document outside the repository"
        for number in re.findall(r"DESIGN\.md,? sections? (\d+)", text):
            assert number in sections, f"{path.relative_to(ROOT)} cites DESIGN.md section {number}, which does not exist"
            cited += 1
        for number in re.findall(r"DESIGN\.md invariant (\d+)", text) + re.findall(r"^\W*Invariant (\d+)", text, re.M):
            assert number in invariants, f"{path.relative_to(ROOT)} cites invariant {number}, which DESIGN.md lacks"
            cited += 1
    assert cited >= 5 and len(sections) >= 8 and len(invariants) >= 7, (cited, sections, invariants)
