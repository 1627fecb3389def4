"""The report: OUT/report.json, OUT/report.md and OUT/report.png from a run's records."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from .events import OVO
from .metrics import parity_summary, summarize
from .runner import RunResult

SCORER_TITLES = {"choice": "option text (sum)", "choice_norm": "option text (mean)", "letter": "option letter",
                 "generate": "generated"}
PLOT_SCORER = "letter"  # the convention LiveCC and StreamingVLM report
RANDOM_WEIGHTS = "RANDOM WEIGHTS: accuracy meaningless"


def build_summary(result: RunResult) -> dict:
    s = result.settings
    return {
        "benchmark": s["benchmark"], "model": s.get("model", ""), "settings": s,
        "random_weights": bool(s.get("random_weights", s.get("model", "").startswith("random"))),
        "completed": result.completed, "wall_s": result.wall_s, "decode_s": result.decode_s,
        "new_records": result.new_records, "events": len(result.events),
        "videos_decoded": len(result.decoded), "frames_decoded": sum(result.decoded.values()),
        "modes": summarize(s["benchmark"], result.records, result.events, s["modes"]),
        "parity": parity_summary(result.records),
        "problems": [{"index": p.index, "video": p.video, "reason": p.reason} for p in result.problems],
    }


def write_report(out_dir: str | os.PathLike, result: RunResult) -> dict:
    """Write report.json, report.md and report.png; returns {"json", "markdown", "png", "summary"}."""
    out = Path(out_dir)
    summary = build_summary(result)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["png"])
    return {**{k: str(v) for k, v in paths.items()}, "summary": summary}


# ------------------------------------------------------------------ Markdown

def markdown(summary: dict) -> str:
    s = summary["settings"]
    title = f"# {'OVO-Bench' if summary['benchmark'] == OVO else 'StreamingBench'}: streaming evaluation"
    lines = [title + (f" ({RANDOM_WEIGHTS})" if summary["random_weights"] else ""), ""]
    if summary["random_weights"]:
        lines += ["> **RANDOM WEIGHTS**: accuracies are meaningless; timings are real.", ""]
    lines += [f"- model: {summary['model'] or '?'}; device: {s['device'].get('card')}; "
              f"transformers {s['device'].get('transformers')}",
              f"- fps {s['fps']}; modes {', '.join(s['modes'])}; window {s['window_frames']} frames; "
              f"stream chunks of {s['chunk_frames']} frames; parity {s['parity']} events"
              + (f"; bounded budget {_budget(s['budget'])}" if "bounded" in s["modes"] and s.get("budget") else ""),
              f"- this run: {summary['new_records']} answers in {summary['wall_s']:.1f} s "
              f"(decoding {summary['videos_decoded']} videos, {summary['frames_decoded']} frames: "
              f"{summary['decode_s']:.1f} s); {'completed' if summary['completed'] else 'PARTIAL (stopped)'}",
              ""]
    for mode, m in summary["modes"].items():
        lines += _accuracy_table(mode, m, summary["benchmark"])
    lines += _speed_table(summary["modes"])
    lines += _parity_lines(summary["parity"])
    if summary["problems"]:
        lines += ["## Skipped", ""]
        lines += [f"- {'entry ' + str(p['index']) if p['index'] is not None else 'video ' + str(p['video'])}: "
                  f"{p['reason']}" for p in summary["problems"]]
        lines.append("")
    return "\n".join(lines)


def _accuracy_table(mode: str, m: dict, benchmark: str) -> list[str]:
    scorers = list(m["accuracy"])
    lines = [f"## Accuracy, mode `{mode}` ({m['answered']}/{m['expected']} events)", ""]
    if not scorers:
        return lines + ["No answers yet.", ""]
    lines += ["| | n | " + " | ".join(SCORER_TITLES[s] for s in scorers) + " |",
              "|---|---:|" + "---:|" * len(scorers)]
    first = m["accuracy"][scorers[0]]
    for cat, c in first["categories"].items():
        lines.append(f"| **{cat}** | {c['n']} | " + " | ".join(
            _pct(m["accuracy"][s]["categories"][cat]["acc"]) for s in scorers) + " |")
        for task, tinfo in first["tasks"].items():
            if tinfo["category"] == cat:
                lines.append(f"| {task} | {tinfo['n']} | " + " | ".join(
                    _pct(m["accuracy"][s]["tasks"][task]["acc"]) for s in scorers) + " |")
    lines.append(f"| **overall** | {first['n']} | "
                 + " | ".join(_pct(m["accuracy"][s]["overall"]) for s in scorers) + " |")
    if benchmark == OVO:
        lines.append("| **real-time + backward** | | " + " | ".join(
            _pct(m["accuracy"][s]["realtime_backward"]) for s in scorers) + " |")
    return lines + ["", f"Overall: {first['overall_rule']}.", ""]


def _speed_table(modes: dict) -> list[str]:
    lines = ["## Speed and memory", "",
             "| mode | answers | TTFT p50 / p95 (ms), by scorer | incl. re-prefill p50 / p95 (ms) | "
             "ingest frames/s | total s | peak memory (MiB) |", "|---|---:|---|---|---:|---:|---|"]
    for mode, m in modes.items():
        ttft = "; ".join(f"{SCORER_TITLES[s]} {_ms(v['p50'])} / {_ms(v['p95'])}" for s, v in m["latency_s"].items())
        pre = "; ".join(f"{SCORER_TITLES[s]} {_ms(v['p50'])} / {_ms(v['p95'])}"
                        for s, v in m.get("latency_with_prefill_s", {}).items()) or "-"
        fps = m["ingest"]["frames_per_s"]
        fps = "-" if fps is None else f"{fps:.1f}"
        mem = ", ".join(f"{k} {v:.0f}" for k, v in m["memory_mib"].items()) or "-"
        lines.append(f"| {mode} | {m['answered']} | {ttft or '-'} | {pre} | {fps} | {m['total_s']:.2f} | {mem} |")
    return lines + ["", "TTFT: the wall time of the answering call (`ask_choice`, or `ask` to its first token), "
                        "the stream's ingest excluded (it happens as frames arrive). Memory: the modes share one "
                        "engine whose resets keep its cache buffers (no graph is captured again per video or "
                        "question), so a peak includes buffers sized by other modes; `cache` is the largest "
                        "cache this mode itself held.", ""]


def _parity_lines(p: Optional[dict]) -> list[str]:
    if not p:
        return []
    lines = ["## Parity with the offline (native) path", "",
             f"- events: {p['events']}; same choice (both scorers): {p['same_choice']}; failed: {p['failed']}"]
    if "dtype" in p:
        lines += [f"- dtype {p['dtype']}; max |logit diff| (question's next token) {p['max_abs_logit_diff']:.3g}; "
                  f"max |score diff| option text {p['choice_max_abs_score_diff']:.3g}, "
                  f"letter {p['letter_max_abs_score_diff']:.3g}"]
    lines += [f"- error: {e}" for e in p["errors"]]
    if p["failed"]:
        lines.append("- **PARITY FAILED**: a streamed choice differs from the offline choice in fp32.")
    return lines + [""]


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def _budget(budget: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)


# ------------------------------------------------------------------ PNG

def plot(summary: dict, path: str | os.PathLike):
    """Accuracy per task, category and overall by mode (letter scorer, or the first available), and
    answer latency (p50, p95) by mode: a mode that re-prefills per question is timed with its
    re-prefill (and labelled so). Random weights say so in the title. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = summary["modes"]
    fig, (ax_acc, ax_lat) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    tasks = sorted({t for m in modes.values() for a in m["accuracy"].values() for t in a["tasks"]})
    cats = list(dict.fromkeys(c for m in modes.values() for a in m["accuracy"].values() for c in a["categories"]))
    labels = tasks + [f"[{c}]" for c in cats] + ["OVERALL"]
    width = 0.8 / max(1, len(modes))
    ticks = []
    for k, (mode, m) in enumerate(modes.items()):
        scorer = PLOT_SCORER if PLOT_SCORER in m["accuracy"] else next(iter(m["accuracy"]), None)
        with_prefill = "latency_with_prefill_s" in m
        ticks.append(f"{mode}\n(incl. re-prefill)" if with_prefill else mode)
        if scorer is None:
            continue
        acc = m["accuracy"][scorer]
        values = ([acc["tasks"].get(t, {}).get("acc", 0.0) for t in tasks]
                  + [acc["categories"].get(c, {}).get("acc", 0.0) for c in cats] + [acc["overall"] or 0.0])
        ax_acc.bar([i + k * width for i in range(len(labels))], values, width, label=f"{mode} ({scorer})")
        lat = m["latency_with_prefill_s" if with_prefill else "latency_s"].get(scorer)
        if lat and lat["p50"] is not None:
            ax_lat.bar([k - 0.2], [1000 * lat["p50"]], 0.4, color="C0", label="p50" if k == 0 else None)
            ax_lat.bar([k + 0.2], [1000 * lat["p95"]], 0.4, color="C1", label="p95" if k == 0 else None)
    ax_acc.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title(f"{summary['benchmark']}: accuracy per task, category and overall")
    ax_acc.legend(fontsize=8)
    ax_lat.set_xticks(range(len(modes)), ticks, fontsize=8)
    ax_lat.set_ylabel("answer latency (ms)")
    ax_lat.set_title("time to answer (TTFT, + re-prefill where marked)", fontsize=9)
    ax_lat.legend(fontsize=8)
    if summary.get("random_weights"):
        fig.suptitle(f"{RANDOM_WEIGHTS} (timings are real)", color="red", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
