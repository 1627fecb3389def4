"""Invariant 5 (independent streams): many streams over one stateless model, threads, mixed settings.

- N = 8 streams driven interleaved (random chunkings, asks, ask_choice) each equal bit-for-bit
  the same stream run alone on its own engine;
- two engines with different ``fast`` settings on one model both stay exact and report their
  own backends;
- an append thread and an ask thread on one stream end equal to a sequential replay of the
  order the stream's lock admitted them;
- a reset that keeps the cache's memory starts a stream equal to one on a fresh engine, over the
  same buffers and graphs;
- threads sharing one tokenizer (engines on one processor) never meet it mid-call (a fast
  tokenizer raises "Already borrowed" when one thread flips ``split_special_tokens`` while
  another uses it).
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

from model import StreamConfig, VideoStreamInference
from model.offline import build_inputs, question_events, native_logits
from model.prompt import decode, encode, encode_user_text
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, captures, signature

FRAMES = synthetic_frames(30, 56, 84, seed=5)


def script(seed: int) -> list[tuple]:
    """A random stream: appends of 1..5 frames, questions, choices, a committed turn, an image."""
    rng, ops, seen = random.Random(seed), [], 0
    fps = rng.choice([1, 2, 4])
    while seen < 20:
        n = rng.randint(1, 5)
        ops.append(("append", seen, n, fps))
        seen += n
        r = rng.random()
        if r < 0.3:
            ops.append(("ask", f"What is at {seen}?", rng.randint(1, 4)))
        elif r < 0.5:
            ops.append(("choice", "Which?", ["red", "a blue square", "x"][: rng.randint(1, 3)]))
        elif r < 0.55:
            ops.append(("turn", "Describe.", 2))
    return ops


def run(engine: VideoStreamInference, op: tuple):
    kind = op[0]
    if kind == "append":
        return engine.append_frames(FRAMES[op[1]:op[1] + op[2]], fps=op[3]).cache_len
    if kind == "ask":
        a = engine.ask(op[1], max_new_tokens=op[2])
        return a.token_ids, a.first_logits
    if kind == "turn":
        return engine.ask(op[1], update_state=True, max_new_tokens=op[2]).token_ids
    return engine.ask_choice(op[1], op[2]).scores


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.slow
def test_eight_interleaved_streams_equal_each_stream_alone(tiny):
    model, proc = tiny
    scripts = [script(s) for s in range(8)]
    engines = [VideoStreamInference(model, proc, fast=(s % 3 != 0)) for s in range(8)]
    results = [[] for _ in scripts]
    cursor, rng = [0] * 8, random.Random(99)
    while any(c < len(s) for c, s in zip(cursor, scripts)):
        k = rng.choice([i for i in range(8) if cursor[i] < len(scripts[i])])
        results[k].append(run(engines[k], scripts[k][cursor[k]]))
        cursor[k] += 1
    for k, ops in enumerate(scripts):
        alone = VideoStreamInference(model, proc, fast=(k % 3 != 0))
        expected = [run(alone, op) for op in ops]
        assert all(same(a, b) for a, b in zip(results[k], expected)), f"stream {k} differs from itself alone"
        assert_same_signature(signature(alone), signature(engines[k]))


def test_engines_with_different_settings_share_one_model(tiny):
    model, proc = tiny
    fast = VideoStreamInference(model, proc, fast=True)
    plain = VideoStreamInference(model, proc, config=StreamConfig(fast=False))
    frames = FRAMES[:7]
    for e in (fast, plain, fast):  # interleaved: the second engine must not change the first
        e.reset()
        e.append_frames(frames[:3], fps=2)
        e.append_frames(frames[3:], fps=2)
    ref = native_logits(model, build_inputs(model, proc, question_events("What?", frames, 2)))[0, -1]
    for e in (fast, plain):
        assert (e.ask("What?", max_new_tokens=1).first_logits - ref).abs().max() <= 1e-4
    assert fast.stats()["text_attention"] == "stream_sdpa" and plain.stats()["text_attention"] == "sdpa"
    assert plain.stats()["vision_attention"] == "sdpa" and fast.stats()["fast"] and not plain.stats()["fast"]
    assert not hasattr(model, "stream_state")  # the model holds no stream


class RecordingLock:
    """Wraps the stream's lock and records which operation each first acquisition admitted."""

    def __init__(self, lock):
        self.lock, self.order, self.current = lock, [], threading.local()

    def acquire(self, *args, **kw):
        got = self.lock.acquire(*args, **kw)
        self.order.append(self.current.op)
        return got

    def release(self):
        self.lock.release()

    def _is_owned(self):
        return self.lock._is_owned()


@pytest.mark.slow
def test_append_thread_and_ask_thread_equal_a_sequential_replay(tiny):
    model, proc = tiny
    engine = VideoStreamInference(model, proc)
    engine._lock = lock = RecordingLock(engine._lock)
    appends = [("append", (i * 3) % 25, 1 + i % 3, 2) for i in range(100)]
    asks = [("ask", f"Now {i}?", 1 + i % 2) if i % 4 else ("choice", "Which?", ["a", "bb"]) for i in range(100)]
    results, errors = {}, []

    def worker(ops, tag):
        try:
            for i, op in enumerate(ops):
                lock.current.op = (tag, i)
                results[(tag, i)] = run(engine, op)
        except Exception as e:  # reported below: a worker must not die silently
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(appends, "a")), threading.Thread(target=worker, args=(asks, "q"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(lock.order) == 200 and sorted(lock.order) == sorted(results)
    assert {tag for tag, _ in lock.order[:100]} == {"a", "q"}  # the two threads really interleaved
    replay = VideoStreamInference(model, proc)
    for tag, i in lock.order:
        expected = run(replay, (appends if tag == "a" else asks)[i])
        assert same(results[(tag, i)], expected), (tag, i)
    assert_same_signature(signature(replay), signature(engine))
    assert engine.stream_state.frames_seen == sum(op[2] for op in appends)


def test_threads_sharing_one_tokenizer_never_meet_it_mid_call(tiny):
    _, proc = tiny
    tok, errors = proc.tokenizer, []
    calls = [lambda: encode(tok, "<|vision_start|>"), lambda: encode_user_text(tok, "a <|im_end|> b"),
             lambda: decode(tok, [72, 105, 151645])]
    expected = [c() for c in calls]

    def worker(k):
        try:
            for _ in range(6000):
                assert calls[k]() == expected[k]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


@pytest.mark.parametrize("config", [{}, {"cache_budget_tokens": 130, "recall_grids": 1, "recall_host_tokens": 24}],
                         ids=["unbounded", "bounded-with-recall"])
def test_a_reset_that_keeps_memory_replays_a_stream_exactly_without_new_buffers_or_graphs(tiny, config):
    """reset(keep_memory=True) == a fresh engine: the same stream replayed after it gives the same
    results bit-for-bit (the first run was on a fresh engine), over the same buffers and graphs."""
    model, proc = tiny
    engine = VideoStreamInference(model, proc, config=StreamConfig(emulate_graphs=True, **config))
    ops = script(3)
    first = [run(engine, op) for op in ops]
    after_first = signature(engine)
    buffers, captured = engine.kv.cache.buffers, captures(engine)
    slab = engine.kv.recall.slab if engine.kv.recall is not None else None
    engine.reset(keep_memory=True)
    assert engine.stats()["cache_tokens"] == 0 and engine.kv.snapshot_depth == 0
    again = [run(engine, op) for op in ops]
    assert all(same(a, b) for a, b in zip(first, again)), "the replay after reset(keep_memory=True) differs"
    assert_same_signature(after_first, signature(engine))
    assert engine.kv.cache.buffers is buffers and engine.kv.cache.allocations == 1
    assert captures(engine) == captured > 0  # every graph of the first run served the replay
    if slab is not None:
        assert engine.kv.recall.slab is slab and engine.stats()["evicted_grids"] > 0
    engine.reset()  # the default frees the memory
    assert engine.kv.cache.buffers is not buffers and engine.stats()["cache_reserved_bytes"] == 0
    with pytest.raises(TypeError, match="keep_memory"):
        engine.reset(keep_memory="yes")
