"""Token streaming: ask_stream yields the answer piece by piece; breaking out leaves no trace.

Also ``ask(streamer=...)`` with transformers' streamer objects, the lock while an answer is
open (nested calls on the same thread are refused, other threads wait), and update_state=True.
"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer

from model import VideoStreamInference
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, signature

FRAMES = synthetic_frames(5, 90, 120, seed=4)


def streamed(tiny) -> VideoStreamInference:
    engine = VideoStreamInference(*tiny)
    engine.append_frames(FRAMES, fps=2)  # odd: a frame is held, padded inside each question
    return engine


def test_pieces_join_to_the_answer_of_ask(tiny):
    engine = streamed(tiny)
    before = signature(engine)
    ref = engine.ask("What is it?", max_new_tokens=20)
    s = engine.ask_stream("What is it?", max_new_tokens=20)
    pieces = list(s)
    assert "".join(pieces) == ref.text and s.answer.token_ids == ref.token_ids and len(pieces) > 1
    assert torch.equal(s.answer.first_logits, ref.first_logits) and s.first_piece_s is not None
    assert_same_signature(before, signature(engine))


@pytest.mark.parametrize("update_state", [False, True])
def test_breaking_out_early_leaves_the_stream_bit_identical(tiny, update_state):
    engine = streamed(tiny)
    before = signature(engine)
    for i, _ in enumerate(engine.ask_stream("Tell me more.", update_state=update_state, max_new_tokens=30)):
        if i == 2:
            break
    assert_same_signature(before, signature(engine))
    with engine.ask_stream("Again?", max_new_tokens=30) as s:
        next(s)
    assert_same_signature(before, signature(engine))
    engine.append_frames(FRAMES[:1], fps=2)  # the stream goes on as if nothing was asked
    assert engine.stream_state.frames_seen == 6


def test_completed_stream_with_update_state_equals_ask(tiny):
    a, b = streamed(tiny), streamed(tiny)
    s = a.ask_stream("Describe.", update_state=True, max_new_tokens=6)
    text = "".join(s)
    ref = b.ask("Describe.", update_state=True, max_new_tokens=6)
    assert text == ref.text and a.stream_state.turns == 1
    assert_same_signature(signature(b), signature(a))


def test_ask_feeds_a_transformers_streamer(tiny):
    engine = streamed(tiny)
    ref = engine.ask("What?", max_new_tokens=15)
    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(streamer))
    reader.start()
    ans = engine.ask("What?", max_new_tokens=15, streamer=streamer)
    reader.join(timeout=30)
    assert not reader.is_alive() and "".join(got) == ans.text == ref.text


def test_an_open_answer_holds_the_stream(tiny):
    engine = streamed(tiny)
    s = engine.ask_stream("Hold on.", max_new_tokens=30)
    next(s)
    with pytest.raises(RuntimeError, match="ask_stream\\(\\) answer is still open"):
        engine.ask("Nested?", max_new_tokens=1)
    done = threading.Event()
    other = threading.Thread(target=lambda: (engine.ask("Other thread?", max_new_tokens=1), done.set()))
    other.start()
    assert not done.wait(0.5), "another thread's call must wait while the answer is open"
    s.close()
    other.join(timeout=30)
    assert done.is_set()


def in_thread(fn) -> None:
    """Run fn in a new thread and wait for it; its exception is raised here."""
    errors = []
    t = threading.Thread(target=lambda: _capture(fn, errors), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the thread is still blocked"
    if errors:
        raise errors[0]


def _capture(fn, errors):
    try:
        fn()
    except BaseException as e:  # handed to the test's thread
        errors.append(e)


def test_an_answer_stepped_and_closed_from_other_threads_holds_and_frees_the_stream(tiny):
    """A server hands an open answer between threads: any thread may step or close it."""
    engine = streamed(tiny)
    before = signature(engine)
    ref = engine.ask("Hand it over.", max_new_tokens=12)
    engine.stop_ids = set()  # so the answer has its 12 tokens to hand around
    s = engine.ask_stream("Hand it over.", max_new_tokens=12)
    pieces = [next(s)]
    for _ in range(2):
        in_thread(lambda: pieces.append(next(s)))
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (engine.ask("Meanwhile?", max_new_tokens=1), done.set()), daemon=True)
    waiter.start()
    assert not done.wait(0.3), "another thread's call must wait while the answer is open"
    in_thread(s.close)
    waiter.join(timeout=60)
    assert done.is_set() and not waiter.is_alive()
    assert ref.text.startswith("".join(pieces)) and s.answer is None
    assert_same_signature(before, signature(engine))
    engine.ask("And the opener too?", max_new_tokens=1)  # the thread that opened it goes on


def test_an_answer_finished_in_another_thread_commits_its_turn(tiny):
    alone, handed = streamed(tiny), streamed(tiny)
    ref = alone.ask("Keep it.", update_state=True, max_new_tokens=6)
    s = handed.ask_stream("Keep it.", update_state=True, max_new_tokens=6)
    rest = []
    first = next(s)
    in_thread(lambda: rest.extend(s))
    assert first + "".join(rest) == ref.text and s.answer.token_ids == ref.token_ids
    assert_same_signature(signature(alone), signature(handed))
    in_thread(lambda: handed.ask("Next?", max_new_tokens=1))


def test_dropping_an_open_answer_frees_the_stream_for_every_thread(tiny):
    engine = streamed(tiny)
    before = signature(engine)
    s = engine.ask_stream("Drop me.", max_new_tokens=20)
    next(s)
    del s
    in_thread(lambda: engine.ask("Other thread?", max_new_tokens=1))
    engine.ask("Same thread?", max_new_tokens=1)
    assert_same_signature(before, signature(engine))
