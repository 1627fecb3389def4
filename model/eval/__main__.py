"""python -m model.eval: run OVO-Bench or StreamingBench through the streaming engine.

    python -m model.eval --benchmark ovo --annotations ovo_bench_new.json --video-root OVO-Bench/src_videos \\
        --model /path/to/Qwen2.5-VL-3B-Instruct --modes stream,window --parity 5 --out eval-ovo

Run it again with the same --out to resume; the report is rewritten from all answers so far.
A folder holding answers made with other settings is refused (the error names them): use another
--out, or --force to set those answers aside and start again. One run at a time per folder.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ..arguments import check_fps
from ..config import add_budget_arguments, budget_config
from .events import BENCHMARKS
from .modes import MODES, PLANNED
from .readers import read_annotations
from .report import write_report
from ..loading import DTYPES, load_engine
from .results import ResultsFolderError
from .runner import EvalConfig, run_benchmark


def _fps(text: str) -> float:
    try:
        return check_fps(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value
    return parse


# The budget flags (model/config.py defines them for every tool): checked here, each by its name.
_BUDGET_CHECKS = (
    ("budget_tokens", "--budget-tokens", lambda v: v >= 1, "an int >= 1"),
    ("window_seconds", "--window-seconds", lambda v: math.isfinite(v) and v > 0, "a positive number of seconds"),
    ("sink_frames", "--sink-frames", lambda v: v >= 0, "an int >= 0"),
    ("recall_grids", "--recall-grids", lambda v: v >= 0, "an int >= 0"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--annotations", required=True, help="the benchmark's question file (JSON)")
    p.add_argument("--video-root", required=True, help="folder the annotations' video paths are relative to")
    p.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint folder (default: $QWEN_MODEL_PATH; "
                                                  "neither: random weights, for timing only)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--fps", type=_fps, default=2.0, help="frames per second sampled from each video")
    p.add_argument("--modes", default="stream,window",
                   help=f"comma-separated, from {', '.join(MODES)}" + (f" ({', '.join(PLANNED)}: planned)" if PLANNED else ""))
    p.add_argument("--window-frames", type=_int_at_least(1), default=16,
                   help="window mode: last N frames re-prefilled per question")
    p.add_argument("--chunk-frames", type=_int_at_least(1), default=8,
                   help="stream mode: frames per append_frames call")
    p.add_argument("--parity", type=_int_at_least(0), default=0, metavar="K",
                   help="check the first K stream answers against the native offline path (use --dtype float32)")
    p.add_argument("--generate", type=_int_at_least(0), default=0, metavar="TOKENS",
                   help="also answer by generation (up to TOKENS tokens) matched to an option")
    p.add_argument("--out", default=None, help="results folder (default: eval-BENCHMARK)")
    p.add_argument("--force", action="store_true",
                   help="--out holds answers made with other settings: set them aside (OUT/replaced-TIME/) "
                        "and start again")
    p.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="only the first N events of the annotation file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_budget_arguments(p)  # for --modes ...,bounded
    args = p.parse_args(argv)
    for dest, flag, ok, what in _BUDGET_CHECKS:
        value = getattr(args, dest)
        if value is not None and not ok(value):
            p.error(f"argument {flag}: must be {what}, got {value!r}")
    try:
        budget_config(args)  # the flags together (--recall-grids needs a budget)
    except ValueError as e:
        p.error(str(e))
    budget_flags = [f for f, set_ in (("--budget-tokens", args.budget_tokens is not None),
                                      ("--window-seconds", args.window_seconds is not None),
                                      ("--recall-grids", bool(args.recall_grids))) if set_]
    if budget_flags and "bounded" not in [m.strip() for m in args.modes.split(",")]:
        p.error(f"{', '.join(budget_flags)} only apply to the bounded mode; add bounded to --modes "
                f"(now {args.modes!r})")
    return args


def _budget(args) -> Optional[dict]:
    """The budget flags as StreamConfig fields (validated by EvalConfig), or None when none is set."""
    config = budget_config(args)
    if config is None:
        return None
    return {"cache_budget_tokens": config.cache_budget_tokens, "video_window_seconds": config.video_window_seconds,
            "sink_frames": config.sink_frames, "recall_grids": config.recall_grids}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = EvalConfig(fps=args.fps, modes=args.modes, window_frames=args.window_frames,
                            chunk_frames=args.chunk_frames, parity=args.parity, generate_tokens=args.generate,
                            progress=not args.no_progress, budget=_budget(args))
        if not os.path.isdir(args.video_root):
            raise ValueError(f"video root not found: {args.video_root!r}")
        annotations = read_annotations(args.benchmark, args.annotations, limit=args.limit)
        engine, description = load_engine(args.model, args.dtype, args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or f"eval-{args.benchmark}"
    print(f"{len(annotations.events)} events from {annotations.entries} entries "
          f"({len(annotations.problems)} skipped), {len(annotations.videos())} videos -> {out}")
    try:
        result = run_benchmark(engine, annotations, args.video_root, out, config, description, force=args.force)
    except ResultsFolderError as e:  # another run holds the folder, or it holds other settings' answers
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(out, result)
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['markdown']}, {paths['json']}, {paths['png']}")
    parity = paths["summary"]["parity"]
    if parity and parity["failed"]:
        print(f"PARITY FAILED on {parity['failed']} event(s)", file=sys.stderr)
        return 1
    return 0 if result.completed else 130


if __name__ == "__main__":
    sys.exit(main())
