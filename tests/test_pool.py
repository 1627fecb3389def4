"""A KV pool shared by many streams (``model/kv_pool.py``): pages, their lifetime, and exactness of one pooled stream.

- A pooled stream (unbounded, bounded by tokens or a window, with recall) gives the same logits,
  tokens and choice scores as the same stream on its own engine (fp32, 1e-4) and keeps the same
  tokens (K/V, transcript ranges, eviction counters);
- pages: a stream owns what its reachable heads use; pages go back to the pool on reset, close,
  dropping the engine (no garbage-collector pass) and after eviction; the pool's memory is
  allocated once, when it is built;
- a full pool is a clear error that commits nothing; bad pool arguments are refused.
"""
from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

from model import KVPool, PoolConfig, StreamConfig, VideoStreamInference
from model.testing import synthetic_frames
from tests.conftest import signature

TOL = 1e-4
FRAMES = synthetic_frames(40, 56, 84, seed=21)  # 6 tokens per 2-frame grid
IMAGE = np.asarray(synthetic_frames(1, 84, 56, seed=22)[0])
CONFIGS = {
    "unbounded": dict(),
    "budget": dict(cache_budget_tokens=110),
    "window": dict(video_window_seconds=2.0, sink_frames=0),
    "budget-recall": dict(cache_budget_tokens=120, recall_grids=2, recall_host_tokens=40),
}


def script(seed: int) -> list[tuple]:
    """A random stream: appends of 1..5 frames, questions, choices, committed turns, an image."""
    rng, ops, seen = random.Random(seed), [], 0
    fps = rng.choice([1, 2, 4])
    while seen < 30:
        n = rng.randint(1, 5)
        ops.append(("append", seen, n, fps))
        seen += n
        r = rng.random()
        if r < 0.3:
            ops.append(("ask", f"What is at {seen}?", rng.randint(1, 3)))
        elif r < 0.45:
            ops.append(("choice", "Which?", ["red", "a blue square", "x"][: rng.randint(1, 3)]))
        elif r < 0.55:
            ops.append(("turn", "Describe.", 2))
        elif r < 0.6:
            ops.append(("image",))
    return ops


def run(engine: VideoStreamInference, op: tuple, frames=FRAMES):
    """One operation -> what it returned (a refusal by the budget is a result too: both sides must refuse)."""
    kind = op[0]
    try:
        if kind == "append":
            info = engine.append_frames(frames[op[1]:op[1] + op[2]], fps=op[3])
            return info.cache_len, info.frames_encoded
        if kind == "image":
            return engine.append_image(IMAGE).cache_len
        if kind == "ask":
            a = engine.ask(op[1], max_new_tokens=op[2])
            return a.token_ids, a.first_logits, [(r.seq, r.tokens) for r in a.recalled]
        if kind == "turn":
            return engine.ask(op[1], update_state=True, max_new_tokens=op[2]).token_ids
        return engine.ask_choice(op[1], op[2]).scores
    except ValueError as e:
        assert "after evicting all the video it may evict" in str(e), e
        return ("refused",)


def close(a, b) -> bool:
    """Equal, with tensors and floats to ``TOL``."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and float((a - b).abs().max()) <= TOL
    if isinstance(a, float):
        return abs(a - b) <= TOL
    return a == b


def same_stream(pooled: VideoStreamInference, alone: VideoStreamInference) -> None:
    """The same kept tokens: K/V in transcript order (to TOL), every state field, the same kept ranges."""
    a, b = signature(pooled), signature(alone)
    assert a["length"] == b["length"] and a["snapshots"] == b["snapshots"]
    assert all(close(x, y) for x, y in zip(a["kv"], b["kv"])), "kept K/V differ"
    for name, va in a["state"].items():
        vb = b["state"][name]
        if name == "layout":  # slots may differ (pages); what is kept and what was evicted may not
            if vb is None:
                assert [s.grid for s in va.spans if s.grid >= 0] == list(range(va.grids)) and va.evicted_grids == 0
                continue
            for f in ("grids", "evicted_grids", "evicted_tokens", "kept"):
                assert getattr(va, f) == getattr(vb, f), (f, getattr(va, f), getattr(vb, f))
            assert va.kept_ranges() == vb.kept_ranges() and [s.grid for s in va.stored] == [s.grid for s in vb.stored]
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), name
        else:
            assert va == vb, (name, va, vb)


def owned(engine) -> int:
    return engine.stats()["pool_pages_owned"]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_pooled_stream_equals_the_same_stream_on_its_own(tiny, config):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=2048, page=16)
    cfg = StreamConfig(**CONFIGS[config])
    pooled, alone = VideoStreamInference(model, proc, config=cfg, pool=pool), VideoStreamInference(model, proc, config=cfg)
    for seed in (1, 2):
        for op in script(seed):
            got, want = run(pooled, op), run(alone, op)
            assert close(got, want), (op, got, want)
        same_stream(pooled, alone)
        assert pool.free_pages + owned(pooled) == pool.config.pages
        pooled.reset(keep_memory=seed == 1)
        alone.reset()
        assert owned(pooled) == 0 and pool.free_pages == pool.config.pages
    if cfg.budget() is not None:
        assert pooled.stats()["cache"] == "pool pages+budget"


def test_pages_go_back_on_reset_close_and_when_the_engine_is_dropped(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=1024, page=16)
    engines = [VideoStreamInference(model, proc, pool=pool) for _ in range(3)]
    for k in range(3):
        engines[k].append_frames(FRAMES[:9], fps=2)
        engines[k].ask("Keep?", update_state=True, max_new_tokens=2)
    counts = [owned(e) for e in engines]
    assert all(c > 0 for c in counts) and pool.free_pages == pool.config.pages - sum(counts)
    assert all(c * 16 >= e.stats()["cache_tokens"] > (c - 1) * 16 for c, e in zip(counts, engines))
    engines[0].reset()
    assert pool.free_pages == pool.config.pages - sum(counts[1:])
    engines[1].close()
    assert pool.free_pages == pool.config.pages - counts[2]
    gc.disable()
    try:
        del engines[2]  # no close(), no collection: reference counting alone returns its pages
        assert pool.free_pages == pool.config.pages
    finally:
        gc.enable()
    engines[0].append_frames(FRAMES[:4], fps=2)  # a reset engine takes pages again
    assert owned(engines[0]) > 0


def test_pages_freed_by_eviction_and_dropped_questions_go_back_to_the_pool(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=1024, page=16)
    engine = VideoStreamInference(model, proc, pool=pool,
                                  config=StreamConfig(video_window_seconds=1.0, sink_frames=0))
    engine.append_frames(FRAMES[:20], fps=2)  # 10 s of video in one call: 9 s evicted at its commit
    peak = owned(engine)  # pages the call wrote (evicted slots are released when the next call begins)
    engine.ask("What?", max_new_tokens=1)  # the next call: pages no head uses went back first
    kept = engine.stats()["cache_tokens"]
    assert owned(engine) < peak and owned(engine) <= -(-kept // 16) + 1, (peak, owned(engine), kept)
    assert pool.free_pages + owned(engine) == pool.config.pages
    for i in range(20, 36, 2):  # a long stream under the window: its pages stay few
        engine.append_frames(FRAMES[i:i + 2], fps=2)
        engine.ask_choice("Which?", ["a", "b c"])
        assert owned(engine) <= peak
    before = owned(engine)
    engine.ask("A long question " * 20, max_new_tokens=2)  # isolated: its slots are dropped with it
    engine.append_frames(FRAMES[36:38], fps=2)
    assert owned(engine) <= before


@pytest.mark.slow  # warms up and streams three engines
def test_the_pool_never_allocates_after_it_is_built(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=2048, page=16)
    buffers = pool.buffers
    engines = [VideoStreamInference(model, proc, pool=pool, config=StreamConfig(**CONFIGS[c])) for c in CONFIGS]
    for e in engines:
        e.warmup((56, 84), chunk_frames=4, fps=2)
    for i in range(0, 40, 4):
        for e in engines:
            e.append_frames(FRAMES[i:i + 4], fps=2)
            e.ask("What?", max_new_tokens=2)
    assert pool.buffers is buffers and pool.allocations == 1
    for e in engines:
        assert e.kv.cache.buffers is buffers and e.stats()["cache_allocations"] == 0
        assert e.stats()["cache_reserved_bytes"] == owned(e) * 16 * pool.nbytes_per_token()
    recall = engines[-1]
    assert recall.stats()["evicted_grids"] > 0 and recall.kv.recall.allocations == 1


def test_a_full_pool_is_a_clear_error_and_commits_nothing(tiny):
    model, proc = tiny
    pool = KVPool.for_model(model, tokens=96, page=16)  # 6 pages
    engine = VideoStreamInference(model, proc, pool=pool)
    engine.append_frames(FRAMES[:6], fps=2)  # 63 tokens: 4 pages
    before = signature(engine)
    with pytest.raises(ValueError, match="the KV pool is full"):
        engine.append_frames(FRAMES[6:20], fps=2)
    after = signature(engine)
    assert after["length"] == before["length"] and after["state"]["layout"] == before["state"]["layout"]
    other = VideoStreamInference(model, proc, pool=pool)
    with pytest.raises(ValueError, match="the KV pool is full"):
        other.append_frames(FRAMES[:20], fps=2)
    engine.reset()
    other.append_frames(FRAMES[:6], fps=2)  # the freed pages serve another stream
    assert other.ask("What?", max_new_tokens=1).token_ids


def test_bad_pool_arguments_are_refused(tiny):
    model, proc = tiny
    with pytest.raises(TypeError, match="StreamQwenModel"):
        KVPool("model")
    with pytest.raises(ValueError, match="power of two"):
        PoolConfig(page=48)
    with pytest.raises(ValueError, match="at least one page"):
        PoolConfig(tokens=8, page=16)
    with pytest.raises(TypeError, match="tokens must be an int"):
        PoolConfig(tokens=1.5)
    with pytest.raises(ValueError, match="batch_window_ms"):
        PoolConfig(batch_window_ms=-1)
    with pytest.raises(ValueError, match="graph_question_rows must be a power of two"):
        PoolConfig(graph_question_rows=48)
    pool = KVPool.for_model(model, tokens=256, page=16)
    with pytest.raises(TypeError, match="pool must be a KVPool"):
        VideoStreamInference(model, proc, pool="pool")
    with pytest.raises(ValueError, match="fast=False"):
        VideoStreamInference(model, proc, fast=False, pool=pool)
    engine = VideoStreamInference(model, proc, pool=pool)
    with pytest.raises(ValueError, match="more than the whole KV pool"):
        engine.reserve(10_000)
    with pytest.raises(ValueError, match="snapshot"):
        engine.kv.rollback(0)


def test_closing_the_pool_frees_its_memory_at_once_and_its_streams_refuse_calls(tiny):
    import weakref

    pool = KVPool.for_model(tiny[0], tokens=2048, page=16)
    engine = VideoStreamInference(*tiny, pool=pool)
    engine.append_frames(synthetic_frames(4, 56, 84, seed=3), fps=2)
    buffers = [weakref.ref(t) for kv in pool.buffers for t in kv]
    gc.disable()  # by reference counting alone, while the pool object itself is still referenced
    try:
        pool.close()
        assert all(b() is None for b in buffers), "the pool's K/V buffers outlived close()"
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="scheduler"):
        engine.ask("Still there?", max_new_tokens=1)
    assert pool.stats()["pool_tokens"] == 2048  # its numbers stay readable


def test_a_host_pool_costs_what_is_written_not_its_size(tiny):
    """On the CPU the pool is zero pages the OS commits when first written: a CPU server's 1 GiB default pool costs
    what its sessions have written."""
    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    if not hasattr(torch, "frombuffer") or not __import__("os").path.exists("/proc/self/statm"):
        pytest.skip("needs Linux's /proc to read resident memory")
    before = resident_mib()
    pool = KVPool.for_model(tiny[0], tokens=2**21)  # 2M tokens x 512 bytes: 1 GiB of K/V
    assert pool.capacity * pool.nbytes_per_token() == 2**30  # + the scratch slots of captured batches
    assert pool.reserved_bytes() == (2**21 + pool.scratch.numel()) * pool.nbytes_per_token()
    assert resident_mib() - before < 64
    assert all(float(t.abs().max()) == 0 for t in (pool.buffers[0][0][0, :, :4096], pool.buffers[-1][1][0, :, -4096:]))
    pool.close()


def test_only_batches_of_questions_and_decode_steps_on_the_triton_kernel_are_captured(tiny):
    """``BatchGraphs.bucket``: token segments needing their last row's logits, every one on the Triton kernel, within
    the row and segment caps; padding rows have scratch slots past the pool's pages, which no stream can own."""
    from types import SimpleNamespace as NS

    pool = KVPool.for_model(tiny[0], tokens=1024, page=16, max_graph_rows=64, max_graph_segments=4,
                            graph_question_rows=32)
    graphs = pool.scheduler.graphs

    def work(n=3, kind="ids", logits="last", tree=None, live=True, pages=2):
        seg = NS(n=n, tree=tree, on_query=None, live=live, table=torch.zeros(pages, dtype=torch.int32))
        return NS(kind=kind, logits=logits, deepstack=None, segment=seg, n=n)

    from model.triton_attention import launch_config

    # segments to powers of two, >= 16 pages; questions padded to graph_question_rows (32) rows a segment with
    # the kernel's row block of 32 rows, so questions of any length up to it share a bucket; decode steps alone
    # to powers of two
    q32 = launch_config(graphs.group * 32)[0]
    assert graphs.bucket([work(), work(n=1)]) == (64, 2, 16, q32)
    assert graphs.bucket([work(n=5)]) == graphs.bucket([work(n=20)]) == graphs.bucket([work(n=32)]) == (32, 1, 16, q32)
    assert graphs.bucket([work(n=33)]) == (64, 1, 16, launch_config(graphs.group * 33)[0])  # longer: its own bucket
    # three questions: 4 x 32 padded rows would pass max_graph_rows (64), so their 60 rows go to a power of two
    assert graphs.bucket([work(n=20)] * 3) == (64, 4, 16, launch_config(graphs.group * 20)[0])
    assert graphs.bucket([work(n=1)] * 3) == (4, 4, 16, launch_config(graphs.group)[0])
    assert graphs.bucket([work(pages=40)])[2] == 64 and graphs.bucket([work(pages=65)])[2] == 256
    keys = graphs.keys(streams=5, tokens=2000)  # 125 pages of 16: buckets of 16, 64 and 256 pages
    assert {k[2] for k in keys} == {16, 64, 256} and {k[1] for k in keys} == {1, 2, 4}  # (max_graph_segments)
    assert all(k[0] <= 64 for k in keys) and (1, 1, 16, launch_config(graphs.group)[0]) in keys
    assert (32, 1, 16, q32) in keys and (64, 2, 256, q32) in keys  # what questions of up to 32 rows replay
    for batch in ([work(n=7)], [work(n=30, pages=100)], [work(n=2), work(n=1)], [work(n=1)] * 4):
        assert graphs.bucket(batch) in keys, batch
    assert pool.warm_graphs(streams=5, tokens=2000) == 0  # the CPU captures nothing ahead
    for bad in (work(kind="embeds"), work(kind="probe"), work(logits="all", tree=(2, 3)), work(live=False),
                work(n=65)):
        assert graphs.bucket([work(), bad]) is None, bad
    assert graphs.bucket([work(n=1)] * 5) is None  # more segments than max_graph_segments
    assert pool.scratch.numel() >= 64 and int(pool.scratch.min()) >= pool.capacity
    assert pool.buffers[0][0].shape[2] == pool.capacity + pool.scratch.numel()
    pool.close()
    assert graphs.bucket([work()]) is None  # a closed pool's graphs are gone
    odd = KVPool.for_model(tiny[0], tokens=1024, page=16, max_graph_rows=40)  # 48 scratch slots: no bucket of 64
    assert odd.scheduler.graphs.bucket([work(n=33)]) is None and odd.scheduler.graphs.bucket([work(n=32)]) is not None
    odd.close()
    off = KVPool.for_model(tiny[0], tokens=1024, page=16, batch_graphs=False)
    assert off.scratch.numel() == 0 and off.scheduler.graphs.bucket([work()]) is None
    off.close()
