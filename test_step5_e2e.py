"""Step 5: end-to-end temporal understanding with real weights (needs QWEN_MODEL_PATH).

Single-image mode: one still image of a coloured shape, "what shape / colour is it?".
Multi-frame chunk mode: a video where differently coloured shapes appear one after another,
streamed in chunks; "what appeared last?" must name the last shape's colour. Answers are
checked both as free text (ask) and as multiple choice (ask_choice). Random weights cannot
answer anything, so without a checkpoint every check skips with a clear message.

    QWEN_MODEL_PATH=/path/to/Qwen2.5-VL-3B-Instruct python test_step5_e2e.py
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

COLOURS = {"red": (230, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
SHAPES = ["circle", "square", "triangle"]
SIZE = 448


def draw(shapes: list[tuple[str, str]]) -> np.ndarray:
    """An RGB frame with the given (shape, colour) pairs side by side on white."""
    import cv2

    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    step = SIZE // (len(shapes) + 1)
    for k, (shape, colour) in enumerate(shapes):
        x, y, r, c = step * (k + 1), SIZE // 2, SIZE // 10, COLOURS[colour]
        if shape == "circle":
            cv2.circle(img, (x, y), r, c, -1)
        elif shape == "square":
            cv2.rectangle(img, (x - r, y - r), (x + r, y + r), c, -1)
        else:
            cv2.fillPoly(img, [np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)], c)
    return img


@functools.lru_cache(maxsize=1)
def engine():
    from model.report import environment_problems

    problems = environment_problems("QWEN_MODEL_PATH")  # a set path that names no folder is an error, not a skip
    if problems:
        raise ValueError(problems[0])
    path = os.environ.get("QWEN_MODEL_PATH")
    if not path:
        pytest.skip("step 5 needs real weights: set QWEN_MODEL_PATH to a Qwen2.5-VL checkpoint folder")
    from model import VideoStreamInference

    return VideoStreamInference.from_pretrained(path)


def test_single_image_mode():
    e = engine()
    e.reset()
    e.append_image(draw([("circle", "red")]))
    ans = e.ask("What colour is the shape in the image? Answer with one word.", max_new_tokens=8)
    print(f"    answer: {ans.text!r} (TTFT {ans.ttft_s * 1e3:.0f} ms)")
    assert "red" in ans.text.lower()
    choice = e.ask_choice("Which shape is shown?", SHAPES)
    print(f"    choice: {choice.best!r} {[round(s, 2) for s in choice.scores]}")
    assert choice.best == "circle"


def test_multi_frame_chunks_what_appeared_last():
    e = engine()
    e.reset()
    sequence = [("square", "green"), ("triangle", "blue"), ("circle", "yellow")]
    shown = []
    for item in sequence:  # each new shape stays on screen for 1 s at 4 fps, streamed in 2-frame chunks
        shown.append(item)
        frame = draw(shown)
        for _ in range(2):
            e.append_frames([frame, frame], fps=4)
    ans = e.ask("Which colour was the shape that appeared last? Answer with one word.", max_new_tokens=8)
    print(f"    answer: {ans.text!r}")
    assert "yellow" in ans.text.lower()
    choice = e.ask_choice("Which shape appeared last?", SHAPES)
    print(f"    choice: {choice.best!r}")
    assert choice.best == "circle"


def test_frames_of_different_colours_in_sequence():
    e = engine()
    e.reset()
    for colour in ["red", "green", "blue"]:  # full-frame colour changes, 4-frame chunks
        frame = np.tile(np.array(COLOURS[colour], np.uint8), (SIZE, SIZE, 1))
        e.append_frames([frame] * 4, fps=2)
    choice = e.ask_choice("What colour was the screen at the end of the video?", ["red", "green", "blue"])
    print(f"    choice: {choice.best!r} {[round(s, 2) for s in choice.scores]}")
    assert choice.best == "blue"


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]

if __name__ == "__main__":
    from model.report import main

    main("STEP 5: end-to-end temporal understanding (real weights)", CHECKS, ("QWEN_MODEL_PATH",))
