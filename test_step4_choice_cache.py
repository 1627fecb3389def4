"""Step 4: ask_choice() multiple-choice scoring never pollutes the video stream's cache.

    python test_step4_choice_cache.py
"""
from __future__ import annotations

import functools
import math

from model.report import load_engine, video_path
from model.video_io import load_frames
from test_step1_cache import cache_signature, same_cache

CHOICE_SETS = [
    ["circle", "square", "triangle"],
    ["red", "green", "blue", "yellow"],
    ["yes", "no"],
    ["A person is cooking.", "A ball bounces across the table.", "Nothing moves at all.", "Shapes appear one by one."],
]


@functools.lru_cache(maxsize=1)
def streamed():
    engine, _ = load_engine()
    frames, fps = load_frames(video_path(), 1.0)
    engine.reset()
    n = len(frames) - 1 if len(frames) % 2 == 0 else len(frames)  # an odd count: a frame stays pending
    for i in range(0, n, 4):
        engine.append_frames(frames[i:min(i + 4, n)], fps=fps)
    return engine, frames, fps


def test_every_choice_set_leaves_the_cache_unchanged():
    engine, _, _ = streamed()
    sig, state = cache_signature(engine), engine.state
    for choices in CHOICE_SETS:
        r = engine.ask_choice("Which fits the video best?", choices)
        print(f"    {choices} -> {r.best!r} scores={[round(s, 2) for s in r.scores]}")
        assert same_cache(cache_signature(engine), sig) and engine.state is state
        assert len(r.scores) == len(choices) and all(math.isfinite(s) and s <= 0 for s in r.scores)
        assert r.best == choices[r.index] and r.scores[r.index] == max(r.scores)


def test_choice_scores_are_repeatable():
    engine, _, _ = streamed()
    a = engine.ask_choice("Which shape?", CHOICE_SETS[0])
    b = engine.ask_choice("Which shape?", CHOICE_SETS[0])
    assert a.scores == b.scores


def test_choice_order_does_not_change_scores():
    engine, _, _ = streamed()
    a = engine.ask_choice("Colour?", CHOICE_SETS[1])
    b = engine.ask_choice("Colour?", CHOICE_SETS[1][::-1])
    for c, s in zip(a.choices, a.scores):
        assert abs(b.scores[b.choices.index(c)] - s) < 1e-3 * max(1.0, abs(s))


def test_frames_and_questions_after_choices_still_work():
    engine, frames, fps = streamed()
    sig = cache_signature(engine)
    engine.ask_choice("Which?", CHOICE_SETS[2])
    engine.ask("And?", max_new_tokens=3)
    assert same_cache(cache_signature(engine), sig)
    engine.kv.snapshot()
    info = engine.append_frames(frames[:2], fps=fps)
    assert info.tokens_added > 0
    engine.kv.restore()
    assert same_cache(cache_signature(engine), sig)


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]

if __name__ == "__main__":
    from model.report import main

    main("STEP 4: ask_choice() multiple-choice cache isolation", CHECKS, ("QWEN_MODEL_PATH", "VIDEO_PATH"))
