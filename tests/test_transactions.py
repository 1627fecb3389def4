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
from model.offline import build_inputs, native_logits
from model.prompt import QUESTION_MARK, VISION_END, VISION_START
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
    p = engine.pieces
    head, tail = p.question_tail.split(QUESTION_MARK)
    transcript = [("text", p.first_turn_header + VISION_START), ("video", FRAMES[:4], 2),
                  ("text", VISION_END + p.question("First?")), ("ids", _first_answer(engine)),
                  ("text", p.answer_tail + p.turn_header + VISION_START),
                  ("video", FRAMES[4:7] if pending else FRAMES[4:8], 2), ("text", VISION_END + head),
                  ("user", "What now?"), ("text", tail)]
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
