"""Continuous-stream benchmark (issue 7): what a user sees while streaming, through the public API only.

One stream from an empty cache, frames appended chunk by chunk as they would arrive, a
question at every checkpoint of video time; nothing reaches into the cache. Reports per 10 s
window chunk and TTFT p50/p95/max, decode tokens/s and ask_choice at the start and the end,
memory, graph captures and cache allocations during the stream, stalls (a call over 2x the
median of its 10 neighbours), plus the eager engine and the native path on shorter videos, the
card's ceilings and floors, and (``--exact``) fp32 greedy/choice agreement with the offline path.

    python benchmarks/bench_stream.py --out out/ --streams fast60,long10 --eager-seconds 16 --native 2,16
    python benchmarks/bench_stream.py --arch qwen3_vl-8b --streams fast60 --out out/   # another family

``first_calls``: the first call of each kind after ``warmup()`` (question, decode, ask_choice, a
choice set of a new length, ask_stream) against the median of its next calls.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import StreamConfig, VideoStreamInference  # noqa: E402
from percentiles import row, summary  # noqa: E402
from model.offline import build_inputs, question_events, native_generate  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import REAL_CONFIGS, build_processor, build_random_model  # noqa: E402
from model.timing import GIB, device_info, sync  # noqa: E402

Q = "What is happening in the video right now?"
CHOICES = ["a red circle", "a green square", "a blue triangle", "nothing"]
SIZE, CHUNK = 448, 4
STREAMS = {  # name: (seconds, fps, question every s)
    "fast60": (60, 30, 2), "long10": (600, 2, 5), "fast16": (16, 30, 2), "fast2": (2, 30, 1),
}



def stalls(xs) -> int:
    """Calls over 2x the median of their (up to) 10 neighbours."""
    out = 0
    for i, x in enumerate(xs):
        nb = xs[max(0, i - 5):i] + xs[i + 1:i + 6]
        out += bool(nb) and x > 2 * statistics.median(nb)
    return out


def timed(fn):
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return r, time.perf_counter() - t0


def decode_and_choice(engine) -> dict:
    stops, engine.stop_ids = engine.stop_ids, set()  # random weights: decode all 64 tokens
    answers = [engine.ask(Q, max_new_tokens=64) for _ in range(2)]
    engine.stop_ids = stops
    choice = [timed(lambda: engine.ask_choice(Q, CHOICES))[1] for _ in range(4)]
    return {"decode_tps": answers[-1].tokens_per_s, "choice4_ms": 1e3 * statistics.median(choice[1:])}


def first_calls(engine) -> dict:
    """Each kind of call right after warmup() (the first) against the median of the next three (ms)."""
    stops, engine.stop_ids = engine.stop_ids, set()
    kinds = {
        "question": lambda: engine.ask(Q, max_new_tokens=1),
        "answer_16_tokens": lambda: engine.ask(Q, max_new_tokens=16),
        "ask_choice_4": lambda: engine.ask_choice(Q, CHOICES),
        "ask_choice_new_length": lambda: engine.ask_choice(Q, CHOICES + ["something else entirely"]),
        "ask_stream_16": lambda: "".join(engine.ask_stream(Q, max_new_tokens=16)),
    }
    out = {}
    for name, call in kinds.items():
        ms = [1e3 * timed(call)[1] for _ in range(4)]
        out[name] = {"first_ms": ms[0], "next_median_ms": statistics.median(ms[1:])}
    engine.stop_ids = stops
    return out


def profile_calls(engine, frames, fps, n_frames, stem) -> dict:
    """Each kind of call at the end of the stream under the torch profiler: wall ms against the device's
    kernel ms per call (launch-bound when kernels fill little of the wall), tables in STEM_KIND.txt."""
    stops, engine.stop_ids = engine.stop_ids, set()
    starts = iter(range(n_frames, n_frames + 10**6, CHUNK))

    def chunk():
        i = next(starts)
        return engine.append_frames([frames[(i + k) % len(frames)] for k in range(CHUNK)], fps=fps)

    kinds = {
        "chunk": chunk,
        "question": lambda: engine.ask(Q, max_new_tokens=1),
        "decode_32": lambda: engine.ask(Q, max_new_tokens=32),
        "ask_choice_4": lambda: engine.ask_choice(Q, CHOICES),
    }
    out = {}
    for kind, call in kinds.items():
        call()  # not the first of its kind
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            _, wall = timed(call)
        events = prof.key_averages()
        kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
        with open(f"{stem}_{kind}.txt", "w") as f:
            f.write(f"{kind}: wall {1e3 * wall:.1f} ms (profiled), device kernels {kernel_ms:.1f} ms\n\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
        out[kind] = {"wall_ms": 1e3 * wall, "kernel_ms": kernel_ms}
        print(f"   profile {kind}: wall {1e3 * wall:.1f} ms, device kernels {kernel_ms:.1f} ms")
    engine.stop_ids = stops
    return out


def run_stream(model, proc, name: str, config: StreamConfig, warm: bool = True, profile_dir: str | None = None) -> dict:
    seconds, fps, every = STREAMS[name]
    n_frames = int(seconds * fps)
    factor = engine_factor(model, proc)
    tokens = n_frames // 2 * ((SIZE // factor) ** 2 + 16) + 4096  # (+16: a Qwen3-VL pair's timestamp and markers)
    engine = VideoStreamInference(model, proc, config=config)
    gc.collect()  # engines of earlier runs (and their graphs) are gone before the baseline is read
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    warm_info = engine.warmup((SIZE, SIZE), CHUNK, fps=fps, capacity=tokens) if warm else {}
    before = engine.stats()
    rows, asks, extra = [], [], {}
    pauses = []  # garbage-collector passes during the stream: (generation, ms)
    gc_start = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            pauses.append((info["generation"], 1e3 * (time.perf_counter() - gc_start.pop("t"))))

    gc.callbacks.append(on_gc)
    per_check = int(round(every * fps))
    frames = synthetic_frames(min(n_frames, 1200), SIZE, SIZE)  # cycled: content does not change the cost
    if warm:  # the first call of each kind after warm-up, on a stream of one chunk
        engine.append_frames(frames[:CHUNK], fps=fps)
        extra["first_calls"] = first_calls(engine)
        engine.reset(keep_memory=True)
    for i in range(0, n_frames, CHUNK):
        chunk = [frames[(i + k) % len(frames)] for k in range(min(CHUNK, n_frames - i))]
        info, dt = timed(lambda: engine.append_frames(chunk, fps=fps))
        t_video = (i + len(chunk)) / fps
        rows.append({"t": t_video, "ms": 1e3 * dt, "cache": info.cache_len})
        if (i + len(chunk)) % per_check < CHUNK:
            ans, wall = timed(lambda: engine.ask(Q, max_new_tokens=1))
            asks.append({"t": t_video, "ttft_ms": 1e3 * ans.ttft_s, "wall_ms": 1e3 * wall, "cache": info.cache_len})
        if abs(t_video - 2.0) < CHUNK / fps / 2 and "at_2s" not in extra and seconds > 2:
            extra["at_2s"] = decode_and_choice(engine)
    gc.callbacks.remove(on_gc)
    extra["at_end"] = decode_and_choice(engine)
    if profile_dir:
        extra["profile"] = profile_calls(engine, frames, fps, n_frames, os.path.join(profile_dir, name))
    after = engine.stats()
    peak = torch.cuda.max_memory_allocated()
    out = {
        "name": name, "seconds": seconds, "fps": fps, "frames": n_frames, "config": repr(config),
        "warmup": warm_info, "chunks": rows, "questions": asks, **extra,
        "cache_tokens": engine.kv.get_seq_length(), "weights_gib": weights / GIB,
        "cache_live_gib": engine.kv.nbytes() / GIB, "cache_reserved_gib": engine.kv.reserved_bytes() / GIB,
        "peak_gib": peak / GIB, "over_weights_and_reserved_gib": (peak - weights - engine.kv.reserved_bytes()) / GIB,
        "graphs_before": before["cuda_graphs"], "graphs_after": after["cuda_graphs"],
        "vision_graphs_after": after["vision_graphs"],
        "cache_allocations_during_stream": after["cache_allocations"] - before["cache_allocations"],
        "stalls_chunks": stalls([r["ms"] for r in rows]), "stalls_questions": stalls([a["ttft_ms"] for a in asks]),
        "gc_passes": {g: {"n": sum(1 for x in pauses if x[0] == g), "max_ms": max([x[1] for x in pauses if x[0] == g],
                                                                              default=0.0)} for g in (0, 1, 2)},
        "backends": {k: after[k] for k in ("text_attention", "vision_attention", "cuda_graphs", "vision_graphs")},
    }
    out["windows"] = windows(rows, asks, 10 if seconds <= 120 else 60)
    print_stream(out)
    del engine
    torch.cuda.empty_cache()
    return out


def windows(rows, asks, width) -> list:
    res, end = [], max(r["t"] for r in rows)
    t = 0.0
    while t < end:
        c = [r["ms"] for r in rows if t < r["t"] <= t + width]
        q = [a["ttft_ms"] for a in asks if t < a["t"] <= t + width]
        res.append({"from_s": t, "to_s": t + width, "chunk": summary(c), "ttft": summary(q),
                    "cache_tokens": max(r["cache"] for r in rows if r["t"] <= t + width)})
        t += width
    return res


def print_stream(r):
    print(f"\n== {r['name']}: {r['seconds']} s at {r['fps']} fps, {r['cache_tokens']} tokens; backends {r['backends']}")
    print(f"   warm-up {r['warmup'].get('seconds', 0):.1f} s; graphs {r['graphs_before']} -> {r['graphs_after']}; "
          f"cache allocations during the stream {r['cache_allocations_during_stream']}; stalls: chunks "
          f"{r['stalls_chunks']}, questions {r['stalls_questions']}; gc passes {r['gc_passes']}")
    print(f"   {'window':>12} | {'tokens':>7} | {'chunk p50/p95/max ms':>22} | {'TTFT p50/p95/max ms':>22}")
    for w in r["windows"]:
        c, q = w["chunk"], w["ttft"]
        print(f"   {w['from_s']:5.0f}-{w['to_s']:<5.0f}s | {w['cache_tokens']:7d} | {row(c)} | {row(q)}")
    for kind, v in r.get("first_calls", {}).items():
        print(f"   first {kind} after warm-up: {v['first_ms']:.1f} ms (next calls' median {v['next_median_ms']:.1f} ms)")
    for k in ("at_2s", "at_end"):
        if k in r:
            print(f"   {k}: decode {r[k]['decode_tps']:.0f} tokens/s, ask_choice(4) {r[k]['choice4_ms']:.1f} ms")
    print(f"   memory: weights {r['weights_gib']:.2f} GiB, cache live {r['cache_live_gib']:.2f} / reserved "
          f"{r['cache_reserved_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, over weights+reserved "
          f"{r['over_weights_and_reserved_gib']:.2f} GiB")


def native(model, proc, seconds: float, fps: int = 30) -> dict:
    frames = synthetic_frames(int(seconds * fps), SIZE, SIZE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = []
    for _ in range(2):
        inputs, prep = timed(lambda: build_inputs(model, proc, question_events(Q, frames, fps)))
        ans = native_generate(model, inputs, 1, set())
        res.append(1e3 * (prep + ans.ttft_s))
    return {"seconds": seconds, "tokens": inputs.num_tokens, "ttft_ms": res[-1], "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = min(timed(lambda: a @ a)[1] for _ in range(10))
    x = torch.randn(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    cp = min(timed(lambda: y.copy_(x))[1] for _ in range(10))
    return {"matmul_tflops": 2 * 8192**3 / mm / 1e12, "copy_gbps": 2 * x.numel() * 4 / cp / 1e9}


def engine_factor(model, proc) -> int:
    """Pixels per merged token side (28: Qwen2/2.5-VL, 32: Qwen3-VL)."""
    return model.family.video_pixels(proc).factor


def floors(ceil: dict, model, tokens: int) -> dict:
    """Memory floors of a decode step: the language model's weights (the vision tower's excluded) plus the K/V
    read once (the model's bytes per token)."""
    bw = ceil["copy_gbps"] * 1e9
    lm = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".visual." not in f".{n}")
    layers, heads, dim = model.kv_shape()
    kv = 2 * layers * heads * dim * 2 * tokens
    return {"decode_ms": 1e3 * (lm + kv) / bw, "ttft_ms": 1e3 * (lm + kv) / bw, "lm_weights_gb": lm / 1e9,
            "kv_bytes_per_token": 2 * layers * heads * dim * 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out")
    p.add_argument("--streams", default="fast60,long10", help=f"comma-separated, from {list(STREAMS)}")
    p.add_argument("--eager-seconds", default="", help="eager engine stream names, e.g. fast16")
    p.add_argument("--native", default="", help="native path at these video lengths (s), e.g. 2,16")
    p.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="at each stream's end, profile a chunk, a question, a 32-token answer and ask_choice (tables in --out)")
    p.add_argument("--arch", default="qwen2_5_vl-3b", choices=sorted(REAL_CONFIGS),
                   help="the architecture (random weights)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res = {"meta": {**device_info(), "dtype": "bfloat16", "resolution": [SIZE, SIZE], "chunk": CHUNK,
                    "command": "python benchmarks/bench_stream.py " + " ".join(argv or sys.argv[1:])}}
    res["ceilings"] = ceilings()
    print(res["meta"], res["ceilings"])
    res["meta"]["arch"] = args.arch
    model = build_random_model(REAL_CONFIGS[args.arch], dtype=torch.bfloat16, device="cuda")
    proc = build_processor(args.arch.split("-")[0])
    fast = StreamConfig(attention_kernel=args.kernel)
    for name in filter(None, args.streams.split(",")):
        res[name] = run_stream(model, proc, name, fast, warm=not args.no_warmup,
                               profile_dir=args.out if args.profile else None)
        res[name]["floors"] = floors(res["ceilings"], model, res[name]["cache_tokens"])
        json.dump(res, open(os.path.join(args.out, "bench_stream.json"), "w"), indent=1)
    for name in filter(None, args.eager_seconds.split(",")):
        res["eager_" + name] = run_stream(model, proc, name, StreamConfig(fast=False), warm=False)
    for sec in filter(None, args.native.split(",")):
        res[f"native_{sec}s"] = native(model, proc, float(sec))
        print(f"   native {sec} s: {res[f'native_{sec}s']}")
    json.dump(res, open(os.path.join(args.out, "bench_stream.json"), "w"), indent=1)
    plot(res, os.path.join(args.out, "bench_stream.png"))
    return 0


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [v for v in res.values() if isinstance(v, dict) and "chunks" in v]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.plot([c["t"] for c in r["chunks"]], [c["ms"] for c in r["chunks"]], ".", ms=2, label="chunk append (ms)")
        ax.plot([q["t"] for q in r["questions"]], [q["ttft_ms"] for q in r["questions"]], "s", ms=3, label="question TTFT (ms)")
        ax.axhline(1e3 * CHUNK / r["fps"], color="gray", lw=0.8, label=f"real time ({CHUNK} frames at {r['fps']} fps)")
        ax.set(xlabel="video time (s)", ylabel="ms", yscale="log", title=f"{r['name']}: {r['backends']['text_attention']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['meta']['card']}, bf16, {SIZE}x{SIZE}, {res['meta'].get('arch', 'qwen2_5_vl-3b')} arch "
                 "(random weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
