"""Invariant 6 with eviction on: isolation and atomicity of a bounded stream (recall included).

Asks and choices leave a bounded stream bit-identical (and equal to one never asked); a failing,
refused or interrupted call after an eviction leaves it exactly as before; snapshots survive
evictions; token streaming, clone and reset behave as on an unbounded stream. (Equality with the
masked offline reference, the policy and the settings: ``test_bounded.py``.)
"""
from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import assert_same_signature, signature
from tests.test_bounded import FRAMES, bounded


@pytest.mark.parametrize("recall", [0, 2])
def test_asks_and_choices_leave_a_bounded_stream_bit_identical_and_equal_one_never_asked(tiny, recall):
    asked, quiet = bounded(tiny, recall_grids=recall), bounded(tiny, recall_grids=recall)
    for i in range(0, 24, 3):
        for e in (asked, quiet):
            e.append_frames(FRAMES[i:i + 3], fps=2)
        before = signature(asked)
        a = asked.ask("What?", max_new_tokens=3)
        c = asked.ask_choice("Which?", ["a b", "c", "dd e f"])
        assert_same_signature(before, signature(asked))
        stored = asked.stream_state.layout.stored
        assert len(a.recalled) == len(c.recalled) == min(recall, len(stored))
        assert all(r.end_s > r.start_s and r.tokens == 6 for r in a.recalled)
    assert asked.stream_state.layout.evicted_grids > 0
    assert_same_signature(signature(quiet), signature(asked))


def test_a_failing_append_after_an_eviction_leaves_the_stream_exactly_as_before(tiny, monkeypatch):
    engine = bounded(tiny)
    for i in range(0, 21, 3):
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    assert engine.stream_state.layout.evicted_grids > 0  # the last commits evicted
    before = signature(engine)
    for layer in engine.model.model.language_model.layers:  # out of memory at each layer of an evicting append

        def boom(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (injected)")

        monkeypatch.setattr(layer, "forward", boom)
        with pytest.raises(RuntimeError, match="injected"):
            engine.append_frames(FRAMES[21:30], fps=2)
        monkeypatch.undo()
        assert_same_signature(before, signature(engine))
    twin = bounded(tiny)
    for i in range(0, 21, 3):
        twin.append_frames(FRAMES[i:i + 3], fps=2)
    for e in (engine, twin):
        e.append_frames(FRAMES[21:30], fps=2)
    assert_same_signature(signature(twin), signature(engine))


def test_a_budget_the_stream_cannot_meet_is_refused_and_the_stream_kept(tiny):
    engine = bounded(tiny, cache_budget_tokens=70)
    engine.append_frames(FRAMES[:4], fps=2)
    before = signature(engine)
    with pytest.raises(ValueError, match="cache_budget_tokens=70"):
        engine.append_frames(FRAMES[4:30], fps=2)  # 13 grids in one call: more tokens than the budget
    assert_same_signature(before, signature(engine))
    assert_same_signature(before, signature(engine))
    engine.append_frames(FRAMES[4:6], fps=2)  # smaller calls go on
    for i in range(3):  # committed turns are never evicted: once text fills the budget, a turn is refused
        before = signature(engine)
        try:
            engine.ask("Tell me more about it?", update_state=True, max_new_tokens=2)
        except ValueError as e:
            assert "after evicting all the video it may evict" in str(e)
            assert_same_signature(before, signature(engine))
            break
    else:
        raise AssertionError("three turns fitted a 70-token budget: the test does not reach the refusal")


def test_snapshots_survive_evictions(tiny):
    engine = bounded(tiny)
    for i in range(0, 18, 3):
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    before = signature(engine)
    engine.kv.snapshot()
    for i in range(18, 36, 3):  # evicts the grids the snapshot still holds; their slots must not be reused
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    assert engine.stream_state.layout.evicted_grids > before["state"]["layout"].evicted_grids
    engine.kv.restore()
    assert_same_signature(before, signature(engine))


def test_rollback_is_refused_on_a_bounded_stream(tiny):
    engine = bounded(tiny)
    engine.append_frames(FRAMES[:4], fps=2)
    with pytest.raises(ValueError, match="snapshot"):
        engine.kv.rollback(3)


@pytest.mark.slow
@pytest.mark.parametrize("recall", [0, 2])
def test_interrupts_at_random_lines_of_evicting_calls_commit_nothing(tiny, recall):
    from tests.test_transactions import traced

    engine = bounded(tiny, recall_grids=recall)
    for i in range(0, 21, 3):
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    ops = {"append_frames": lambda r: engine.append_frames(FRAMES[21 + r.randrange(8):][:r.choice([1, 3, 5])], fps=2),
           "ask_update_state": lambda r: engine.ask("Why?", update_state=True, max_new_tokens=2),
           "ask_choice": lambda r: engine.ask_choice("Which?", ["a", "bb c"])}
    rng, injected = random.Random(3), 0
    for name, op in ops.items():
        engine.kv.snapshot()
        _, total = traced(lambda: op(random.Random(0)), 0)
        engine.kv.restore()
        for trial in range(60):
            engine.kv.snapshot()
            before = signature(engine)
            interrupted, _ = traced(lambda: op(random.Random(trial)), rng.randint(1, total))
            if interrupted:
                injected += 1
                assert_same_signature(before, signature(engine))
            engine.kv.restore()
    assert injected >= 150, injected
    twin = bounded(tiny, recall_grids=recall)
    for i in range(0, 21, 3):
        twin.append_frames(FRAMES[i:i + 3], fps=2)
    for e in (engine, twin):  # what the trials left is exactly the stream before them
        e.append_frames(FRAMES[21:26], fps=2)
    assert engine.stream_state.layout.evicted_grids > 0
    assert_same_signature(signature(twin), signature(engine))


def test_token_streaming_reset_and_clone_on_a_bounded_stream_with_recall(tiny):
    engine, fresh = bounded(tiny, recall_grids=2), bounded(tiny, recall_grids=2)
    for e in (engine, fresh):
        for i in range(0, 24, 3):
            e.append_frames(FRAMES[i:i + 3], fps=2)
    assert engine.stream_state.layout.stored
    before = signature(engine)
    full = engine.ask("What?", max_new_tokens=4)
    pieces = engine.ask_stream("What?", max_new_tokens=4)
    assert "".join(pieces) == full.text and pieces.answer.token_ids == full.token_ids
    assert pieces.answer.recalled == full.recalled
    for _ in engine.ask_stream("What?", max_new_tokens=4):
        break  # an early break rolls the answer (and its recalled grids) back
    assert_same_signature(before, signature(engine))
    twin = engine.kv.clone()  # an independent copy: the same kept K/V and stored grids
    assert twin.state == engine.stream_state and twin.recall.nbytes() == engine.kv.recall.nbytes()
    assert all(torch.equal(a, b) for i in range(twin.cache.num_layers) for a, b in zip(twin.layer(i), engine.kv.layer(i)))
    engine.reset()
    assert engine.stream_state.layout.kept == 0 and engine.stats()["recall_host_bytes"] == 0
    for i in range(0, 24, 3):
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    assert_same_signature(signature(fresh), signature(engine))  # a reset stream is a new stream


def test_only_what_a_call_commits_counts_against_the_budget(tiny):
    """An isolated question, its answer and its choices may be longer than the budget (they are never
    kept); a turn kept with ``update_state`` counts, and one that cannot fit is refused before decoding."""
    engine = bounded(tiny, cache_budget_tokens=90)
    for i in range(0, 24, 2):
        engine.append_frames(FRAMES[i:i + 2], fps=2)
    assert engine.stats()["evicted_grids"] > 0
    engine.stop_ids = set()  # answers run to max_new_tokens
    before = signature(engine)
    long = "Describe every detail of the scene, please. " * 3  # > 90 tokens on its own
    answer = engine.ask(long, max_new_tokens=120)
    assert answer.num_tokens == 120
    assert "".join(engine.ask_stream(long, max_new_tokens=100)) and len(engine.ask_choice(long, ["a", "b " * 60]).scores) == 2
    assert_same_signature(before, signature(engine))
    with pytest.raises(ValueError, match="cache_budget_tokens=90"):
        engine.ask(long, update_state=True, max_new_tokens=120)
    assert_same_signature(before, signature(engine))
    engine.ask("Short?", update_state=True, max_new_tokens=3)  # a turn that fits is kept
    assert engine.stats()["turns"] == 1
