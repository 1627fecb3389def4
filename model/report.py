"""Helpers for the test_step*.py scripts: sectioned reports, check runners, environment paths.

A step script reads ``QWEN_MODEL_PATH`` (a checkpoint folder) and ``VIDEO_PATH`` (a video file);
unset, it uses random weights or the synthetic video and says so. A set variable that names
nothing usable is an error, never a silent fallback: ``check_environment`` reports every bad
one at once, one line each, and the scripts exit 2 before loading anything.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

WIDTH = 70
BAD_ENVIRONMENT = 2  # the exit code of a step script whose QWEN_MODEL_PATH / VIDEO_PATH is unusable


def section(title: str) -> None:
    print("=" * WIDTH)
    print(title)
    print("=" * WIDTH)


@contextlib.contextmanager
def _fixtures(check: Callable[[], None]):
    """The pytest fixtures ``check`` asks for by name, outside pytest: ``monkeypatch`` and ``tmp_path``.

    Any other parameter raises TypeError naming it (the check then fails instead of silently passing).
    """
    import pytest

    names = list(inspect.signature(check).parameters)
    unknown = [n for n in names if n not in ("monkeypatch", "tmp_path")]
    if unknown:
        raise TypeError(f"{check.__name__} needs pytest fixture(s) {unknown}; a standalone step script "
                        "provides only monkeypatch and tmp_path")
    with contextlib.ExitStack() as stack:
        given = {}
        if "monkeypatch" in names:
            given["monkeypatch"] = stack.enter_context(pytest.MonkeyPatch.context())
        if "tmp_path" in names:
            given["tmp_path"] = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="step-")))
        yield given


def run_checks(title: str, checks: list[Callable[..., None]]) -> int:
    """Run each check (a test function), print PASS/FAIL/SKIP lines; return a process exit code.

    A check may take the pytest fixtures ``monkeypatch`` and ``tmp_path`` (given here as pytest would).
    """
    import pytest

    section(title)
    failed = skipped = 0
    for check in checks:
        name = check.__name__.removeprefix("test_").replace("_", " ")
        t0 = time.perf_counter()
        try:
            with _fixtures(check) as given:
                check(**given)
        except pytest.skip.Exception as e:
            skipped += 1
            print(f"  [SKIP] {name}: {e.msg}")
            continue
        except Exception:  # a failed check is reported, the rest still run
            failed += 1
            print(f"  [FAIL] {name}")
            print("         " + traceback.format_exc().strip().replace("\n", "\n         "))
            continue
        print(f"  [PASS] {name} ({time.perf_counter() - t0:.2f}s)")
    passed = len(checks) - failed - skipped
    print("-" * WIDTH)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


def _video_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot serve as the video ("Cannot open video: ..."), or None."""
    from .sources import open_video

    if not os.path.isfile(path):
        return f"Cannot open video: VIDEO_PATH={path!r} is not a file"
    try:
        with open_video(path, fps=None):
            return None
    except ValueError as e:  # open_video's own message starts "Cannot open video" / "Cannot read any frame"
        return f"{e} (VIDEO_PATH={path!r})"


def _model_problem(path: str) -> Optional[str]:
    return None if os.path.isdir(path) else f"Model not found: QWEN_MODEL_PATH={path!r} is not a folder"


# variable -> (its problem, what an unset variable means)
_VARIABLES = {
    "QWEN_MODEL_PATH": (_model_problem, "a randomly initialised model"),
    "VIDEO_PATH": (_video_problem, "the synthetic video"),
}


def environment_problems(*variables: str) -> list[str]:
    """One line per set ``variable`` (QWEN_MODEL_PATH, VIDEO_PATH) that names nothing usable, saying how to fix it."""
    problems = []
    for var in variables:
        problem, fallback = _VARIABLES[var]
        path = os.environ.get(var)
        line = problem(path) if path else None
        if line:
            problems.append(f"{line}; fix the path or unset {var} to use {fallback}")
    return problems


def check_environment(*variables: str) -> None:
    """Exit 2 with one line per bad variable (all of them, not just the first) on standard error."""
    problems = environment_problems(*variables)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        sys.exit(BAD_ENVIRONMENT)


def _env_path(var: str) -> Optional[str]:
    """``$var`` if set (it must name something usable: ValueError otherwise); None when unset, said in one line."""
    problems = environment_problems(var)
    if problems:
        raise ValueError(problems[0])
    path = os.environ.get(var)
    if not path:
        print(f"{var} not set: using {_VARIABLES[var][1]}.")
    return path or None


def model_path() -> Optional[str]:
    return _env_path("QWEN_MODEL_PATH")


def video_path() -> Optional[str]:
    return _env_path("VIDEO_PATH")


def load_engine(dtype: Optional[str] = None, attn_implementation: str = "sdpa", config=None):
    """(engine, description) for the step scripts: ``loading.load_engine`` with its banner in the report."""
    from .loading import load_engine as load

    model_path()  # says "not set" in the report, or raises for a path that does not exist
    return load(None, dtype, None, attn_implementation, out=sys.stdout, config=config)


def main(title: str, checks: list[Callable[..., None]], environment: tuple[str, ...] = ()) -> None:
    """A step script's entry point: the ``environment`` variables it reads checked first (exit 2), then its checks."""
    check_environment(*environment)
    sys.exit(run_checks(title, checks))


def plot_stream_vs_native(rows: list, path: str, title: str) -> None:
    """Step 6's sweep: TTFT and peak GPU memory against video length, streaming vs native (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["seconds"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(x, [r["stream_ttft_s"] * 1e3 for r in rows], "o-", label="streaming")
    ax1.plot(x, [r["native_ttft_s"] * 1e3 if r["native_ttft_s"] else float("nan") for r in rows], "s-", label="native")
    ax1.set(xlabel="video length (s)", ylabel="time to first token (ms)", yscale="log", title="TTFT")
    ax2.plot(x, [(r["stream_peak_mib"] or 0) / 1024 for r in rows], "o-", label="streaming")
    ax2.plot(x, [(r["native_peak_mib"] or float("nan")) / 1024 for r in rows], "s-", label="native")
    ax2.set(xlabel="video length (s)", ylabel="peak GPU memory (GiB)", title="VRAM")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
