"""Streamed == offline on the GPU with a real architecture (3B by default; ``--arch`` another family's).

fp32 with TF32 off: a stream with a random chunking (1..7 frames a call) is paused at random
points up to 2 s of 448x448 video at 30 fps, and at points past 30k cached tokens; at each,
greedy tokens and the ask_choice choice must equal the offline path's, with the max abs logit
difference reported. bf16: first-token argmax agreement and relative logit difference against
the offline path at 2 s and past 30k tokens. GPU only.

    python benchmarks/bench_exact.py --short-points 16 --long-points 2 --json out.json
    python benchmarks/bench_exact.py --arch qwen3_vl-8b --long-tokens 10000 --short-points 2 --long-points 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import StreamConfig, VideoStreamInference  # noqa: E402
from model.eval.scoring import offline_choice_scores  # noqa: E402
from model.offline import build_inputs, question_events, native_generate, native_logits  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import REAL_CONFIGS, build_processor, build_random_model  # noqa: E402
from model.timing import set_exact_fp32  # noqa: E402

Q, FPS, SIZE = "What is happening in the video right now?", 30, 448
CHOICES = ["a red circle", "a green square", "a blue triangle", "nothing"]


def offline_choice(model, proc, frames) -> int:
    scores, _ = offline_choice_scores(model, proc, Q, CHOICES, frames, FPS)  # the benchmark runner's parity scorer
    return max(range(len(scores)), key=scores.__getitem__)


def pauses(short: int, long: int, long_frames: int, seed: int = 0) -> list[int]:
    """Frame counts to pause at: ``short`` up to 2 s, ``long`` from ``long_frames`` on."""
    rng = random.Random(seed)
    return sorted(set(2 * rng.randint(1, 30) for _ in range(short * 3)))[:short] + [long_frames + 2 * i
                                                                                     for i in range(long)]


def stream_to(engine, frames, points, rng, answer):
    seen, out = 0, []
    for p in points:
        while seen < p:
            c = min(rng.randint(1, 7), p - seen)
            engine.append_frames(frames[seen:seen + c], fps=FPS)
            seen += c
        out.append(answer(engine, p))
    return out


def _factor(arch: str) -> int:
    return 32 if arch.startswith("qwen3") else 28


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short-points", type=int, default=16)
    ap.add_argument("--long-points", type=int, default=2)
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--arch", default="qwen2_5_vl-3b", choices=sorted(REAL_CONFIGS))
    ap.add_argument("--long-tokens", type=int, default=30000, help="the long points' cache length at least")
    args = ap.parse_args(argv)
    config = REAL_CONFIGS[args.arch]
    proc = build_processor(args.arch.split("-")[0])
    per_pair = (SIZE // _factor(args.arch)) ** 2 + 16  # (+16: a Qwen3-VL pair's timestamp and markers)
    points = pauses(args.short_points, args.long_points, 2 * -(-args.long_tokens // (per_pair - 16)))
    frames = synthetic_frames(points[-1], SIZE, SIZE)
    res = {"points_frames": points, "arch": args.arch}
    t0 = time.perf_counter()

    def log(*what):
        print(f"[{time.perf_counter() - t0:6.1f} s]", *what, flush=True)

    # bf16: agreement measures (the paths multiply differently shaped matrices, so they round differently)
    bf16 = []
    if not args.skip_bf16:
        model = build_random_model(config, dtype=torch.bfloat16, device="cuda")
        engine = VideoStreamInference(model, proc, config=StreamConfig())
        for p in (60, points[-1]):
            engine.reset()
            stream_to(engine, frames, [p], random.Random(1), lambda e, p: None)
            a = engine.ask(Q, max_new_tokens=1).first_logits
            ref = native_logits(model, build_inputs(model, proc, question_events(Q, frames[:p], FPS)))[0, -1]
            bf16.append({"frames": p, "tokens": engine.kv.get_seq_length(),
                         "argmax_equal": int(a.argmax()) == int(ref.argmax()),
                         "rel_logit_diff": float((a - ref).norm() / ref.norm())})
            log("bf16", bf16[-1])
        del engine, model
        torch.cuda.empty_cache()
    res["bf16"] = bf16
    json.dump(res, open(args.json, "w"), indent=1) if args.json else None
    set_exact_fp32()
    model = build_random_model(config, dtype=torch.float32, device="cuda")
    engine = VideoStreamInference(model, proc, config=StreamConfig())
    log("fp32 model built")
    # as a user would start a long stream: capacity for the last point reserved and the graphs captured once
    # (without it the cache grows x1.5 at a time and every growth captures the graphs again, in fp32)
    engine.warmup((SIZE, SIZE), 4, fps=FPS, capacity=points[-1] // 2 * per_pair + 4096)
    log("fp32 engine warmed up")
    rows = []

    def check(e, p):  # at a pause: the stream's answers, then the offline path's on the same frames
        ans, choice, tokens = e.ask(Q, max_new_tokens=8), e.ask_choice(Q, CHOICES).index, e.kv.get_seq_length()
        log(f"streamed to {p} frames ({tokens} tokens) and asked")
        ref = native_generate(model, build_inputs(model, proc, question_events(Q, frames[:p], FPS)), 8, e.stop_ids)
        rows.append({"frames": p, "tokens": tokens, "greedy_equal": ans.token_ids == ref.token_ids,
                     "choice_equal": choice == offline_choice(model, proc, frames[:p]),
                     "max_abs_logit_diff": float((ans.first_logits - ref.first_logits).abs().max())})
        log("fp32", rows[-1])
        res["fp32"] = rows
        json.dump(res, open(args.json, "w"), indent=1) if args.json else None

    stream_to(engine, frames, points, random.Random(0), check)
    res["fp32"] = rows
    res["fp32_summary"] = {"points": len(rows), "greedy_equal": sum(r["greedy_equal"] for r in rows),
                           "choice_equal": sum(r["choice_equal"] for r in rows),
                           "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
                           "backends": {k: engine.stats()[k] for k in ("text_attention", "cuda_graphs", "vision_graphs")}}
    print(res["fp32_summary"])
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
