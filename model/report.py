"""Helpers for the test_step*.py scripts: sectioned reports, check runners, environment fallbacks."""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable, Optional

WIDTH = 70


def section(title: str) -> None:
    print("=" * WIDTH)
    print(title)
    print("=" * WIDTH)


def run_checks(title: str, checks: list[Callable[[], None]]) -> int:
    """Run each check (a test function), print PASS/FAIL/SKIP lines; return a process exit code."""
    import pytest

    section(title)
    failed = skipped = 0
    for check in checks:
        name = check.__name__.removeprefix("test_").replace("_", " ")
        t0 = time.perf_counter()
        try:
            check()
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


def _env_path(var: str, exists, fallback: str, missing: str) -> Optional[str]:
    """``$var`` if set (it must name something that ``exists``); None when unset, said in one line.

    A set variable that names nothing is an error, never a silent fallback.
    """
    path = os.environ.get(var)
    if not path:
        print(f"{var} not set: using {fallback}.")
        return None
    if not exists(path):
        raise ValueError(f"{missing}: {var}={path!r} does not exist; fix the path or unset {var} to use {fallback}")
    return path


def model_path() -> Optional[str]:
    return _env_path("QWEN_MODEL_PATH", os.path.isdir, "a randomly initialised model", "Model not found")


def video_path() -> Optional[str]:
    return _env_path("VIDEO_PATH", os.path.isfile, "the synthetic video", "Cannot open video")


def load_engine(dtype: Optional[str] = None, attn_implementation: str = "sdpa", config=None):
    """(engine, description) for the step scripts: ``loading.load_engine`` with its banner in the report."""
    from .loading import load_engine as load

    model_path()  # says "not set" in the report, or raises for a path that does not exist
    return load(None, dtype, None, attn_implementation, out=sys.stdout, config=config)


def main(title: str, checks: list[Callable[[], None]]) -> None:
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
