"""Bad input gets a clear exception that names the problem, and the stream is left unchanged."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from model import StreamConfig, VideoStreamInference
from model.offline import build_inputs, question_events, native_logits
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, signature

GOOD = synthetic_frames(3, 90, 120)

BAD_FRAMES = [
    ([], ValueError, "empty"),
    (np.zeros((90, 120), np.uint8), ValueError, "grayscale"),
    (np.zeros((90, 120, 4), np.uint8), ValueError, "RGBA"),
    (np.zeros((90, 120, 3), np.int32), TypeError, "int32"),
    (np.zeros((2, 2, 90, 120, 3), np.uint8), ValueError, "shape"),
    (torch.full((90, 120, 3), float("nan")), ValueError, "NaN"),
    (torch.full((3, 90, 120), 2.0), ValueError, r"\[0, 1\]"),
    (Image.new("L", (120, 90)), ValueError, "mode"),
    (Image.new("RGBA", (120, 90)), ValueError, "mode"),
    ("frame.png", TypeError, "str"),
    ([GOOD[0], None], TypeError, "frame 1"),
    (np.zeros((1, 90, 3), np.uint8), ValueError, "too small"),
]


@pytest.mark.parametrize("frames,exc,match", BAD_FRAMES, ids=[str(i) for i in range(len(BAD_FRAMES))])
@pytest.mark.parametrize("pending", [False, True])
def test_bad_frames_raise_and_leave_stream_unchanged(engine, frames, exc, match, pending):
    engine.append_frames(GOOD[:3] if pending else GOOD[:2], fps=2)
    before = signature(engine)
    with pytest.raises(exc, match=match):
        engine.append_frames(frames, fps=2)
    assert_same_signature(before, signature(engine))


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), "30", True])
def test_bad_fps(engine, fps):
    engine.append_frames(GOOD[:2], fps=2)
    before = signature(engine)
    with pytest.raises(ValueError, match="fps"):
        engine.append_frames(GOOD[:2], fps=fps)
    assert_same_signature(before, signature(engine))


def test_fps_change_inside_one_video_is_refused(engine):
    engine.append_frames(GOOD[:2], fps=2)
    before = signature(engine)
    with pytest.raises(ValueError, match="fps changed"):
        engine.append_frames(GOOD[:2], fps=30)
    assert_same_signature(before, signature(engine))
    engine.append_frames(GOOD[:2])  # fps=None keeps the stream's fps
    assert engine.state.fps == 2


@pytest.mark.parametrize("call,exc,match", [
    (lambda e: e.ask(42), TypeError, "question must be a str"),
    (lambda e: e.ask(None), TypeError, "question must be a str"),
    (lambda e: e.ask("   "), ValueError, "empty"),
    (lambda e: e.ask("ok?", max_new_tokens=0), ValueError, "max_new_tokens"),
    (lambda e: e.ask("ok?", beams=4), TypeError, "unknown generation option"),
    (lambda e: e.ask("ok?", do_sample=True, temperature=0), ValueError, "temperature"),
    (lambda e: e.ask_choice("ok?", []), ValueError, "choices is empty"),
    (lambda e: e.ask_choice("ok?", ["a", "b", "a"]), ValueError, "duplicate"),
    (lambda e: e.ask_choice("ok?", "ab"), TypeError, "list of strings"),
    (lambda e: e.ask_choice("ok?", ["a", 3]), TypeError, "must be a str"),
    (lambda e: e.ask_choice("ok?", ["a", ""]), ValueError, "empty"),
    (lambda e: e.ask_choice(["ok?"], ["a"]), TypeError, "question"),
    (lambda e: e.append_image(GOOD[:2]), ValueError, "one image"),
])
def test_bad_questions_and_choices(engine, call, exc, match):
    engine.append_frames(GOOD, fps=2)  # odd: a frame is held
    before = signature(engine)
    with pytest.raises(exc, match=match):
        call(engine)
    assert_same_signature(before, signature(engine))


def test_frame_of_different_size_midstream_is_resized(engine, tiny):
    model, proc = tiny
    big = synthetic_frames(4, 180, 240, seed=2)  # same aspect, twice the size
    odd = synthetic_frames(1, 100, 100, seed=3)  # other aspect too
    engine.append_frames(GOOD[:2], fps=4)
    engine.append_frames(big + odd, fps=4)
    assert engine.state.frame_size == (84, 112)
    ans = engine.ask("What?", max_new_tokens=2)
    ref = native_logits(model, build_inputs(model, proc, question_events("What?", GOOD[:2] + big + odd, 4)))
    assert (ans.first_logits - ref[0, -1]).abs().max() <= 1e-4


def test_accepted_frame_types_give_identical_caches(tiny):
    model, proc = tiny
    f = GOOD[0]
    variants = [
        [f, f], np.stack([f, f]), [Image.fromarray(f)] * 2, [torch.from_numpy(f)] * 2,
        [torch.from_numpy(f).permute(2, 0, 1)] * 2, [torch.from_numpy(f).float() / 255] * 2,
    ]
    sigs = []
    for v in variants:
        e = VideoStreamInference(model, proc)
        e.append_frames(v, fps=2)
        sigs.append(signature(e))
    for s in sigs[1:]:
        assert_same_signature(sigs[0], s)


def test_missing_model_path():
    with pytest.raises(ValueError, match="Model not found"):
        VideoStreamInference.from_pretrained("/no/such/qwen/checkpoint")


def test_plain_transformers_model_is_refused(tiny):
    with pytest.raises(TypeError, match="StreamQwenModel"):
        VideoStreamInference(torch.nn.Linear(2, 2), tiny[1])


@pytest.mark.parametrize("call,exc,match", [
    (lambda e: e.ask("ok?", update_state="no"), TypeError, "update_state must be True or False"),
    (lambda e: e.ask("ok?", update_state=1), TypeError, "update_state must be True or False"),
    (lambda e: e.ask("bad \udc80 text"), ValueError, "question is not valid Unicode"),
    (lambda e: e.ask_choice("ok?", ["a", "b\ud800"]), ValueError, "choice 1 is not valid Unicode"),
    (lambda e: e.ask("ok?", max_new_tokens=10**9), ValueError, "max_position_embeddings"),
    (lambda e: e.ask("ok?", max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (lambda e: e.append_frames(GOOD[:2], fps=1e-6), ValueError, "fps must be between"),
    (lambda e: e.append_frames(GOOD[:2], fps=1e-30), ValueError, "fps must be between"),
    (lambda e: e.append_frames(GOOD[:2], fps=np.float32("nan")), ValueError, "fps"),
])
def test_bad_arguments_name_themselves_and_leave_stream_unchanged(engine, call, exc, match):
    engine.append_frames(GOOD, fps=2)
    before = signature(engine)
    with pytest.raises(exc, match=match):
        call(engine)
    assert_same_signature(before, signature(engine))


@pytest.mark.parametrize("fps", [np.float32(4.0), np.int64(4), np.float64(4.0)])
def test_numpy_fps_is_accepted(tiny, fps):
    model, proc = tiny
    a, b = VideoStreamInference(model, proc), VideoStreamInference(model, proc)
    a.append_frames(GOOD, fps=fps)
    b.append_frames(GOOD, fps=4)
    assert_same_signature(signature(a), signature(b))
    assert type(a.stream_state.fps) is float


def test_fps_omitted_on_a_new_stream_warns_once(engine):
    with pytest.warns(UserWarning, match="without fps on a new stream"):
        engine.append_frames(GOOD[:2])
    assert engine.stream_state.fps == engine.config.default_fps
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.append_frames(GOOD[:2])  # the stream's fps now: no second warning


def test_bad_config_is_refused_at_construction(tiny):
    from model import StreamConfig

    for kw, exc, match in [(dict(fast="yes"), TypeError, "fast must be True or False"),
                           (dict(grow_min=0), ValueError, "grow_min must be >= 1"),
                           (dict(graph_buckets=(16, 1)), ValueError, "graph_buckets"),
                           (dict(default_fps=0), ValueError, "default_fps"),
                           (dict(initial_capacity=-1), ValueError, "initial_capacity")]:
        with pytest.raises(exc, match=match):
            StreamConfig(**kw)
    with pytest.raises(TypeError, match="fast must be True or False"):
        VideoStreamInference(*tiny, fast="False")
    with pytest.raises(TypeError, match="config must be a StreamConfig"):
        VideoStreamInference(*tiny, config={"fast": True})


def test_env_paths_that_do_not_exist_are_errors_not_random_weights(monkeypatch, capsys):
    from model.report import model_path, video_path

    monkeypatch.setenv("QWEN_MODEL_PATH", "/no/such/checkpoint")
    with pytest.raises(ValueError, match="Model not found.*/no/such/checkpoint"):
        model_path()
    monkeypatch.setenv("VIDEO_PATH", "/no/such/clip.mp4")
    with pytest.raises(ValueError, match="Cannot open video.*/no/such/clip.mp4"):
        video_path()
    monkeypatch.delenv("QWEN_MODEL_PATH")
    assert model_path() is None and "not set" in capsys.readouterr().out


def test_long_questions_and_choices_are_refused_before_any_forward(tiny, monkeypatch):
    """A question (or choice) longer than StreamConfig.max_question_tokens is refused up front, in
    milliseconds, whatever its size: it never reaches a forward or an allocation."""
    engine = VideoStreamInference(*tiny, config=StreamConfig(max_question_tokens=300))
    engine.append_frames(GOOD[:2], fps=2)
    before = signature(engine)

    def no_forward(*a, **k):
        raise AssertionError("a forward ran for a question that must be refused")

    monkeypatch.setattr(type(tiny[0]), "forward_segment", no_forward)
    long, huge = "x" * 301, "y" * 1_000_000  # the tiny tokenizer has a token per byte
    calls = [lambda q: engine.ask(q), lambda q: next(engine.ask_stream(q)), lambda q: engine.ask_choice(q, ["a"]),
             lambda q: engine.ask_choice("Which?", ["a", q]), lambda q: engine.ask(q, update_state=True)]
    for call in calls:
        for text in (long, huge):
            t0 = time.perf_counter()
            with pytest.raises(ValueError, match="max_question_tokens=300"):
                call(text)
            assert time.perf_counter() - t0 < 2.0
    assert_same_signature(before, signature(engine))
    monkeypatch.undo()
    assert engine.ask("x" * 300, max_new_tokens=1).num_tokens == 1  # at the limit: answered
    with pytest.raises(ValueError, match="max_question_tokens"):
        StreamConfig(max_question_tokens=0)


def test_every_frame_of_a_call_is_checked_not_only_a_blocks_first(engine):
    """Frames under the processor's minimum or of aspect ratio over 200 are refused wherever they come."""
    engine.append_frames(GOOD[:2], fps=2)
    before = signature(engine)
    for bad, match in ((np.zeros((20, 20, 3), np.uint8), "too small"),
                       (np.zeros((30, 7000, 3), np.uint8), "aspect ratio")):
        with pytest.raises(ValueError, match=match):
            engine.append_frames([GOOD[2], bad], fps=2)
        with pytest.raises(ValueError, match=match):
            engine.append_frames(bad, fps=2)
        with pytest.raises(ValueError, match=match):
            engine.append_image(bad)
    assert_same_signature(before, signature(engine))
