"""Helpers for the test_step*.py scripts: sectioned reports, check runners, environment fallbacks."""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch

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


def load_engine(dtype: Optional[str] = None, attn_implementation: str = "sdpa"):
    """(engine, description): the checkpoint if QWEN_MODEL_PATH is set, else random weights.

    Random weights: the tiny model on CPU, the full Qwen2.5-VL-3B architecture on a GPU.
    """
    from . import VideoStreamInference
    from .testing import QWEN25_VL_3B_CONFIG, build_3b_processor, build_random_model, build_tiny_model

    cuda = torch.cuda.is_available()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   None: torch.bfloat16 if cuda else torch.float32}[dtype]
    path = model_path()
    if path:
        engine = VideoStreamInference.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        return engine, f"checkpoint {path}"
    if cuda:
        print("!" * WIDTH)
        print("! RANDOM WEIGHTS (Qwen2.5-VL-3B architecture): answers are meaningless, timings are real.")
        print("!" * WIDTH)
        model = build_random_model(QWEN25_VL_3B_CONFIG, dtype=torch_dtype, device="cuda",
                                   attn_implementation=attn_implementation)
        return VideoStreamInference(model, build_3b_processor()), "random-weight Qwen2.5-VL-3B architecture"
    print("RANDOM WEIGHTS (tiny model on CPU): answers are meaningless, timings are not representative.")
    model, proc = build_tiny_model(attn_implementation=attn_implementation)
    return VideoStreamInference(model, proc), "random-weight tiny model (CPU)"


def main(title: str, checks: list[Callable[[], None]]) -> None:
    sys.exit(run_checks(title, checks))
