"""Measurement helpers: device sync, medians, GPU memory, and what to record about the machine."""
from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager

import torch
import transformers

GIB = 1024**3
MIB = 1024**2


def sync(device=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


@contextmanager
def timed(out: list):
    """Append the synchronised wall time of the block (seconds) to ``out``."""
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    out.append(time.perf_counter() - t0)


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def vram() -> dict:
    """Allocated / reserved / peak allocated GPU memory in MiB ({} on CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {"allocated": round(torch.cuda.memory_allocated() / MIB, 2),
            "reserved": round(torch.cuda.memory_reserved() / MIB, 2),
            "peak_allocated": round(torch.cuda.max_memory_allocated() / MIB, 2)}


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_info() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
    }


def set_exact_fp32() -> None:
    """fp32 without TF32: the setting in which stream and native must agree to 1e-4."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
