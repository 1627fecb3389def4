"""Many streams over one model: N cameras driven through one KV pool and its scheduler (or each on its own engine).

Each stream is its own ``VideoStreamInference`` over ONE model (random weights of ``--arch``,
default Qwen2.5-VL-3B, in bf16 on the GPU; ``--tiny``: the tiny random model of that family on the
CPU, a smoke test). Every stream has
its own thread: it appends chunks of 4 frames (448x448 at 2 fps) and asks a 1-token question
every 10 s of its own video. For each N in ``--streams`` it reports aggregate frames/s, question
TTFT p50/p95 over all streams, and memory (peak against weights + pool (or caches)).

- ``--mode throughput`` (default): each stream appends as fast as it can (aggregate ingest);
- ``--mode realtime``: each stream appends a chunk when its last frame would have been captured
  (a camera at 2 fps); reports how late chunks finish after that moment (lag p50/p95/max) and
  whether every stream kept up.

With ``--pool`` (default) the streams share one ``KVPool`` (each bounded to ``--budget`` tokens)
and their forwards are batched by its scheduler; ``--no-pool`` gives each stream its own cache
and runs its forwards alone (the baseline).

    python benchmarks/bench_streams.py --streams 1,8,32,64,128 --seconds 60 --json out.json
    python benchmarks/bench_streams.py --mode realtime --streams 100 --seconds 60
    python benchmarks/bench_streams.py --arch qwen3_vl-8b --streams 1,8,32 --seconds 60 --json q3.json
    python benchmarks/bench_streams.py --tiny --streams 1,4 --seconds 6     # CPU smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import KVPool, StreamConfig, VideoStreamInference  # noqa: E402
from percentiles import pct  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402
from model.testing import REAL_CONFIGS  # noqa: E402
from model.timing import GIB, device_info  # noqa: E402

CHUNK, FPS, EVERY = 4, 2, 10  # frames per append, frames per second, seconds between questions
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


def build(tiny: bool, arch: str):
    """(model, processor, frame size): random weights of ``arch`` in bf16 on the GPU, or the tiny model of its family."""
    family = arch.split("-")[0]
    if tiny:
        from model.testing import build_tiny_model

        model, proc = build_tiny_model(seed=0, family=family)
        return model, proc, 64  # every tiny family takes 64x64 (Qwen3-VL's min_pixels)
    from model.testing import REAL_CONFIGS, build_processor, build_random_model

    return build_random_model(REAL_CONFIGS[arch], dtype=torch.bfloat16, device="cuda"), build_processor(family), 448


def memory(device) -> tuple[int, int]:
    """(allocated now, peak since the last reset) on a CUDA device; (0, 0) elsewhere."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_profiler(folder, device):
    """A torch profiler over the streaming phase (``--profile``), or None."""
    if not folder:
        return None
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # The forwards run on the scheduler's thread, not this one: profile every thread.
    prof = torch.profiler.profile(activities=acts,
                                  experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))
    prof.__enter__()
    return prof


def stop_profiler(prof, folder, n: int, wall: float) -> dict | None:
    """Writes the profile's tables (by device time, by host time) and returns the device-busy summary."""
    if prof is None:
        return None
    prof.__exit__(None, None, None)
    os.makedirs(folder, exist_ok=True)
    events = prof.key_averages()
    with open(os.path.join(folder, f"profile_n{n}.txt"), "w") as f:
        f.write(f"N = {n}, wall {wall:.2f} s (profiled, so slower than unprofiled runs)\n\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
        f.write("\n\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    kernels_s = sum(e.self_device_time_total for e in events) / 1e6
    return {"wall_s": wall, "device_kernel_s": kernels_s, "device_busy": kernels_s / wall if wall else None}


def run_n(model, proc, size: int, n: int, args) -> dict:
    """N streams, one thread each, for ``args.seconds`` of video -> the measurements."""
    device = model.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = memory(device)[0]
    n_frames = args.seconds * FPS
    grid_tokens = (size // 28) ** 2  # a 2-frame grid
    chunk_tokens = CHUNK // 2 * grid_tokens + 64
    pool = None
    if args.pool:
        budget = args.budget
        config = StreamConfig(cache_budget_tokens=budget)
        per_stream = budget + chunk_tokens + 256  # kept + one call + a question and its answer
        pool = KVPool.for_model(model, tokens=n * per_stream, page=64, max_batch_tokens=args.batch_tokens)
        engines = [VideoStreamInference(model, proc, config=config, pool=pool) for _ in range(n)]
    else:
        config = StreamConfig(cache_budget_tokens=args.budget) if args.budget else StreamConfig()
        engines = [VideoStreamInference(model, proc, config=config) for _ in range(n)]
    t0 = time.perf_counter()
    for e in engines:
        e.warmup((size, size), CHUNK, fps=FPS, capacity=None if args.pool else args.budget + 2 * chunk_tokens)
    if pool is not None:  # the captured batches of decode steps and questions
        pool.warm_graphs(streams=n, tokens=per_stream)
    warm_s = time.perf_counter() - t0
    live_warm = memory(device)[0]
    if pool is not None:
        pool.scheduler.reset_stats()  # batches of the streaming only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames = synthetic_frames(32, size, size, seed=1)  # shared: each stream reads them at its own offset
    ttft, lag, chunk_s, errors = [[] for _ in engines], [[] for _ in engines], [[] for _ in engines], []
    start = threading.Barrier(n + 1)

    def camera(k: int) -> None:
        e = engines[k]
        try:
            start.wait()
            t_start = time.perf_counter()
            for c, i in enumerate(range(0, n_frames, CHUNK)):
                due = t_start + (c + 1) * CHUNK / FPS
                if args.mode == "realtime":
                    time.sleep(max(0.0, due - time.perf_counter()))
                chunk = [frames[(k * 7 + i + j) % len(frames)] for j in range(CHUNK)]
                t_chunk = time.perf_counter()
                e.append_frames(chunk, fps=FPS)
                done = time.perf_counter()
                chunk_s[k].append(done - t_chunk)
                lag[k].append(done - due)
                if (i + CHUNK) % (args.every * FPS) == 0:
                    ttft[k].append(1e3 * e.ask(Q, max_new_tokens=1).ttft_s)
        except Exception as exc:  # noqa: BLE001 (reported: a benchmark thread must not die silently)
            errors.append(f"stream {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=camera, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    profiler = start_profiler(args.profile, device)
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    sync(device)
    wall = time.perf_counter() - t0
    profile = stop_profiler(profiler, args.profile, n, wall)
    _, peak = memory(device)
    memory_bytes = pool.reserved_bytes() if pool is not None else sum(e.kv.reserved_bytes() for e in engines)
    all_ttft = [x for t in ttft for x in t]
    all_lag = [x for t in lag for x in t] if args.mode == "realtime" else []
    all_chunk = [1e3 * x for t in chunk_s for x in t]
    res = {"streams": n, "mode": args.mode, "pool": args.pool, "seconds_each": args.seconds, "fps": FPS,
           "frame": size, "budget_tokens": args.budget, "warmup_s": warm_s, "wall_s": wall,
           "aggregate_frames_per_s": n * n_frames / wall if not errors else None,
           "ttft_ms": {"p50": pct(all_ttft, 50), "p95": pct(all_ttft, 95), "max": max(all_ttft, default=None),
                       "n": len(all_ttft)},
           "chunk_ms": {"p50": pct(all_chunk, 50), "p95": pct(all_chunk, 95), "max": max(all_chunk, default=None)},
           "chunk_lag_s": {"p50": pct(all_lag, 50), "p95": pct(all_lag, 95), "max": max(all_lag, default=None)},
           "kept_up": args.mode == "realtime" and not errors and max(all_lag, default=0) < CHUNK / FPS,
           "weights_gib": weights / GIB, "kv_memory_gib": memory_bytes / GIB, "peak_gib": peak / GIB,
           "over_weights_and_kv_gib": (peak - weights - memory_bytes) / GIB if peak else None,
           "live_after_warmup_over_weights_and_kv_gib": (live_warm - weights - memory_bytes) / GIB if peak else None,
           "profile": profile,
           "batching": ({k: v for k, v in pool.stats().items() if not k.startswith("pool_")} if pool else None),
           "errors": errors[:5]}
    for e in engines:
        e.close()
    if pool is not None:
        pool.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,8,32", help="comma-separated stream counts (e.g. 1,8,32,64,128)")
    ap.add_argument("--seconds", type=int, default=60, help="seconds of video per stream")
    ap.add_argument("--mode", choices=("throughput", "realtime"), default="throughput")
    ap.add_argument("--every", type=int, default=EVERY, help="seconds of video between a stream's questions")
    ap.add_argument("--pool", action=argparse.BooleanOptionalAction, default=True,
                    help="share one KVPool and its scheduler (default); --no-pool: each stream alone")
    ap.add_argument("--budget", type=int, default=16_384, help="tokens each stream keeps (0 with --no-pool: unbounded)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="PoolConfig.max_batch_tokens")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU (a smoke test)")
    ap.add_argument("--arch", default="qwen2_5_vl-3b", choices=sorted(REAL_CONFIGS),
                    help="the architecture (random weights; with --tiny, the tiny model of its family)")
    ap.add_argument("--json")
    ap.add_argument("--profile", metavar="DIR", help="profile each N's streaming (torch profiler) and write tables here")
    ap.add_argument("--memory-history", action="store_true",
                    help="record allocations' stacks and report the live memory by where it was allocated")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.streams.split(",")]
    if args.tiny and args.budget == 16_384:
        args.budget = 400
    if not args.tiny and not torch.cuda.is_available():
        ap.error(f"the {args.arch} architecture needs a CUDA GPU; use --tiny for the CPU smoke test")
    if args.memory_history:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    model, proc, size = build(args.tiny, args.arch)
    runs = []
    for n in counts:
        res = run_n(model, proc, size, n, args)
        runs.append(res)
        t, lg, ch = res["ttft_ms"], res["chunk_lag_s"], res["chunk_ms"]
        fps = res["aggregate_frames_per_s"]
        print(f"N={n:4d} {args.mode}: {fps if fps is None else round(fps, 1)} frames/s aggregate, TTFT p50 "
              f"{t['p50']:.1f} ms p95 {t['p95']:.1f} ms ({t['n']} questions), chunk p50 {ch['p50']:.1f} ms p95 "
              f"{ch['p95']:.1f} ms" + (f", lag p95 {lg['p95']:.3f} s, kept up: {res['kept_up']}"
                                       if args.mode == "realtime" else "") + ", peak "
              f"{res['peak_gib']:.2f} GiB (weights {res['weights_gib']:.2f} + KV {res['kv_memory_gib']:.2f}), "
              f"batching {res['batching']}{' ERRORS ' + str(res['errors']) if res['errors'] else ''}", flush=True)
    out = {"meta": {**device_info(), "arch": args.arch, "command": "python benchmarks/bench_streams.py "
                    + " ".join(argv if argv is not None else sys.argv[1:])}, "runs": runs,
           "live_at_end_by_origin_gib": live_by_origin() if args.memory_history else None}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
