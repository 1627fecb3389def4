"""Invariant 3 under every failure: a call that raises, whatever it raised, committed nothing.

- ``KeyboardInterrupt`` injected (``sys.settrace``) at random executed lines of the library and of
  transformers' Qwen2.5-VL modules, during append_frames, append_image, ask, ask(update_state=True)
  and ask_choice: every interrupted call leaves the stream bit-identical (cache, stream_state,
  snapshot depth), and the stream still equals the offline path afterwards.
- Out of memory at each layer of a cache growth: the stream is intact and the next append succeeds.
"""
from __future__ import annotations

import os
import random
import sys
import threading

import pytest
import torch
import transformers.models.qwen2_5_vl as qwen_pkg

import model as library
from model import VideoStreamInference
from model.kv_cache_manager import KVCacheManager
from model.offline import Answer, Question, Video, build_inputs, native_logits
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, signature

ROOTS = (os.path.dirname(library.__file__), os.path.dirname(qwen_pkg.__file__))
EXCLUDE = (os.path.join(ROOTS[0], "testing.py"),)
FRAMES = synthetic_frames(24, 56, 84, seed=11)  # 2x3 merged tokens per temporal patch: fast calls
IMAGE = synthetic_frames(1, 84, 56, seed=12)[0]


class Interrupt:
    """A trace function that raises KeyboardInterrupt at the k-th executed line of the traced files."""

    def __init__(self, k: int):
        self.k, self.lines = k, 0

    def __call__(self, frame, event, arg):
        path = frame.f_code.co_filename
        if not path.startswith(ROOTS) or path in EXCLUDE:
            return None
        return self.local

    def local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.k:
                raise KeyboardInterrupt(f"injected at line {self.k}")
        return self.local


def traced(fn, k: int) -> tuple[bool, int]:
    """Run fn() with an interrupt at line k; returns (interrupted, lines executed)."""
    tracer = Interrupt(k)
    sys.settrace(tracer)
    try:
        fn()
    except KeyboardInterrupt:
        return True, tracer.lines
    finally:
        sys.settrace(None)
    return False, tracer.lines


OPS = {
    "append_frames": lambda e, r: e.append_frames(FRAMES[r.randrange(20):][:r.choice([1, 2, 3])], fps=2),
    "append_image": lambda e, r: e.append_image(IMAGE),
    "ask": lambda e, r: e.ask("What?", max_new_tokens=3),
    "ask_update_state": lambda e, r: e.ask("Why?", update_state=True, max_new_tokens=2),
    "ask_choice": lambda e, r: e.ask_choice("Which?", ["a", "bb c", "d"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("pending", [False, True], ids=["even", "odd-frame-held"])
def test_interrupt_at_random_lines_never_tears_a_call(tiny, pending):
    model, proc = tiny
    engine = VideoStreamInference(model, proc)
    engine.append_frames(FRAMES[:4], fps=2)
    engine.ask("First?", update_state=True, max_new_tokens=2)
    engine.append_frames(FRAMES[4:7] if pending else FRAMES[4:8], fps=2)
    rng = random.Random(pending)
    injected, completed = 0, 0
    for name, op in OPS.items():
        engine.kv.snapshot()  # a save point to undo calls that complete
        _, total = traced(lambda: op(engine, random.Random(0)), 0)  # lines of a whole call
        engine.kv.restore()
        assert total > 20, (name, total)
        for trial in range(112):
            engine.kv.snapshot()
            before = signature(engine)
            interrupted, _ = traced(lambda: op(engine, random.Random(trial)), rng.randint(1, total))
            if interrupted:
                injected += 1
                assert_same_signature(before, signature(engine))  # nothing committed, no snapshot leaked
            else:
                completed += 1  # the call ran fewer lines than k: it completed (and may have committed)
            engine.kv.restore()
    assert injected >= 500, (injected, completed)
    # the stream is still exactly what was committed before the trials
    ans = engine.ask("What now?", max_new_tokens=1)
    transcript = [Video(FRAMES[:4], 2), Question("First?"), Answer(_first_answer(engine)),
                  Video(FRAMES[4:7] if pending else FRAMES[4:8], 2), Question("What now?")]
    ref = native_logits(model, build_inputs(model, proc, transcript))[0, -1]
    assert (ans.first_logits - ref).abs().max() <= 1e-4
    # a lock an interrupted call left held is taken back by this thread's next call: other threads go on
    worker = threading.Thread(target=lambda: engine.ask("Other thread?", max_new_tokens=1))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "another thread is still blocked on the stream's lock"


def _first_answer(engine) -> list[int]:
    """The committed answer of the first turn, re-derived from a fresh stream with the same calls."""
    twin = VideoStreamInference(engine.model, engine.processor)
    twin.append_frames(FRAMES[:4], fps=2)
    return twin.ask("First?", update_state=True, max_new_tokens=2).token_ids


@pytest.mark.parametrize("failing_allocation", range(4), ids=["L0-K", "L0-V", "L1-K", "L1-V"])
def test_out_of_memory_at_each_layer_of_a_growth(tiny, monkeypatch, failing_allocation):
    model, proc = tiny
    engine = VideoStreamInference(model, proc)
    frames = synthetic_frames(40, 140, 196, seed=3)  # 35 tokens per temporal patch
    seen = 0
    while engine.kv.get_seq_length() + 4 * 35 < engine.kv.cache.capacity or seen == 0:
        engine.append_frames(frames[seen % 40:seen % 40 + 2], fps=2)
        seen += 2
    before, buffers = signature(engine), engine.kv.cache.buffers
    layers, heads, dim = model.kv_shape()
    real, calls = torch.zeros, []

    def zeros(*size, **kw):
        if len(size) == 4 and size[0] == 1 and size[1] == heads and size[3] == dim:  # a K/V buffer
            calls.append(size)
            if len(calls) == failing_allocation + 1:
                raise torch.OutOfMemoryError(f"simulated out of memory at allocation {failing_allocation}")
        return real(*size, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        engine.append_frames(frames[:8], fps=2)
    monkeypatch.undo()
    assert engine.kv.cache.buffers is buffers
    assert_same_signature(before, signature(engine))
    info = engine.append_frames(frames[:8], fps=2)
    assert info.tokens_added == 4 * 35 and engine.kv.cache.capacity > buffers[0][0].shape[2]


class AfterCommit:
    """A profile function raising KeyboardInterrupt at the k-th point, from the commit on, where CPython
    delivers an asynchronous exception (Ctrl-C): right after a C call returns, or at a Python function's entry.

    (A trace function can also raise at a bare RETURN_VALUE opcode, where no signal is ever delivered;
    such points are not interrupts a user can cause.)
    """

    def __init__(self, k: int):
        self.k, self.points, self.armed, self.fired = k, 0, False, False

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code is KVCacheManager.commit.__code__:
            self.armed = True
        if self.armed and not self.fired and event in ("c_return", "call"):
            self.points += 1
            if self.points == self.k:
                self.fired = True
                raise KeyboardInterrupt(f"injected at point {self.k} after the commit began")


@pytest.mark.parametrize("name", ["append_frames", "ask_update_state", "append_image"])
def test_a_call_that_committed_returns_normally_and_the_interrupt_comes_with_the_next_call(tiny, name):
    engine = VideoStreamInference(*tiny)
    engine.append_frames(FRAMES[:4], fps=2)
    op, deferred = OPS[name], 0
    for k in range(1, 40):
        engine.kv.snapshot()
        before, head = signature(engine), engine.kv.state
        injector = AfterCommit(k)
        sys.setprofile(injector)
        try:
            op(engine, random.Random(k))
            raised = False
        except KeyboardInterrupt:
            raised = True
        finally:
            sys.setprofile(None)
        if not injector.armed:
            pytest.fail(f"{name}: the commit was never reached")
        if raised:  # the interrupt came before the commit: nothing committed
            assert_same_signature(before, signature(engine))
        else:
            committed = signature(engine)
            assert engine.kv.state is not head, "a call that returned normally committed nothing"
            if injector.fired:  # it landed after the commit: the next call raises it, before touching the stream
                deferred += 1
                with pytest.raises(KeyboardInterrupt, match="after the commit"):
                    engine.ask("Next?", max_new_tokens=1)
                assert_same_signature(committed, signature(engine))
        engine.kv.restore()
        if not injector.fired:
            break
    assert deferred >= 1, "no interrupt landed after a commit: the test would not test it"


def test_a_streamer_that_calls_the_engine_fails_the_call_and_commits_nothing(tiny):
    """A nested call from a streamer's put() cannot run (the stream is mid-call): it raises, so the outer
    call raises before its commit, and the stream is left as it was."""
    engine = VideoStreamInference(*tiny)
    engine.append_frames(FRAMES[:4], fps=2)

    class CallsBack:
        def put(self, value):
            engine.ask("Nested?", max_new_tokens=1)

        def end(self):
            pass

    before = signature(engine)
    for update_state in (True, False):
        with pytest.raises(RuntimeError, match="from inside one of its own calls"):
            engine.ask("Outer?", update_state=update_state, max_new_tokens=3, streamer=CallsBack())
        with pytest.raises(RuntimeError, match="from inside one of its own calls"):
            list(engine.ask_stream("Outer?", update_state=update_state, max_new_tokens=3, streamer=CallsBack()))
        assert_same_signature(before, signature(engine))
    worker = threading.Thread(target=lambda: engine.ask("Other thread?", max_new_tokens=1))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the failed calls left the stream held"
