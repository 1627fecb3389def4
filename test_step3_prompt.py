"""Step 3: prompt scaffolding: _extract_vision_segment across template shapes (CPU, no model).

    python test_step3_prompt.py     # prints a report, exits non-zero on a failed check
    pytest test_step3_prompt.py
"""
from __future__ import annotations

import functools
import tempfile

import pytest

from model import VideoStreamInference
from model.prompt import prompt_pieces, render
from model.testing import load_processor, write_processor_files

extract = VideoStreamInference._extract_vision_segment
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@functools.lru_cache(maxsize=1)
def processor():
    return load_processor(write_processor_files(tempfile.mkdtemp(prefix="step3-")))


def test_normal_video_prompt_splits_around_the_vision_block():
    prompt = f"{SYS}<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    before, vision, after = extract(prompt)
    assert before == f"{SYS}<|im_start|>user\n"
    assert vision == "<|vision_start|><|video_pad|><|vision_end|>"
    assert after == "What?<|im_end|>\n<|im_start|>assistant\n"
    assert before + vision + after == prompt


def test_image_prompt_splits_the_same_way():
    before, vision, after = extract("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n")
    assert vision == "<|vision_start|><|image_pad|><|vision_end|>" and after == "Q<|im_end|>\n"


def test_fallback_without_vision_tokens_cuts_at_the_last_user_turn():
    prompt = f"{SYS}<|im_start|>user\nhello<|im_end|>\n<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\n"
    before, vision, after = extract(prompt)
    assert vision == "" and before.endswith("<|im_start|>user\n") and after.startswith("What?")
    assert before + after == prompt


def test_fallback_without_any_chat_markup():
    assert extract("just a question") == ("", "", "just a question")


def test_several_vision_segments_stay_in_the_vision_part():
    prompt = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>and "
              "<|vision_start|><|image_pad|><|vision_end|>Compare.<|im_end|>\n")
    before, vision, after = extract(prompt)
    assert before == "<|im_start|>user\n"
    assert vision.count("<|vision_start|>") == 2 and vision.endswith("<|image_pad|><|vision_end|>")
    assert after == "Compare.<|im_end|>\n"


def test_empty_prompt():
    assert extract("") == ("", "", "")


def test_unbalanced_or_misordered_markers_raise():
    with pytest.raises(ValueError, match="vision_start"):
        extract("<|vision_start|><|video_pad|>")
    with pytest.raises(ValueError, match="before the first"):
        extract("<|vision_end|>x<|vision_start|>")
    with pytest.raises(TypeError, match="prompt must be a str"):
        extract(None)


def test_prompt_pieces_reassemble_the_chat_template():
    proc = processor()
    pieces = prompt_pieces(proc)
    native = render(proc, [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}])
    streamed = pieces.first_turn_header + "<|vision_start|><|video_pad|><|vision_end|>" + pieces.question("Why?")
    assert streamed == native
    assert pieces.turn_header == "<|im_start|>user\n" and pieces.answer_tail == "<|im_end|>\n"


def test_multi_turn_pieces_reassemble_the_chat_template():
    proc = processor()
    p = prompt_pieces(proc)
    vid = [{"type": "video"}]
    native = render(proc, [
        {"role": "user", "content": vid + [{"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": vid + [{"type": "text", "text": "B?"}]},
    ])
    block = "<|vision_start|><|video_pad|><|vision_end|>"
    streamed = p.first_turn_header + block + p.question("A?") + "yes" + p.answer_tail + p.turn_header + block + p.question("B?")
    assert streamed == native


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]  # definition order

if __name__ == "__main__":
    from model.report import main

    main("STEP 3: prompt scaffolding (_extract_vision_segment)", CHECKS)
