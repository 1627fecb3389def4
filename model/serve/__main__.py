"""``python -m model.serve [--model PATH] [--host 127.0.0.1 --port 8000 ...]``: the server (``--help``).

Arguments are checked before torch, transformers or FastAPI load; a bad one exits with 2 and one
line naming it. Without ``--model`` and ``$QWEN_MODEL_PATH`` the server runs random weights (the
3B architecture on a GPU, the tiny model on CPU) and says so. ``--ray`` serves on Ray Serve, one
replica per GPU (see README "Serving").
"""
from __future__ import annotations

import argparse
import os
import sys

from ..config import StreamConfig
from .config import ServerConfig
from .protocol import Limits, SessionBounds

EXIT_USAGE = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint folder (default: $QWEN_MODEL_PATH; "
                                                  "neither: random weights, said loudly)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $SERVE_API_KEY; "
                        "prefer the variable: arguments are visible to other users)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g = p.add_argument_group("sessions")
    g.add_argument("--memory-gib", type=float, default=None,
                   help="memory for sessions' caches (default: 90%% of the GPU's free memory after loading, 1 on CPU)")
    g.add_argument("--pool", action=argparse.BooleanOptionalAction, default=True,
                   help="sessions share one K/V pool, allocated at start, and their forwards run batched on its "
                        "scheduler (default); --no-pool: each session its own engine, cache and CUDA graphs")
    g.add_argument("--pool-tokens", type=int, default=None,
                   help="the pool's K/V slots (default: as many as --memory-gib holds)")
    g.add_argument("--max-sessions", type=int, default=64)
    g.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without a message before a session "
                                                                      "is closed (default 300)")
    g.add_argument("--session-overhead-mib", type=int, default=None,
                   help="memory counted per session beyond its cache (default 256 on a GPU, 16 on CPU)")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="warm the pool up once at start (with --no-pool: each session at creation, when it gives "
                        "frame_size), so no first call compiles or captures (default: on a GPU)")
    g.add_argument("--default-fps", type=float, default=2.0)
    g.add_argument("--max-fps", type=float, default=30.0)
    g.add_argument("--default-budget-tokens", type=int, default=16_384, help="a session's cache budget when it "
                                                                             "sets none (every session is bounded)")
    g.add_argument("--max-budget-tokens", type=int, default=65_536)
    g.add_argument("--recall-host-tokens", type=int, default=16_384)
    g = p.add_argument_group("limits per message")
    g.add_argument("--max-message-mib", type=float, default=8.0)
    g.add_argument("--max-frame-pixels", type=int, default=3840 * 2160)
    g.add_argument("--max-question-chars", type=int, default=2000)
    g.add_argument("--max-choices", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--max-queued-frames", type=int, default=32,
                   help="frames waiting for ingest per session; beyond, the oldest are dropped (counted)")
    g.add_argument("--max-pending-questions", type=int, default=4)
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--ray", action="store_true", help="serve on Ray Serve (a local Ray, or RAY_ADDRESS's cluster)")
    g.add_argument("--replicas", type=int, default=None, help="replicas (default: one per GPU of the cluster, "
                                                               "or 1 without GPUs)")
    return p.parse_args(argv)


def server_config(args) -> ServerConfig:
    """The validated ``ServerConfig`` the flags ask for (ValueError/TypeError naming a bad one)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise ValueError(f"--memory-gib must be > 0, got {args.memory_gib}")
    if not args.max_message_mib > 0:
        raise ValueError(f"--max-message-mib must be > 0, got {args.max_message_mib}")
    if args.pool_tokens is not None and args.pool_tokens < 1:
        raise ValueError(f"--pool-tokens must be >= 1, got {args.pool_tokens}")
    if args.pool_tokens is not None and not args.pool:
        raise ValueError("--pool-tokens sizes the shared pool: it cannot go with --no-pool")
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    limits = Limits(max_message_bytes=int(args.max_message_mib * 2**20), max_frame_pixels=args.max_frame_pixels,
                    max_question_chars=args.max_question_chars, max_choices=args.max_choices,
                    max_new_tokens=args.max_new_tokens, default_max_new_tokens=min(128, args.max_new_tokens),
                    max_pending_questions=args.max_pending_questions, max_queued_frames=args.max_queued_frames)
    if not 0.01 <= args.default_fps <= args.max_fps <= 1000:
        raise ValueError(f"need 0.01 <= --default-fps <= --max-fps <= 1000, got {args.default_fps} and {args.max_fps}")
    if not 1 <= args.default_budget_tokens <= args.max_budget_tokens:
        raise ValueError(f"need 1 <= --default-budget-tokens <= --max-budget-tokens, got "
                         f"{args.default_budget_tokens} and {args.max_budget_tokens}")
    bounds = SessionBounds(default_fps=args.default_fps, max_fps=args.max_fps,
                           default_budget_tokens=args.default_budget_tokens, max_budget_tokens=args.max_budget_tokens)
    return ServerConfig(
        limits=limits, bounds=bounds,
        memory_bytes=None if args.memory_gib is None else int(args.memory_gib * 2**30),
        max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout, api_key=args.api_key or None,
        session_overhead_bytes=None if args.session_overhead_mib is None else args.session_overhead_mib * 2**20,
        recall_host_tokens=args.recall_host_tokens, warmup=args.warmup, pooled=args.pool, pool_tokens=args.pool_tokens,
        stream=StreamConfig(max_question_tokens=4 * args.max_question_chars + 64))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = server_config(args)
    except (ValueError, TypeError) as e:
        print(f"python -m model.serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is not None and not os.path.isdir(args.model):
        print(f"python -m model.serve: error: --model {args.model!r} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    from . import logs

    logs.setup(args.log_level)
    if args.ray:
        from .ray_app import serve_forever

        return serve_forever(args, config)
    import uvicorn

    from ..loading import load_engine
    from .app import build_app

    engine, description = load_engine(args.model, dtype=args.dtype, device=args.device)
    model, processor = engine.model, engine.processor
    engine.close()
    try:
        app = build_app(model, processor, config, description)  # the pool is allocated here
    except ValueError as e:  # a budget too small for one page of the pool
        print(f"python -m model.serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False,
                ws_max_size=2 * config.limits.max_message_bytes, ws_ping_interval=20, ws_ping_timeout=20,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
