"""Metrics from the JSONL records: accuracy by each benchmark's own averaging, latency, ingest, memory, parity.

Averaging (accuracies in percent):
    OVO-Bench       a task's accuracy is the mean over its events (forward tasks: over probes, as
                    OVO-Bench's score script counts them); a category's is the mean of its tasks';
                    ``overall`` is the mean of the three categories' (OVO-Bench's "Total Avg.");
                    ``realtime_backward`` is the mean of real-time and backward, which papers that
                    leave out the forward tasks report.
    StreamingBench  per task and per category the mean over questions; ``overall`` is the mean over
                    all questions (StreamingBench's statistics script).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .events import CATEGORIES, OVO, Event
from .modes import MODES
from .scoring import SCORERS

SHARED_CALL = {"choice_norm": "choice"}  # scorers read from another scorer's call (timed once)


def unique_records(records: Iterable[dict]) -> list[dict]:
    """First record of each (mode, event_id)."""
    seen, out = set(), []
    for r in records:
        key = (r["mode"], r["event_id"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summarize(benchmark: str, records: list[dict], events: list[Event], modes: Iterable[str]) -> dict:
    """Everything the report shows, per mode, for the events of this run's annotations."""
    wanted = {e.event_id for e in events}
    records = [r for r in unique_records(records) if r["event_id"] in wanted]
    out = {}
    for mode in modes:
        recs = [r for r in records if r["mode"] == mode]
        scorers = [s for s in SCORERS if recs and all(s in r for r in recs)]
        out[mode] = {
            "answered": len(recs), "expected": len(wanted),
            "accuracy": {s: accuracy(benchmark, recs, s) for s in scorers},
            "latency_s": {s: percentiles([r[s]["s"] for r in recs]) for s in scorers if s not in SHARED_CALL},
            "ingest": ingest(recs),
            "total_s": total_seconds(recs, scorers),
            "memory_mib": peak_memory(recs),
        }
        if mode in MODES and MODES[mode].reprefills:  # each answer waits for its re-prefill: count it
            out[mode]["latency_with_prefill_s"] = {s: percentiles([r["ingest_s"] + r[s]["s"] for r in recs])
                                                   for s in scorers if s not in SHARED_CALL}
    return out


def accuracy(benchmark: str, recs: list[dict], scorer: str) -> dict:
    tasks: dict[str, list[bool]] = {}
    by_cat: dict[str, dict[str, list[bool]]] = {}
    task_cat = {}
    for r in recs:
        ok = bool(r[scorer]["correct"])
        tasks.setdefault(r["task"], []).append(ok)
        task_cat[r["task"]] = r["category"]
        by_cat.setdefault(r["category"], {}).setdefault(r["task"], []).append(ok)
    task_acc = {t: _pct(v) for t, v in sorted(tasks.items())}
    cats = {}
    for cat in _category_order(benchmark, by_cat):
        groups = by_cat[cat]
        flat = [x for v in groups.values() for x in v]
        acc = float(np.mean([_pct(v) for v in groups.values()])) if benchmark == OVO else _pct(flat)
        cats[cat] = {"acc": acc, "n": len(flat), "tasks": len(groups)}
    out = {"tasks": {t: {"acc": a, "n": len(tasks[t]), "category": task_cat[t]} for t, a in task_acc.items()},
           "categories": cats,
           "n": len(recs), "micro": _pct([bool(r[scorer]["correct"]) for r in recs])}
    if benchmark == OVO:
        out["overall"] = _mean([c["acc"] for c in cats.values()])
        rb = [cats[c]["acc"] for c in ("real-time", "backward") if c in cats]
        out["realtime_backward"] = _mean(rb)
        out["overall_rule"] = "mean of the category means (each the mean of its task accuracies)"
    else:
        out["overall"] = out["micro"]
        out["overall_rule"] = "mean over all questions"
    return out


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "mean": None}
    a = np.asarray(xs, dtype=float)
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean())}


def ingest(recs: list[dict]) -> dict:
    frames = sum(r["ingest_frames"] for r in recs)
    seconds = sum(r["ingest_s"] for r in recs)
    return {"frames": frames, "s": seconds, "frames_per_s": frames / seconds if seconds > 0 else None}


def total_seconds(recs: list[dict], scorers: list[str]) -> float:
    """Ingest plus every answering call (what a run of this mode costs, parity excluded)."""
    calls = [s for s in scorers if s not in SHARED_CALL]
    return sum(r["ingest_s"] + sum(r[s].get("total_s", r[s]["s"]) for s in calls) for r in recs)


def peak_memory(recs: list[dict]) -> dict:
    keys = sorted({k for r in recs for k in r.get("memory_mib", {})})
    return {k: max(r["memory_mib"][k] for r in recs if k in r.get("memory_mib", {})) for k in keys}


def parity_summary(records: list[dict]) -> Optional[dict]:
    par = [r["parity"] for r in unique_records(records) if "parity" in r]
    if not par:
        return None
    ok = [p for p in par if "error" not in p]
    out = {"events": len(par), "errors": [p["error"] for p in par if "error" in p],
           "same_choice": sum(bool(p["same_choice"]) for p in ok), "failed": sum(bool(p["failed"]) for p in ok)}
    if ok:
        out["dtype"] = ok[0]["dtype"]
        out["max_abs_logit_diff"] = max(p["max_abs_logit_diff"] for p in ok)
        for name in ("choice", "letter"):
            out[f"{name}_max_abs_score_diff"] = max(p[name]["max_abs_score_diff"] for p in ok)
            out[f"{name}_same"] = sum(bool(p[name]["same_choice"]) for p in ok)
    return out


def _category_order(benchmark: str, by_cat: dict) -> list[str]:
    known = [c for c in CATEGORIES[benchmark] if c in by_cat]
    return known + sorted(c for c in by_cat if c not in known)


def _pct(values: list[bool]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _mean(xs: list[float]) -> Optional[float]:
    return float(np.mean(xs)) if xs else None
