"""Invariants 2-3 (isolation, atomic append): questions and failures leave no trace in the stream."""
from __future__ import annotations

import pytest
import torch

from model import VideoStreamInference
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, signature

FRAMES = synthetic_frames(12, 90, 120, seed=7)


def streamed(engine, chunks, fps=4):
    seen = 0
    for c in chunks:
        engine.append_frames(FRAMES[seen:seen + c], fps=fps)
        seen += c
    return seen


@pytest.mark.parametrize("pending", [False, True], ids=["even", "odd-frame-held"])
def test_ask_and_ask_choice_leave_stream_bit_identical(engine, pending):
    streamed(engine, [4, 3] if pending else [4, 4])
    assert (engine.state.pending_frame is not None) == pending
    before = signature(engine)
    engine.ask("What is there?", max_new_tokens=6)
    assert_same_signature(before, signature(engine))
    engine.ask_choice("Which shape?", ["circle", "square", "triangle"])
    assert_same_signature(before, signature(engine))
    engine.ask("Again?", max_new_tokens=3, do_sample=True, temperature=0.7, top_k=20, seed=1)
    assert_same_signature(before, signature(engine))
    assert engine.kv.snapshot_depth == 0


def test_frames_after_a_question_equal_a_stream_never_asked(tiny):
    model, proc = tiny
    asked = VideoStreamInference(model, proc)
    streamed(asked, [3, 2])
    asked.ask("First?", max_new_tokens=5)
    asked.ask_choice("Shape?", ["circle", "square"])
    asked.append_frames(FRAMES[5:12], fps=4)
    a = asked.ask("Now?", max_new_tokens=4)
    asked_sig = signature(asked)

    never = VideoStreamInference(model, proc)
    streamed(never, [3, 2, 7])
    b = never.ask("Now?", max_new_tokens=4)
    assert_same_signature(signature(never), asked_sig)
    assert torch.equal(a.first_logits, b.first_logits) and a.token_ids == b.token_ids


def test_failed_append_midway_leaves_stream_unchanged(engine, monkeypatch):
    streamed(engine, [3])
    before = signature(engine)
    layer = engine.model.model.language_model.layers[1]

    def boom(*args, **kwargs):
        raise RuntimeError("simulated CUDA out of memory in layer 1")

    monkeypatch.setattr(layer, "forward", boom)  # layer 0 has already written K/V for the chunk
    with pytest.raises(RuntimeError, match="simulated"):
        engine.append_frames(FRAMES[3:8], fps=4)
    monkeypatch.undo()
    assert_same_signature(before, signature(engine))
    assert engine.kv.snapshot_depth == 0
    # and the stream goes on as if the failure never happened
    engine.append_frames(FRAMES[3:8], fps=4)
    ref = VideoStreamInference(*engine_model_proc(engine))
    streamed(ref, [3, 5])
    assert_same_signature(signature(ref), signature(engine))


def engine_model_proc(engine):
    return engine.model, engine.processor


def test_failed_ask_leaves_stream_unchanged(engine, monkeypatch):
    streamed(engine, [5])
    before = signature(engine)
    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in lm_head")

    monkeypatch.setattr(engine.model.lm_head, "forward", boom)  # after the question's K/V were written
    with pytest.raises(RuntimeError, match="simulated"):
        engine.ask("What?", update_state=True)
    monkeypatch.undo()
    assert_same_signature(before, signature(engine))


def test_snapshot_and_restore_cost_no_copy(engine):
    streamed(engine, [6])
    k0 = engine.kv.cache.buffers[0][0]
    ptr, reserved = k0.data_ptr(), engine.kv.reserved_bytes()
    engine.kv.snapshot()
    engine.ask("x?", max_new_tokens=2)
    engine.kv.restore()
    assert engine.kv.cache.buffers[0][0].data_ptr() == ptr and engine.kv.reserved_bytes() == reserved
