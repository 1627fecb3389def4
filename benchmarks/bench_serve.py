"""Load generator for the server: N simulated cameras over WebSocket on loopback, questions every few seconds.

It starts the server itself (``python -m model.serve`` on a free loopback port: random 3B weights
on a GPU through ``load_engine``, the tiny model on CPU, or ``--model PATH``), then for each N:
N cameras each stream a video (synthetic, or ``--video``) in real time at ``--fps`` as JPEG frames
with their capture times, and ask a question every ``--question-every`` seconds (staggered),
while frames keep flowing. Per N it reports, as the client sees them: question TTFT p50/p95/max
(question sent -> first token received), the server's overhead over the library's own TTFT
(client TTFT - the engine's ``ttft_s`` carried by the done event), ingest lag (newest frame sent
- newest frame in the engine, from the status events), frames dropped, GPU memory (or the
server's resident memory on CPU) and the server's CPU use. N is "held in real time" when no more
than ``--max-drop-pct`` of frames were dropped, the ingest lag's p95 stayed under ``--max-lag``
seconds and every question was answered; ``--find-max`` then bisects between the largest N held
and the smallest N not held (or doubles past the largest given) to find the largest N held.

    python benchmarks/bench_serve.py                                  # GPU: N = 1, 8, 32, --find-max
    python benchmarks/bench_serve.py --sessions 1,2 --seconds 5 --frame-size 112x112   # CPU, tiny
    python benchmarks/bench_serve.py --model /path/to/Qwen2.5-VL-3B-Instruct --out results/serve

Writes OUT/bench_serve.json, OUT/bench_serve.png and OUT/server.log (the server's JSON log lines).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import httpx  # noqa: E402

from model.serve.client import SessionClient, create_session, ws_url  # noqa: E402
from model.serve.protocol import encode_frame  # noqa: E402
from percentiles import summary  # noqa: E402

QUESTIONS = ["What is happening right now?", "Which shape appeared last?", "Describe the scene.",
             "How many shapes are on screen?"]
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,8,32", help="the N to measure, comma-separated (default 1,8,32)")
    p.add_argument("--find-max", action=argparse.BooleanOptionalAction, default=None,
                   help="bisect for the largest N held in real time (default: on with a GPU)")
    p.add_argument("--max-n", type=int, default=128, help="--find-max looks no further than this")
    p.add_argument("--seconds", type=float, default=30.0, help="streaming time per N")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--chunk-frames", type=int, default=4)
    p.add_argument("--frame-size", default=None, help="HxW of the frames (default 448x448 on a GPU, 112x112 on CPU)")
    p.add_argument("--video", default=None, help="a video file each camera plays (default: the synthetic video)")
    p.add_argument("--question-every", type=float, default=5.0, help="seconds between a camera's questions")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--budget-tokens", type=int, default=16_384, help="each session's cache budget")
    p.add_argument("--max-lag", type=float, default=2.0, help="real time: ingest lag p95 under this many seconds")
    p.add_argument("--max-drop-pct", type=float, default=1.0, help="real time: at most this %% of frames dropped")
    p.add_argument("--model", default=None, help="checkpoint folder (default: $QWEN_MODEL_PATH, else random)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--memory-gib", type=float, default=None, help="the server's --memory-gib")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeatable)")
    p.add_argument("--url", default=None, help="measure an already running server instead of starting one")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serve"))
    return p.parse_args(argv)


def cuda_available(device) -> bool:
    if device is not None:
        return device == "cuda"
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ---------------------------------------------------------------- the server
class Server:
    """``python -m model.serve`` in a subprocess on a free loopback port; its log goes to OUT/server.log."""

    def __init__(self, args, cuda: bool, max_sessions: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "model.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-sessions", str(max_sessions), "--idle-timeout", "3600", "--max-budget-tokens",
               str(max(args.budget_tokens, 65_536)), "--max-fps", str(max(30.0, args.fps))]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        if args.memory_gib:
            cmd += ["--memory-gib", str(args.memory_gib)]
        cmd += args.server_arg
        self.cmd = cmd
        self.log = open(os.path.join(args.out, "server.log"), "w")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_bytes(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def scrape(url: str) -> dict:
    """The server's gauges from /metrics (name -> value, unlabelled series only)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split(" ", 1)
            out[name] = float(value)
    return out


def pool_counters(url: str) -> dict:
    """The pool's scheduler counters (``vsq_pool_*_total``) -> {name: value}; {} without a pool."""
    return {name[len("vsq_pool_"):-len("_total")]: v for name, v in scrape(url).items()
            if name.startswith("vsq_pool_") and name.endswith("_total")}


# ---------------------------------------------------------------- the cameras
def load_frames(args, size: tuple[int, int]) -> list[bytes]:
    """One looped video, JPEG-encoded once (payloads only; each send adds its own header)."""
    if args.video:
        from model.sources import open_video

        import cv2

        frames = [cv2.resize(f, (size[1], size[0])) for _, f in open_video(args.video, fps=args.fps)]
    else:
        from model.synthetic import synthetic_frames

        frames = synthetic_frames(int(max(8, 30 * args.fps)), *size)
    header_bytes = 28
    return [encode_frame(f, 0.0, "jpeg", quality=85)[header_bytes:] for f in frames]


async def run_n(n: int, url: str, args, payloads, size, server_pid) -> dict:
    results: dict = {}
    memory, stop = [], asyncio.Event()

    async def sample():
        while not stop.is_set():
            try:
                gauges = await asyncio.to_thread(scrape, url)
                memory.append(gauges.get("vsq_gpu_memory_used_bytes", rss_bytes(server_pid) if server_pid else 0))
            except httpx.HTTPError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    counters0 = await asyncio.to_thread(pool_counters, url)
    cpu0, wall0 = cpu_seconds(server_pid) if server_pid else float("nan"), time.perf_counter()
    await cameras(n, url, args, payloads, size, results)
    stop.set()
    await sampler
    cpu = (cpu_seconds(server_pid) - cpu0) / (time.perf_counter() - wall0) if server_pid else float("nan")
    counters1 = await asyncio.to_thread(pool_counters, url)
    out = summarize(n, args, results, memory, cpu)
    # what the pool's scheduler ran for these N sessions (None without a pool): batches, their sizes, graph replays
    out["pool"] = {k: counters1[k] - counters0[k] for k in counters1} if counters0 and counters1 else None
    return out


async def cameras(n, url, args, payloads, size, results):
    """Create every session first (creation may warm up graphs), then stream all of them for args.seconds."""
    created, go = {}, asyncio.Event()

    async def one(i):
        async with httpx.AsyncClient(base_url=url, timeout=900) as http:
            t0 = time.perf_counter()
            sid = await create_session(http, fps=args.fps, cache_budget_tokens=args.budget_tokens,
                                       chunk_frames=args.chunk_frames, frame_size=list(size))
            created[i] = time.perf_counter() - t0
        if len(created) == n:
            go.set()
        await go.wait()
        await stream(i, sid, url, args, payloads, results)
        results[i]["created_s"] = created[i]

    await asyncio.gather(*(one(i) for i in range(n)))


async def stream(i, sid, url, args, payloads, results):
    """One camera: frames in real time at args.fps, a question every args.question_every seconds."""
    from model.serve.protocol import FORMAT_ENCODED, HEADER, MAGIC

    replies, sent = [], 0
    async with SessionClient(ws_url(url, sid)) as s:
        start = time.perf_counter()
        t_end = start + args.seconds
        rng = random.Random(100 + i)
        next_question = start + rng.uniform(0.5, args.question_every)
        offset = rng.randrange(len(payloads))
        pending = []
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            if now >= start + sent / args.fps:
                payload = payloads[(offset + sent) % len(payloads)]
                await s.send_raw(HEADER.pack(MAGIC, FORMAT_ENCODED, sent / args.fps, 0, 0, len(payload)) + payload)
                sent += 1
            if now >= next_question:
                pending.append(await s.start(QUESTIONS[len(pending) % len(QUESTIONS)],
                                             max_new_tokens=args.max_new_tokens))
                next_question += args.question_every
            await asyncio.sleep(max(0.0, min(start + sent / args.fps, next_question, t_end) - time.perf_counter()))
        for reply in pending:
            try:
                replies.append(await s.finish(reply, timeout=120))
            except asyncio.TimeoutError:
                replies.append(reply)
        status = await s.next_status()
        statuses = list(s.statuses)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await http.delete(f"/v1/sessions/{sid}")
    results[i] = {"sid": sid, "sent": sent, "replies": replies, "status": status, "statuses": statuses}


def summarize(n: int, args, results: dict, memory: list, cpu: float) -> dict:
    ttft, overhead, engine_ttft, queue, lag = [], [], [], [], []
    asked = answered = sent = dropped = failed = ingested = 0
    for r in results.values():
        sent += r["sent"]
        st = r["status"]
        dropped += st["frames_dropped"]
        failed += st["frames_failed"] + st["frames_rejected"]
        ingested += st["frames_ingested"]
        lag += [e["ingest_lag_s"] for e in r["statuses"] if e.get("ingest_lag_s") is not None]
        for reply in r["replies"]:
            asked += 1
            final = reply.final or {}
            if final.get("type") == "response.done":
                answered += 1
                ttft.append(reply.client_ttft_s)
                engine_ttft.append(final["engine_ttft_s"])
                queue.append(final["queue_s"])
                overhead.append(reply.client_ttft_s - final["engine_ttft_s"])
    ms = lambda xs: {k: (v * 1000 if k != "n" else v) for k, v in summary(xs).items()}  # noqa: E731
    drop_pct = 100.0 * dropped / sent if sent else float("nan")
    lag_s = summary(lag)
    held = bool(sent and drop_pct <= args.max_drop_pct and lag_s["p95"] <= args.max_lag and answered == asked > 0
                and failed == 0)
    return {"n": n, "frames_sent": sent, "frames_ingested": ingested, "frames_dropped": dropped,
            "frames_failed": failed, "drop_pct": drop_pct, "questions": asked, "answered": answered,
            "ttft_ms": ms(ttft), "engine_ttft_ms": ms(engine_ttft), "overhead_ms": ms(overhead),
            "queue_ms": ms(queue),  # part of the overhead: waiting for the chunk being encoded when it arrived
            "ingest_lag_s": lag_s, "session_create_s": summary([r.get("created_s", float("nan"))
                                                                 for r in results.values()]),
            "memory_gib_max": max(memory) / GIB if memory else float("nan"), "server_cpu_cores": cpu,
            "realtime": held}


def table(runs: list[dict], memory_name: str) -> str:
    head = (f"{'N':>4} {'TTFT p50':>9} {'p95':>7} {'max':>7} {'overhead p50':>13} {'p95':>6} "
            f"{'lag p50':>8} {'p95':>6} {'max':>6} {'dropped':>8} {memory_name:>10} {'CPU':>5}  real time")
    lines = [head, "-" * len(head)]
    for r in sorted(runs, key=lambda r: r["n"]):
        t, o, lag = r["ttft_ms"], r["overhead_ms"], r["ingest_lag_s"]
        lines.append(f"{r['n']:>4} {t['p50']:>7.0f}ms {t['p95']:>5.0f}ms {t['max']:>5.0f}ms {o['p50']:>11.1f}ms "
                     f"{o['p95']:>4.0f}ms {lag['p50']:>7.2f}s {lag['p95']:>5.2f}s {lag['max']:>5.2f}s "
                     f"{r['frames_dropped']:>4} ({r['drop_pct']:.1f}%) {r['memory_gib_max']:>7.2f} GiB "
                     f"{r['server_cpu_cores']:>5.2f}  {'yes' if r['realtime'] else 'NO'}")
    return "\n".join(lines)


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = sorted(runs, key=lambda r: r["n"])
    ns = [r["n"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("p50", "o-"), ("p95", "s--"), ("max", "^:")):
        a.plot(ns, [r["ttft_ms"][key] for r in runs], style, label=f"TTFT {key}")
    a.plot(ns, [r["overhead_ms"]["p50"] for r in runs], "x-", label="server overhead p50")
    a.set_xlabel("cameras (sessions)")
    a.set_ylabel("ms (client side)")
    a.set_xscale("log", base=2)
    a.legend()
    a.set_title("question time to first token")
    b.plot(ns, [r["ingest_lag_s"]["p95"] for r in runs], "o-", label="ingest lag p95")
    b.set_ylabel("seconds of video behind")
    drops = b.twinx()
    drops.plot(ns, [r["drop_pct"] for r in runs], "s--", color="tab:orange", label="frames dropped")
    drops.set_ylabel("frames dropped (%)")
    for r in runs:
        b.annotate("real time" if r["realtime"] else "behind", (r["n"], r["ingest_lag_s"]["p95"]), fontsize=8)
    b.set_xlabel("cameras (sessions)")
    b.set_xscale("log", base=2)
    b.legend(loc="upper left")
    drops.legend(loc="upper right")
    b.set_title("ingest")
    for ax in (a, b):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(ns)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = cuda_available(args.device)
    if args.find_max is None:
        args.find_max = cuda
    size = tuple(int(x) for x in (args.frame_size or ("448x448" if cuda else "112x112")).lower().split("x"))
    ns = sorted({int(x) for x in args.sessions.split(",")})
    os.makedirs(args.out, exist_ok=True)
    payloads = load_frames(args, size)
    server = None if args.url else Server(args, cuda, max_sessions=max(ns + [args.max_n if args.find_max else 0]))
    try:
        url = args.url or server.url
        health = httpx.get(f"{url}/healthz", timeout=5).json() if args.url else server.wait_ready()
        pid = server.proc.pid if server else None
        print(f"server: {health['model']} on {health['device']} at {url}", flush=True)
        runs: dict[int, dict] = {}

        def measure(n: int) -> dict:
            print(f"--- N = {n}: {args.seconds:g} s of {args.fps:g} fps {size[0]}x{size[1]} per camera", flush=True)
            runs[n] = asyncio.run(run_n(n, url, args, payloads, size, pid))
            print(table([runs[n]], "GPU mem" if cuda else "server RSS"), flush=True)
            return runs[n]

        for n in ns:
            measure(n)
        if args.find_max:
            held = [n for n in runs if runs[n]["realtime"]]
            lo = max(held) if held else 0
            hi = min([n for n in runs if not runs[n]["realtime"] and n > lo] or [0])
            while not hi and lo and lo * 2 <= args.max_n:  # everything held: double until it is not
                n = lo * 2
                (lo, hi) = (n, 0) if measure(n)["realtime"] else (lo, n)
            while hi and hi - lo > 1 and lo:
                mid = (lo + hi) // 2
                (lo, hi) = (mid, hi) if measure(mid)["realtime"] else (lo, mid)
        largest = max([n for n in runs if runs[n]["realtime"]], default=0)
    finally:
        if server is not None:
            server.stop()
    title = f"{health['model']} on {health['device']}: {size[0]}x{size[1]} at {args.fps:g} fps"
    print("\n" + title)
    print(table(list(runs.values()), "GPU mem" if cuda else "server RSS"))
    print(f"largest N held in real time: {largest}" + ("" if args.find_max else " (of those measured)"))
    out = {"meta": {"args": vars(args), "server": health, "server_cmd": server.cmd if server else None,
                    "machine": platform.platform(), "python": platform.python_version(),
                    "criteria": {"max_drop_pct": args.max_drop_pct, "max_lag_s": args.max_lag},
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "runs": [runs[n] for n in sorted(runs)], "largest_realtime_n": largest}
    with open(os.path.join(args.out, "bench_serve.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    plot(list(runs.values()), os.path.join(args.out, "bench_serve.png"), title)
    print(f"wrote {os.path.join(args.out, 'bench_serve.json')} and bench_serve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
