"""Tune the live-length Triton kernel's launch (rows per program, warps, stages) per shape. GPU only.

For the shapes the stream runs (a decode step, a question, a video chunk) of the real
architectures (Qwen2.5-VL-3B: 16 query / 2 K/V heads; Qwen3-VL-2B: 16 / 8; Qwen3-VL-8B: 32 / 8;
head dim 128) over 30k and 190k cached tokens, time every launch configuration (CUDA events,
median of repeats), check each against the default's output, and print the best per shape with
its speed-up and its share of the floor (K/V bytes read once over the copy bandwidth, or the
attention FLOPs over the matmul rate, whichever is larger).

    python benchmarks/tune_attention.py --json tune.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import triton_attention as ta  # noqa: E402

ARCHS = {"qwen2_5_vl-3b": (16, 2), "qwen3_vl-2b": (16, 8), "qwen3_vl-8b": (32, 8)}
ROWS = {"decode": 1, "question": 30, "chunk": 424}  # a 4-frame Qwen3-VL chunk is ~424 tokens (3B: 512)
D = 128


def timed(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--keys", default="30000,190000")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    bw, rate = 4.1e12, 7.7e14  # measured ceilings (copy, bf16 matmul), BENCHMARKS.md
    rows_out = []
    for (arch, (hq, hkv)), (kind, n), keys in itertools.product(ARCHS.items(), ROWS.items(),
                                                               map(int, args.keys.split(","))):
        n = 512 if (kind == "chunk" and arch.startswith("qwen2_5")) else n
        m = (hq // hkv) * n
        torch.manual_seed(0)
        q = torch.randn(1, hq, n, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, keys + n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        start = torch.tensor(keys, device=dev)
        ref = ta.attention(q, k, v, start, D ** -0.5)
        default = ta.launch_config(m)
        floor_ms = 1e3 * max(2 * hkv * (keys + n) * D * 2 / bw, 4 * hq * n * (keys + n) * D / rate)
        results = []
        for bm, warps, stages in itertools.product((16, 32, 64, 128), (4, 8), (2, 3, 4)):
            if bm > 16 and m <= 16 or bm == 128 and m <= 32:
                continue
            try:
                out = ta.attention(q, k, v, start, D ** -0.5, launch=(bm, warps, stages))
                err = float((out.float() - ref.float()).abs().max())
                ms = timed(lambda: ta.attention(q, k, v, start, D ** -0.5, launch=(bm, warps, stages)))
            except Exception as e:  # a configuration out of resources: skipped, said
                print(f"   {arch} {kind} {keys}: {(bm, warps, stages)} failed: {str(e).splitlines()[0][:80]}")
                continue
            results.append({"launch": [bm, warps, stages], "ms": ms, "max_err": err})
        base = next(r for r in results if tuple(r["launch"]) == default)
        best = min(results, key=lambda r: r["ms"])
        row = {"arch": arch, "kind": kind, "rows": n, "folded": m, "keys": keys, "default": base, "best": best,
               "speedup": base["ms"] / best["ms"], "floor_ms": floor_ms, "all": results}
        rows_out.append(row)
        print(f"{arch:>14} {kind:>8} n={n:<4} keys={keys:<6} default {base['ms']:7.3f} ms {tuple(default)} | best "
              f"{best['ms']:7.3f} ms {tuple(best['launch'])} x{row['speedup']:.2f} err {best['max_err']:.1e} | "
              f"floor {floor_ms:.3f} ms ({100 * floor_ms / best['ms']:.0f}%)", flush=True)
    if args.json:
        json.dump(rows_out, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
