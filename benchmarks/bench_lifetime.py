"""Engine lifetime on the GPU (issue 20): does device memory return to the weights' level?

One model (random weights of a real architecture), then engines used one after another as a
service would: each is warmed up (``warmup(freeze_gc=True)``, graphs captured), streams
``--seconds`` of 448x448 video at 30 fps (4-frame chunks) with questions, and is then ended one
way: ``del`` (no ``gc.collect()``), ``close()``, ``with`` block, ``reset()``, ``reset(keep_memory=True)``.
Reports memory allocated (GiB) after each, against the weights alone. GPU only.

    python benchmarks/bench_lifetime.py --arch qwen2_5_vl-3b --seconds 10 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import VideoStreamInference  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import REAL_CONFIGS, build_processor, build_random_model  # noqa: E402
from model.timing import GIB, device_info  # noqa: E402

SIZE, CHUNK, FPS = 448, 4, 30


def used(model, proc, frames, seconds: float) -> VideoStreamInference:
    engine = VideoStreamInference(model, proc)
    engine.warmup((SIZE, SIZE), CHUNK, fps=FPS, capacity=int(seconds * FPS) // 2 * 260 + 4096)
    for i in range(0, int(seconds * FPS), CHUNK):
        engine.append_frames(frames[i % len(frames):i % len(frames) + CHUNK], fps=FPS)
        if i % (2 * FPS) == 0:
            engine.ask("What is happening?", max_new_tokens=4)
    return engine


def gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / GIB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2_5_vl-3b", choices=sorted(REAL_CONFIGS))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = build_random_model(REAL_CONFIGS[args.arch], dtype=torch.bfloat16, device="cuda")
    proc = build_processor(args.arch.split("-")[0])
    frames = synthetic_frames(240, SIZE, SIZE)
    weights = gib()
    rows = []

    def record(how: str, live: float, after: float) -> None:
        rows.append({"ended_by": how, "live_gib": live, "after_gib": after, "over_weights_gib": after - weights})
        print(f"{how:>26}: {live:6.2f} GiB while streaming -> {after:6.2f} GiB after (weights {weights:.2f}, "
              f"over {after - weights:+.3f})", flush=True)

    for repeat in range(2):  # engines one after another: nothing may pile up
        engine = used(model, proc, frames, args.seconds)
        live = gib()
        del engine  # no gc.collect(): reference counting alone, as after gc.freeze()
        record(f"del (engine {3 * repeat + 1})", live, gib())

        engine = used(model, proc, frames, args.seconds)
        live = gib()
        engine.close()
        record(f"close() (engine {3 * repeat + 2})", live, gib())
        del engine

        with used(model, proc, frames, args.seconds) as engine:
            live = gib()
        record(f"with block (engine {3 * repeat + 3})", live, gib())
        del engine

    engine = used(model, proc, frames, args.seconds)
    live = gib()
    engine.reset(keep_memory=True)
    record("reset(keep_memory=True)", live, gib())
    engine.reset()
    record("then reset()", live, gib())
    del engine
    gc.unfreeze()
    res = {"meta": {**device_info(), "arch": args.arch, "seconds": args.seconds, "weights_gib": weights},
           "rows": rows}
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
