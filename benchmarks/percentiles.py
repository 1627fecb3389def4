"""What every benchmark here reports about a list of timings: p50 / p95 / max, and one table row of them."""
from __future__ import annotations


def pct(xs, q):
    """The q-th percentile (nearest rank) of xs; nan for none."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summary(xs) -> dict:
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "max": max(xs) if xs else float("nan"), "n": len(xs)}


def row(s: dict) -> str:
    """' p50   p95     max' of a ``summary``, for the tables the benchmarks print."""
    return f"{s['p50']:6.1f} {s['p95']:6.1f} {s['max']:7.1f}"
