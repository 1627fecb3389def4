"""Many streams over one model (issue 12's GPU row): 8 streams of 448x448 video at 2 fps, driven interleaved.

Each stream is its own ``VideoStreamInference`` over ONE random-weight 3B model; chunks of 4
frames are appended round-robin (as if 8 cameras shared the GPU) and each stream asks a
1-token question every 10 s of its own video. Reports per-stream TTFT p50/p95, aggregate
frames/s, and memory against weights once + the sum of the caches. GPU only.

    python benchmarks/bench_streams.py --streams 8 --seconds 60 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import VideoStreamInference  # noqa: E402
from percentiles import pct  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import QWEN25_VL_3B_CONFIG, build_3b_processor, build_random_model  # noqa: E402
from model.timing import GIB, device_info, sync  # noqa: E402

SIZE, CHUNK, FPS, EVERY = 448, 4, 2, 10
Q = "What is happening right now?"


def live_by_origin(top: int = 12) -> dict:
    """Live CUDA memory now, grouped by the innermost frame of this project that allocated it."""
    groups: dict = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for block in seg["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = block.get("frames") or []
            ours = [f for f in frames if "/model/" in f["filename"] or "/benchmarks/" in f["filename"]]
            where = f"{ours[0]['filename'].split('/')[-1]}:{ours[0]['line']} {ours[0]['name']}" if ours else "?"
            groups[where] = groups.get(where, 0) + block["size"]
    return {k: v / GIB for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--json")
    ap.add_argument("--memory-history", action="store_true",
                    help="record allocations' stacks and report the live memory by where it was allocated")
    args = ap.parse_args(argv)
    if args.memory_history:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    model = build_random_model(QWEN25_VL_3B_CONFIG, dtype=torch.bfloat16, device="cuda")
    proc = build_3b_processor()
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    n_frames = args.seconds * FPS
    capacity = n_frames // 2 * (SIZE // 28) ** 2 + 2048
    engines = [VideoStreamInference(model, proc) for _ in range(args.streams)]
    t0 = time.perf_counter()
    for e in engines:
        e.warmup((SIZE, SIZE), CHUNK, fps=FPS, capacity=capacity)
    warm_s = time.perf_counter() - t0
    peak_warm = torch.cuda.max_memory_allocated()
    live_warm = torch.cuda.memory_allocated()
    videos = [synthetic_frames(n_frames, SIZE, SIZE, seed=k) for k in range(args.streams)]
    ttft = [[] for _ in engines]
    peaks = {"append_frames": 0, "ask": 0}  # streaming's own peaks, per call kind, apart from the warm-up

    def peak_of(kind, call):
        torch.cuda.reset_peak_memory_stats()
        out = call()
        peaks[kind] = max(peaks[kind], torch.cuda.max_memory_allocated())
        return out

    sync()
    t0 = time.perf_counter()
    for i in range(0, n_frames, CHUNK):
        for k, e in enumerate(engines):
            peak_of("append_frames", lambda: e.append_frames(videos[k][i:i + CHUNK], fps=FPS))
            if (i + CHUNK) % (EVERY * FPS) == 0:
                ttft[k].append(1e3 * peak_of("ask", lambda: e.ask(Q, max_new_tokens=1)).ttft_s)
    sync()
    wall = time.perf_counter() - t0
    caches = sum(e.kv.reserved_bytes() for e in engines)
    peak = max(peaks.values())
    res = {"meta": device_info(), "streams": args.streams, "seconds_each": args.seconds, "fps": FPS,
           "warmup_s": warm_s, "wall_s": wall, "aggregate_frames_per_s": args.streams * n_frames / wall,
           "ttft_ms": [{"p50": pct(t, 50), "p95": pct(t, 95), "n": len(t)} for t in ttft],
           "weights_gib": weights / GIB, "caches_reserved_gib": caches / GIB, "peak_gib": peak / GIB,
           "over_weights_and_caches_gib": (peak - weights - caches) / GIB,
           "peak_during_warmup_gib": peak_warm / GIB, "over_weights_and_caches_warmup_gib": (peak_warm - weights - caches) / GIB,
           "live_after_warmup_over_weights_and_caches_gib": (live_warm - weights - caches) / GIB,
           "peak_over_weights_and_caches_gib_by_call": {k: (v - weights - caches) / GIB for k, v in peaks.items()},
           "live_at_end_by_origin_gib": live_by_origin() if args.memory_history else None,
           "backends": {k: engines[0].stats()[k] for k in ("text_attention", "cuda_graphs", "vision_graphs")}}
    print(json.dumps({k: v for k, v in res.items() if k != "ttft_ms"}, indent=1))
    for k, t in enumerate(res["ttft_ms"]):
        print(f"   stream {k}: TTFT p50 {t['p50']:.1f} ms, p95 {t['p95']:.1f} ms ({t['n']} questions)")
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
