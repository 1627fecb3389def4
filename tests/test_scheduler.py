"""Many pooled streams driven from threads through one scheduler (``model/scheduler.py``), each equal to itself alone.

- 12 streams (random chunkings, frame sizes, questions, choices, turns, images; unbounded,
  bounded by tokens or a window, with recall), one thread each: every result equals the same
  stream on its own engine (fp32, 1e-4), and the scheduler really batched (several streams'
  segments in one language-model forward, several streams' grids in one vision forward);
- a failure in one stream's part of a batch (a token id outside the vocabulary) fails that
  stream's call only, which commits nothing; the batch's other streams complete and equal
  themselves alone;
- ``KeyboardInterrupt`` at random lines of one stream's calls while other streams run: each
  interrupted call leaves its stream as it was, and no other stream is touched;
- the asyncio calls of many engines are batched together.
"""
from __future__ import annotations

import asyncio
import random
import sys
import threading
import time

import pytest

from model import KVPool, StreamConfig, VideoStreamInference
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, signature
from tests.test_pool import CONFIGS, FRAMES, close, run, same_stream, script
from tests.test_transactions import Interrupt

OTHER_FRAMES = synthetic_frames(40, 84, 112, seed=23)  # another grid size: ragged vision batches
BATCHING = dict(batch_window_ms=5.0, max_wait_ms=30.0)  # a 2-core test machine: wait a little for the others


def drive(jobs: list) -> list:
    """Run each ``job()`` in its own thread; -> their results (a thread's exception is re-raised here)."""
    results, errors = [None] * len(jobs), []

    def worker(k):
        try:
            results[k] = jobs[k]()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a stream's thread is stuck"
    if errors:
        raise errors[0]
    return results


def wait_pending(pool: KVPool, n: int) -> None:
    deadline = time.monotonic() + 60
    while pool.scheduler.pending() < n:
        assert time.monotonic() < deadline, f"{pool.scheduler.pending()} requests pending, expected {n}"
        time.sleep(0.005)


@pytest.mark.slow  # one of the slowest: 12 streams from threads
def test_twelve_streams_from_threads_each_equal_the_stream_alone(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=16_384, page=16, **BATCHING)
    names = list(CONFIGS)
    streams = [(StreamConfig(**CONFIGS[names[k % 4]]), script(100 + k), FRAMES if k % 3 else OTHER_FRAMES)
               for k in range(12)]
    engines = [VideoStreamInference(model, proc, config=cfg, pool=pool) for cfg, _, _ in streams]

    def job(k):
        _, ops, frames = streams[k]
        return [run(engines[k], op, frames) for op in ops]

    results = drive([lambda k=k: job(k) for k in range(12)])
    stats = pool.stats()
    assert stats["max_lm_segments"] > 1 and stats["mean_lm_batch"] > 1, stats
    assert stats["max_vision_grids"] > 1, stats
    for k, (cfg, ops, frames) in enumerate(streams):
        alone = VideoStreamInference(model, proc, config=cfg)
        for op, got in zip(ops, results[k]):
            want = run(alone, op, frames)
            assert close(got, want), (k, op, got, want)
        same_stream(engines[k], alone)
    owned = sum(e.stats()["pool_pages_owned"] for e in engines)
    assert pool.free_pages + owned == pool.config.pages
    for e in engines:
        e.close()
    assert pool.free_pages == pool.config.pages


def poison(engine: VideoStreamInference) -> None:
    """A call whose forward has a token id outside the vocabulary: its part of a batch raises (IndexError)."""
    def work():
        txn = engine.kv.begin()
        engine._stream.writer.feed_ids(txn, [engine.model.config.text_config.vocab_size + 7], logits="last")
        return txn, None

    engine._transaction(work)


def test_a_failure_in_one_streams_part_of_a_batch_fails_only_that_stream(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=4096, page=16, **BATCHING)
    engines = [VideoStreamInference(model, proc, pool=pool) for _ in range(5)]
    alone = [VideoStreamInference(model, proc) for _ in range(5)]
    for k, e in enumerate(engines + alone):
        e.append_frames(FRAMES[k % 5:k % 5 + 4], fps=2)
    bad = engines[4]
    before = signature(bad)
    jobs = [lambda k=k: engines[k].ask(f"What is {k}?", max_new_tokens=3) for k in range(4)]
    failed = []

    def bad_job():
        try:
            poison(bad)
        except IndexError as e:
            failed.append(e)

    with pool.scheduler.paused():  # the five first forwards wait, then run as one batch
        threads = [threading.Thread(target=j) for j in jobs + [bad_job]]
        results = {}
        for k, t in enumerate(threads[:4]):
            threads[k] = threading.Thread(target=lambda k=k: results.__setitem__(k, jobs[k]()))
        for t in threads:
            t.start()
        wait_pending(pool, 5)
    for t in threads:
        t.join(timeout=120)
    stats = pool.stats()
    assert stats["failed_batches"] == 1 and stats["max_lm_segments"] == 5, stats
    assert len(failed) == 1, "the poisoned call did not fail"
    assert_same_signature(before, signature(bad))  # nothing committed
    for k in range(4):
        want = alone[k].ask(f"What is {k}?", max_new_tokens=3)
        assert results[k].token_ids == want.token_ids and close(results[k].first_logits, want.first_logits)
        same_stream(engines[k], alone[k])
    got, want = bad.ask("And you?", max_new_tokens=2), alone[4].ask("And you?", max_new_tokens=2)
    assert got.token_ids == want.token_ids and close(got.first_logits, want.first_logits)


@pytest.mark.slow  # an interrupt sweep
def test_interrupts_in_one_stream_leave_it_and_the_others_intact(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=16_384, page=16, **BATCHING)
    configs = [StreamConfig(**CONFIGS[name]) for name in ("unbounded", "budget-recall", "window", "budget")]
    engines = [VideoStreamInference(model, proc, config=cfg, pool=pool) for cfg in configs]
    victim, others = engines[0], engines[1:]
    ops = [op for op in script(7) if op[0] != "image"]
    rng = random.Random(3)
    injected, completed = [], []

    def interrupted_job():
        for op in ops * 2:
            victim.kv.snapshot()  # count the lines a whole call runs in this thread, then undo it
            counter = Interrupt(0)
            sys.settrace(counter)
            try:
                run(victim, op)
            finally:
                sys.settrace(None)
            victim.kv.restore()
            before = signature(victim)
            tracer = Interrupt(rng.randint(1, 2 * counter.lines))  # past the end of the call: it completes
            sys.settrace(tracer)  # this thread only
            try:
                run(victim, op)
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            finally:
                sys.settrace(None)
            if interrupted:
                injected.append(op)
                assert_same_signature(before, signature(victim))  # nothing committed
            else:
                completed.append(op)

    jobs = [interrupted_job] + [lambda k=k: [run(others[k], op) for op in script(200 + k)] for k in range(3)]
    results = drive(jobs)
    assert len(injected) >= 10 and len(completed) >= 1, (len(injected), len(completed))
    for k, cfg in enumerate(configs[1:]):
        alone = VideoStreamInference(model, proc, config=cfg)
        want = [run(alone, op) for op in script(200 + k)]
        assert all(close(a, b) for a, b in zip(results[k + 1], want)), k
        same_stream(others[k], alone)
    replay = VideoStreamInference(model, proc, config=configs[0])
    for op in completed:
        run(replay, op)
    same_stream(victim, replay)
    assert close(run(victim, ("ask", "Now?", 2)), run(replay, ("ask", "Now?", 2)))
    owned = sum(e.stats()["pool_pages_owned"] for e in engines)
    assert pool.free_pages + owned == pool.config.pages


def test_the_asyncio_calls_of_many_engines_are_batched(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=4096, page=16, **BATCHING)
    engines = [VideoStreamInference(model, proc, pool=pool) for _ in range(6)]

    async def main():
        # a new stream's first forward writes its turn header; from the second chunk on, a chunk starts with its
        # grids: held back until all six are queued, they must go as ONE vision batch (not by timing)
        await asyncio.gather(*(e.append_frames_async(FRAMES[k:k + 2], fps=2) for k, e in enumerate(engines)))
        pool.scheduler.reset_stats()
        with pool.scheduler.paused():
            tasks = [asyncio.ensure_future(e.append_frames_async(FRAMES[k + 2:k + 4], fps=2))
                     for k, e in enumerate(engines)]
            while pool.scheduler.pending() < 6:
                await asyncio.sleep(0.005)
            queued = [type(r.work).__name__ for r in pool.scheduler._queue]
        infos = await asyncio.gather(*tasks)
        answers = await asyncio.gather(*(e.ask_async("What?", max_new_tokens=2) for e in engines))
        return queued, infos, answers

    queued, infos, answers = asyncio.run(main())
    assert queued == ["VisionWork"] * 6, queued
    assert pool.stats()["max_vision_grids"] == 6 and pool.stats()["vision_batches"] == 1, pool.stats()
    for k, (info, answer) in enumerate(zip(infos, answers)):
        alone = VideoStreamInference(model, proc)
        alone.append_frames(FRAMES[k:k + 2], fps=2)
        assert alone.append_frames(FRAMES[k + 2:k + 4], fps=2).cache_len == info.cache_len
        want = alone.ask("What?", max_new_tokens=2)
        assert answer.token_ids == want.token_ids and close(answer.first_logits, want.first_logits)


@pytest.mark.slow  # starts the benchmark's interpreter
@pytest.mark.parametrize("arch", ["qwen2_5_vl-3b", "qwen3_vl-2b"])
def test_the_many_streams_benchmark_runs_on_the_tiny_model(tmp_path, arch):
    """``benchmarks/bench_streams.py --tiny [--arch A]``: N streams through the scheduler on the CPU (the tiny model
    of A's family), its JSON complete."""
    import json
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "streams.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_streams.py", "--tiny", "--streams", "1,3", "--seconds", "4",
                           "--every", "2", "--arch", arch, "--json", str(out), "--profile", str(tmp_path / "prof")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert report["meta"]["arch"] == arch and "--arch " + arch in report["meta"]["command"]
    assert [r["streams"] for r in runs] == [1, 3] and not any(r["errors"] for r in runs)
    for r in runs:
        assert r["aggregate_frames_per_s"] > 0 and r["ttft_ms"]["n"] == 2 * r["streams"]
        assert r["batching"]["lm_batches"] > 0
        table = (tmp_path / "prof" / f"profile_n{r['streams']}.txt").read_text()  # every thread's ops, the lanes'
        assert r["profile"]["wall_s"] > 0 and "aten::" in table


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_every_family_batches_exactly(family):
    """Other families in one batch: Qwen2-VL's tower, Qwen3-VL's interpolated positions and DeepStack rows."""
    from model.testing import build_tiny_model

    model, proc = build_tiny_model(seed=0, family=family)
    frames = synthetic_frames(12, 64, 96, seed=5)
    pool = KVPool.for_model(model, tokens=4096, page=16, **BATCHING)
    configs = [StreamConfig(), StreamConfig(cache_budget_tokens=200, recall_grids=1, recall_host_tokens=64)]
    engines = [VideoStreamInference(model, proc, config=c, pool=pool) for c in configs]

    def job(k):
        engines[k].append_frames(frames[5:12], fps=2)
        return engines[k].ask("What?", max_new_tokens=3)

    for k in range(2):  # a new stream's first forward writes its turn header; the next chunk starts with a grid
        engines[k].append_frames(frames[k:k + 5], fps=2)
    pool.scheduler.reset_stats()
    with pool.scheduler.paused():  # the two streams' first grids of the next chunk go in one vision batch
        results = []
        thread = threading.Thread(target=lambda: results.extend(drive([lambda: job(0), lambda: job(1)])))
        thread.start()
        wait_pending(pool, 2)
        queued = [type(r.work).__name__ for r in pool.scheduler._queue]
    thread.join(timeout=300)
    assert queued == ["VisionWork"] * 2, queued
    assert pool.stats()["max_vision_grids"] == 2, pool.stats()
    for k, cfg in enumerate(configs):
        alone = VideoStreamInference(model, proc, config=cfg)
        alone.append_frames(frames[k:k + 5], fps=2)
        alone.append_frames(frames[5:12], fps=2)
        want = alone.ask("What?", max_new_tokens=3)
        assert results[k].token_ids == want.token_ids and close(results[k].first_logits, want.first_logits)
