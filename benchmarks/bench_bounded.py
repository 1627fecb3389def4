"""Bounded-memory soak (issue 8): one long stream under a cache budget, through the public API only.

One stream from an empty cache, frames appended chunk by chunk as they arrive (synthetic video,
cycled), a 1-token question every ``--ask-every`` seconds of video. Reports per 5-minute window
chunk and TTFT p50/p95/max, kept tokens, process memory (GPU: peak allocated per window; CPU:
resident set), graph captures after warm-up, and compares the first 5 minutes after the budget
filled with the last 5. With ``--recall-grids K`` it also reports host bytes and the recalled
grids. The GPU run is the issue's: 1 hour of 448x448 at 2 fps (1,800 4-frame chunks) with a
64k-token budget on the random 3B architecture:

    python benchmarks/bench_bounded.py --minutes 60 --budget-tokens 65536 --out out/
    python benchmarks/bench_bounded.py --minutes 60 --budget-tokens 65536 --recall-grids 16 --out out/

On a CPU it runs the tiny random model (``--size 112``), for the shape of the curves only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import StreamConfig, VideoStreamInference  # noqa: E402
from percentiles import pct, row, summary  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import QWEN25_VL_3B_CONFIG, build_3b_processor, build_random_model, build_tiny_model  # noqa: E402
from model.timing import GIB, device_info, sync  # noqa: E402

Q = "What is happening in the video right now?"
WINDOW_S = 300.0



def memory_gib(cuda: bool) -> float:
    """GPU: peak allocated since the last reset; CPU: the process's peak resident set."""
    if cuda:
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def soak(engine, args, cuda: bool, twin=None) -> dict:
    """``twin``: an engine without recall fed the same frames, asked the same questions (recall's cost)."""
    fps, size, chunk = args.fps, args.size, args.chunk
    n_frames = int(args.minutes * 60 * fps)
    frames = synthetic_frames(min(n_frames, 600), size, size)  # cycled: content does not change the cost
    warm = engine.warmup((size, size), chunk, fps=fps, capacity=args.capacity)
    if twin is not None:
        twin.warmup((size, size), chunk, fps=fps, capacity=args.capacity)
    captures_after_warmup = engine.stats()["cuda_graphs"]
    rows, asks, filled_at = [], [], None
    next_ask = args.ask_every
    for i in range(0, n_frames, chunk):
        batch = [frames[(i + k) % len(frames)] for k in range(min(chunk, n_frames - i))]
        sync()
        t0 = time.perf_counter()
        info = engine.append_frames(batch, fps=fps)
        sync()
        t = (i + len(batch)) / fps
        stats = engine.stats()
        if filled_at is None and stats["evicted_tokens"]:
            filled_at = t
        rows.append({"t": t, "ms": 1e3 * (time.perf_counter() - t0), "kept": info.cache_len,
                     "mem_gib": memory_gib(cuda)})
        if twin is not None:
            twin.append_frames(batch, fps=fps)
        if t >= next_ask:
            next_ask += args.ask_every
            sync()
            t0 = time.perf_counter()
            ans = engine.ask(Q, max_new_tokens=1)
            asks.append({"t": t, "ttft_ms": 1e3 * ans.ttft_s, "wall_ms": 1e3 * (time.perf_counter() - t0),
                         "recalled": len(ans.recalled)})
            if twin is not None:
                asks[-1]["twin_ttft_ms"] = 1e3 * twin.ask(Q, max_new_tokens=1).ttft_s
    end = engine.stats()
    return {"frames": n_frames, "warmup": warm, "filled_at_s": filled_at, "chunks": rows, "questions": asks,
            "graphs_after_warmup": captures_after_warmup, "graphs_at_end": end["cuda_graphs"],
            "stats_at_end": {k: v for k, v in end.items() if isinstance(v, (int, float, str, type(None)))}}


def windows(rows, asks, width) -> list:
    out, t, end = [], 0.0, max(r["t"] for r in rows)
    while t < end:
        c = [r for r in rows if t < r["t"] <= t + width]
        q = [a["ttft_ms"] for a in asks if t < a["t"] <= t + width]
        out.append({"from_s": t, "to_s": t + width, "chunk": summary([r["ms"] for r in c]), "ttft": summary(q),
                    "kept": max(r["kept"] for r in c), "mem_gib": max(r["mem_gib"] for r in c)})
        t += width
    return out


def compare_ends(result) -> dict:
    """p95 of chunk and TTFT: the first 5 minutes after the budget filled vs the last 5 minutes."""
    rows, asks, start = result["chunks"], result["questions"], result["filled_at_s"]
    if start is None:
        return {}
    end = rows[-1]["t"]

    def p95(xs, a, b, key):
        return pct([x[key] for x in xs if a < x["t"] <= b], 95)

    first = {"chunk_p95_ms": p95(rows, start, start + WINDOW_S, "ms"), "ttft_p95_ms": p95(asks, start, start + WINDOW_S, "ttft_ms")}
    last = {"chunk_p95_ms": p95(rows, end - WINDOW_S, end, "ms"), "ttft_p95_ms": p95(asks, end - WINDOW_S, end, "ttft_ms")}
    return {"first_5min_after_fill": first, "last_5min": last,
            "ratio": {k: last[k] / first[k] if first[k] else float("nan") for k in first}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--size", type=int, default=None, help="frame side (default 448 on a GPU, 112 on CPU)")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--ask-every", type=float, default=10.0, help="seconds of video between questions")
    p.add_argument("--budget-tokens", type=int, default=65536)
    p.add_argument("--window-seconds", type=float, default=None)
    p.add_argument("--sink-frames", type=int, default=2)
    p.add_argument("--recall-grids", type=int, default=0)
    p.add_argument("--recall-host-tokens", type=int, default=262_144, help="evicted tokens kept on the host for recall")
    p.add_argument("--capacity", type=int, default=None, help="tokens reserved by warmup (default budget + 4096)")
    p.add_argument("--compare-recall", action="store_true",
                   help="with --recall-grids: also stream a twin without recall and report the TTFT recall adds "
                        "(memory figures then include the twin)")
    p.add_argument("--out", default="out")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or (448 if cuda else 112)
    args.capacity = args.capacity or args.budget_tokens + 4096
    config = StreamConfig(cache_budget_tokens=args.budget_tokens, video_window_seconds=args.window_seconds,
                          sink_frames=args.sink_frames, recall_grids=args.recall_grids,
                          recall_host_tokens=args.recall_host_tokens)
    if cuda:
        model = build_random_model(QWEN25_VL_3B_CONFIG, dtype=torch.bfloat16, device="cuda")
        engine, what = VideoStreamInference(model, build_3b_processor(), config=config), "random 3B, bf16"
        weights = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    else:
        model, proc = build_tiny_model()
        engine, what, weights = VideoStreamInference(model, proc, config=config), "tiny random model, fp32 (CPU)", 0.0
    twin = None
    if args.compare_recall and args.recall_grids:
        twin = VideoStreamInference(engine.model, engine.processor, config=config.replace(recall_grids=0))
    result = {"machine": device_info(), "model": what, "args": vars(args), "config": repr(config),
              "weights_gib": weights, **soak(engine, args, cuda, twin)}
    if twin is not None:  # what recalling costs a question, after the first eviction
        extra = [a["ttft_ms"] - a["twin_ttft_ms"] for a in result["questions"]
                 if result["filled_at_s"] is not None and a["t"] > result["filled_at_s"]]
        result["recall_extra_ttft_ms"] = summary(extra)
    result["windows"] = windows(result["chunks"], result["questions"], WINDOW_S)
    result["ends"] = compare_ends(result)
    print_table(result)
    os.makedirs(args.out, exist_ok=True)
    name = f"bounded-{args.minutes:g}min-{args.budget_tokens}tok-recall{args.recall_grids}"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, name + ".png"))
    print(f"wrote {args.out}/{name}.json and .png")
    return 0


def print_table(r) -> None:
    a = r["args"]
    print(f"== {r['model']}: {a['minutes']:g} min at {a['fps']:g} fps, {a['size']}px, {a['chunk']}-frame chunks, "
          f"budget {a['budget_tokens']} tokens, recall {a['recall_grids']}; budget filled at {r['filled_at_s']} s")
    print(f"   graphs after warm-up {r['graphs_after_warmup']} -> at the end {r['graphs_at_end']}; "
          f"weights {r['weights_gib']:.2f} GiB")
    print(f"   {'window':>13} | {'kept':>6} | {'chunk p50/p95/max ms':>22} | {'TTFT p50/p95/max ms':>22} | mem GiB")
    for w in r["windows"]:
        c, q = w["chunk"], w["ttft"]
        print(f"   {w['from_s']:5.0f}-{w['to_s']:<6.0f}s | {w['kept']:6d} | {row(c)} | {row(q)} | {w['mem_gib']:.3f}")
    if r["ends"]:
        print(f"   first 5 min after fill vs last 5 min: {r['ends']}")
    if "recall_extra_ttft_ms" in r:
        print(f"   TTFT recall adds (vs the twin without recall) p50/p95/max ms: {row(r['recall_extra_ttft_ms'])}")
    s = r["stats_at_end"]
    print(f"   kept {s['cache_tokens']} of {s['transcript_tokens']} tokens; evicted {s['evicted_seconds']:.0f} s; "
          f"host {s['recall_host_bytes'] / GIB:.3f} GiB for {s['stored_seconds']:.0f} s stored")


def plot(r, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    a1.plot([x["t"] / 60 for x in r["chunks"]], [x["ms"] for x in r["chunks"]], ",", alpha=0.5)
    a1.set(xlabel="video (min)", ylabel="chunk append (ms)", title="chunks")
    a2.plot([x["t"] / 60 for x in r["questions"]], [x["ttft_ms"] for x in r["questions"]], ".")
    a2.set(xlabel="video (min)", ylabel="TTFT (ms)", title="questions")
    a3.plot([x["t"] / 60 for x in r["chunks"]], [x["mem_gib"] for x in r["chunks"]])
    a3.set(xlabel="video (min)", ylabel="peak memory (GiB)", title="memory")
    for ax in (a1, a2, a3):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{r['model']}, budget {r['args']['budget_tokens']} tokens, recall {r['args']['recall_grids']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
