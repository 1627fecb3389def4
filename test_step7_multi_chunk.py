"""Step 7: performance across chunk sizes (2, 3, 4, 6 frames per append_frames call).

For each chunk size the same --seconds of video is streamed; the report gives encode latency
per chunk and per frame (medians after a warm-up), cache growth per chunk and cache bytes.
The 3-frame case shows the odd-frame handling: a frame is held until its pair arrives, so
chunks alternate between 1 and 2 temporal patches.

    python test_step7_multi_chunk.py [--seconds 2] [--chunks 2,3,4,6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from model.report import WIDTH, check_environment, load_engine, section, video_path
from model.timing import device_info, median, reset_peak, sync, vram
from model.video_io import load_frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--chunks", default="2,3,4,6", help="comma-separated chunk sizes in frames")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--repeats", type=int, default=None, help="streams per chunk size (default 3 on GPU, 1 on CPU)")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def measure(engine, frames, fps, chunk, repeats):
    runs = []
    for _ in range(repeats):
        engine.reset()
        sync()
        reset_peak()
        rows = []
        for i in range(0, len(frames), chunk):
            info = engine.append_frames(frames[i:i + chunk], fps=fps)
            rows.append({"frames": info.frames, "encoded": info.frames_encoded, "tokens_added": info.tokens_added,
                         "cache_len": info.cache_len, "pending": info.pending, "encode_s": info.encode_s})
        runs.append(rows)
    rows = runs[-1]
    steady = [r["encode_s"] for run in runs for r in run[1:]] or [rows[0]["encode_s"]]  # chunk 0 opens the turn
    growth = [r["tokens_added"] for r in rows[1:]] or [rows[0]["tokens_added"]]
    stats = engine.stats()
    return {"chunk": chunk, "chunks": len(rows), "encode_chunk_median_s": median(steady),
            "encode_frame_median_s": median(steady) / chunk, "frames_per_s": chunk / median(steady),
            "cache_growth_tokens": sorted(set(growth)), "cache_growth_median": median(growth),
            "cache_tokens": stats["cache_tokens"], "cache_bytes": stats["cache_bytes"],
            "pending_after": stats["pending_frames"], "vram_mib": vram(), "first_chunks": rows[:4]}


def run(argv=None) -> tuple[dict, int]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    repeats = args.repeats or (3 if cuda else 1)
    section("STEP 7: chunk sizes")
    frames, fps = load_frames(video_path(), args.seconds, size=args.size)
    engine, desc = load_engine(dtype, args.attn)
    print(f"    {desc}; {len(frames)} frames at {fps:g} fps; repeats={repeats}")
    warm = engine.append_frames(frames[:4], fps=fps)  # warm-up (kernels, allocator)
    del warm
    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r = measure(engine, frames, fps, chunk, repeats)
        results.append(r)
        if chunk % 2:
            trace = ", ".join(f"+{c['tokens_added']}{' (1 held)' if c['pending'] else ''}" for c in r["first_chunks"])
            print(f"    {chunk}-frame chunks, first four: {trace}")
    section("RESULTS")
    print(f"  {'chunk':>5} | {'ms/chunk':>9} | {'ms/frame':>8} | {'frames/s':>8} | {'cache +tok/chunk':>16} | "
          f"{'cache tokens':>12} | {'cache MiB':>9}")
    print("  " + "-" * (WIDTH - 2))
    for r in results:
        growth = "/".join(str(g) for g in r["cache_growth_tokens"])
        print(f"  {r['chunk']:>5} | {r['encode_chunk_median_s'] * 1e3:9.1f} | {r['encode_frame_median_s'] * 1e3:8.2f} | "
              f"{r['frames_per_s']:8.1f} | {growth:>16} | {r['cache_tokens']:>12} | {r['cache_bytes'] / 2**20:9.1f}")
    print("  Odd chunk sizes alternate between holding one frame and encoding it with the next chunk's first.")
    ok = len({(r["cache_tokens"], r["pending_after"]) for r in results}) == 1
    if not ok:
        print("FAIL: the same frames must give the same cache length whatever the chunk size")
    meta = {**device_info(), "model": desc, "dtype": dtype, "attn_implementation": engine.attn_implementation,
            "resolution": list(engine.state.frame_size or ()), "fps": fps, "seconds": args.seconds,
            "frames": len(frames), "repeats": repeats}
    out = {"meta": meta, "results": results, "passed": ok}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"    results written to {args.json}")
    return out, 0 if ok else 1


def test_chunk_sizes_give_the_same_cache():
    out, code = run(["--seconds", "0.4", "--repeats", "1"])  # 12 frames: no chunk size ends with a held frame
    assert code == 0
    by = {r["chunk"]: r for r in out["results"]}
    assert by[2]["cache_growth_tokens"] == [by[4]["cache_growth_median"] // 2]
    assert len(by[3]["cache_growth_tokens"]) == 2  # odd chunks alternate 1 and 2 temporal patches


if __name__ == "__main__":
    parse_args()  # --help and bad flags first
    check_environment("QWEN_MODEL_PATH", "VIDEO_PATH")  # every bad path, one line each, exit 2
    sys.exit(run()[1])
