"""Multi-turn streams (ask(update_state=True)) and image blocks equal their offline transcript."""
from __future__ import annotations

import numpy as np
import torch

from model.offline import Answer, Image, Question, Video, build_inputs, native_logits
from model.testing import synthetic_frames

TOL = 1e-4


def offline_last_logits(engine, events):
    model, proc = engine.model, engine.processor
    return native_logits(model, build_inputs(model, proc, events))[0, -1]


def test_two_turns_with_odd_frames_equal_offline_transcript(engine):
    a, b = synthetic_frames(5, 90, 120, seed=1), synthetic_frames(4, 90, 120, seed=2)
    engine.append_frames(a[:2], fps=2)
    engine.append_frames(a[2:], fps=2)  # 5 frames: the 5th is held, then committed padded
    first = engine.ask("What happened?", update_state=True, max_new_tokens=5)
    assert engine.state.turns == 1 and not engine.state.turn_open and engine.state.pending_frame is None
    engine.append_frames(b, fps=4)  # new turn, new video block, different fps is fine
    second = engine.ask("And now?", max_new_tokens=3)

    transcript = [Video(a, 2), Question("What happened?"), Answer(first.token_ids), Video(b, 4), Question("And now?")]
    diff = (second.first_logits - offline_last_logits(engine, transcript)).abs().max()
    assert diff <= TOL, diff


def test_text_only_turn_after_video_turn(engine):
    a = synthetic_frames(4, 90, 120)
    engine.append_frames(a, fps=2)
    first = engine.ask("Describe.", update_state=True, max_new_tokens=4)
    second = engine.ask("Why?", max_new_tokens=2)
    transcript = [Video(a, 2), Question("Describe."), Answer(first.token_ids), Question("Why?")]
    assert (second.first_logits - offline_last_logits(engine, transcript)).abs().max() <= TOL


def test_image_blocks_between_videos_equal_offline(engine):
    img = np.asarray(synthetic_frames(1, 100, 70, seed=5)[0])
    v1, v2 = synthetic_frames(3, 90, 120, seed=3), synthetic_frames(2, 90, 120, seed=4)
    engine.append_frames(v1, fps=1)  # odd: committed padded when the image closes the block
    info = engine.append_image(img)
    assert info.tokens_added > 0 and engine.state.block_start is None
    engine.append_frames(v2, fps=1)  # a new video block, temporal index restarts at 0
    ans = engine.ask("What was in the picture?", max_new_tokens=3)
    transcript = [Video(v1, 1), Image(img), Video(v2, 1), Question("What was in the picture?")]
    assert (ans.first_logits - offline_last_logits(engine, transcript)).abs().max() <= TOL


def test_single_image_mode(engine):
    img = synthetic_frames(1, 120, 120, seed=9)[0]
    engine.append_image(img)
    ans = engine.ask("What shape?", max_new_tokens=2)
    transcript = [Image(img), Question("What shape?")]
    assert (ans.first_logits - offline_last_logits(engine, transcript)).abs().max() <= TOL


def test_reset_starts_a_new_stream(engine):
    engine.append_frames(synthetic_frames(4, 90, 120), fps=2)
    engine.ask("x?", update_state=True, max_new_tokens=2)
    engine.reset()
    assert engine.kv.get_seq_length() == 0 and engine.state.frames_seen == 0 and engine.state.turns == 0
    frames = synthetic_frames(2, 90, 120)
    engine.append_frames(frames, fps=2)
    ans = engine.ask("y?", max_new_tokens=2)
    transcript = [Video(frames, 2), Question("y?")]
    assert (ans.first_logits - offline_last_logits(engine, transcript)).abs().max() <= TOL
    assert torch.isfinite(ans.first_logits).all()


def test_two_videos_of_different_sizes_with_an_image_between_equal_offline(engine):
    """Each video block is sized by its own first frame, as the offline path and transformers size each video."""
    landscape = synthetic_frames(4, 90, 120, seed=1)  # -> 84x112
    portrait = synthetic_frames(5, 240, 120, seed=2)  # -> its own portrait size, odd count
    img = np.asarray(synthetic_frames(1, 100, 70, seed=5)[0])
    engine.append_frames(landscape, fps=2)
    first = engine.ask("Describe.", update_state=True, max_new_tokens=3)
    engine.append_image(img)
    engine.append_frames(portrait[:2], fps=2)
    size = engine.stream_state.frame_size
    engine.append_frames(portrait[2:], fps=2)
    assert size != (84, 112) and size[0] > size[1]
    ans = engine.ask("And now?", max_new_tokens=2)
    transcript = [Video(landscape, 2), Question("Describe."), Answer(first.token_ids), Image(img), Video(portrait, 2),
                  Question("And now?")]
    assert (ans.first_logits - offline_last_logits(engine, transcript)).abs().max() <= TOL
