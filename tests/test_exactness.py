"""Invariant 1 (exactness): a streamed cache answers exactly like a one-shot offline prefill.

For random chunkings (1..7 frames a call, odd counts included), several fps, two resolutions
and several pause points, the question's logits equal the native path's (fp32, max abs diff
<= 1e-4), greedy tokens are identical, and ask_choice scores do not depend on the chunking.
"""
from __future__ import annotations

import random

import pytest
import torch

from model import StreamConfig, VideoStreamInference
from model.offline import Continuation, build_inputs, native_generate, native_logits, question_events
from model.testing import synthetic_frames

TOL = 1e-4
QUESTION = "What appeared last?"
SIZES = [(90, 120), (150, 200)]  # -> 84x112 (3x4 merged tokens) and 140x196 (5x7, several windows)


def random_chunks(n_frames: int, seed: int) -> list[int]:
    rng, out = random.Random(seed), []
    while sum(out) < n_frames:
        out.append(min(rng.randint(1, 7), n_frames - sum(out)))
    return out


def offline_first_logits(model, proc, frames, fps, question=QUESTION):
    return native_logits(model, build_inputs(model, proc, question_events(question, frames, fps)))[0, -1]


MODES = {
    "fast": StreamConfig(fast=True),  # stream attention (folded GQA) + batched varlen vision windows
    "fast-sdpa-rows": StreamConfig(fast=True, rows_max_scores=0),  # few rows through SDPA instead of matmuls
    "fast-unfolded": StreamConfig(fast=True, fold_max_rows=1),  # K/V heads repeated, bottom-right causal bias
    "standard": StreamConfig(fast=False),  # transformers' own sdpa modules with dense masks
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=["84x112", "140x196"])
@pytest.mark.parametrize("fps", [1, 2, 4, 30])
def test_streamed_question_logits_equal_offline(tiny, fps, size, mode):
    model, proc = tiny
    n = 25 if fps == 30 else 13  # 30 fps needs >= 8 temporal grids before t moves off 0
    frames = synthetic_frames(n, *size, seed=fps)
    chunks = random_chunks(n, seed=fps * 100 + size[0])
    engine = VideoStreamInference(model, proc, config=MODES[mode])
    seen = 0
    pauses = {1, len(chunks) // 2, len(chunks) - 1}
    for k, c in enumerate(chunks):
        engine.append_frames(frames[seen:seen + c], fps=fps)
        seen += c
        if k not in pauses:
            continue
        ans = engine.ask(QUESTION, max_new_tokens=4)
        ref = offline_first_logits(model, proc, frames[:seen], fps)
        diff = (ans.first_logits - ref).abs().max().item()
        assert diff <= TOL, f"chunks={chunks[:k + 1]} fps={fps} size={size}: max |diff| {diff:.3g}"
        native = native_generate(model, build_inputs(model, proc, question_events(QUESTION, frames[:seen], fps)),
                                 4, engine.stop_ids)
        assert ans.token_ids == native.token_ids, (chunks[:k + 1], ans.token_ids, native.token_ids)


def test_ask_before_any_frame_answers_from_text_alone(engine, tiny):
    model, proc = tiny
    ans = engine.ask("Hello?", max_new_tokens=3)
    ref = native_logits(model, build_inputs(model, proc, question_events("Hello?")))[0, -1]
    assert (ans.first_logits - ref).abs().max() <= TOL
    assert engine.kv.get_seq_length() == 0 and engine.state.next_position == 0


def choice_scores(model, proc, chunks, frames, fps, choices):
    engine = VideoStreamInference(model, proc)
    seen = 0
    for c in chunks:
        engine.append_frames(frames[seen:seen + c], fps=fps)
        seen += c
    return engine.ask_choice(QUESTION, choices)


def test_ask_choice_scores_do_not_depend_on_chunking_and_match_offline(tiny):
    model, proc = tiny
    frames = synthetic_frames(11, 90, 120, seed=3)
    choices = ["circle", "red square", "a blue triangle", "x"]
    results = [choice_scores(model, proc, random_chunks(11, seed), frames, 2, choices) for seed in (1, 2, 3)]
    results.append(choice_scores(model, proc, [11], frames, 2, choices))
    for r in results[1:]:
        assert r.index == results[0].index
        assert torch.allclose(torch.tensor(r.scores), torch.tensor(results[0].scores), atol=TOL, rtol=0), (r.scores, results[0].scores)
    # offline: log p(choice) from one prefill of (video + question + choice) per choice
    tok = proc.tokenizer
    for choice, score in zip(choices, results[0].scores):
        ids = tok.encode(choice, add_special_tokens=False)
        segs = question_events(QUESTION, frames, 2) + [Continuation(ids)]
        inputs = build_inputs(model, proc, segs)
        logp = torch.log_softmax(native_logits(model, inputs, all_tokens=True)[0], -1)
        n = len(ids)
        ref = logp[-n - 1:-1].gather(1, torch.tensor(ids)[:, None]).sum().item()
        assert abs(ref - score) <= TOL * n, (choice, ref, score)


def test_sequential_choice_scoring_equals_tree_batched(tiny, monkeypatch):
    model, proc = tiny
    frames = synthetic_frames(6, 90, 120)
    choices = ["circle", "square", "triangle shape"]
    tree = choice_scores(model, proc, [3, 3], frames, 4, choices)
    monkeypatch.setattr("model.scoring.TREE_ATTENTION", ())
    seq = choice_scores(model, proc, [3, 3], frames, 4, choices)
    assert torch.allclose(torch.tensor(tree.scores), torch.tensor(seq.scores), atol=TOL, rtol=0)


def test_choice_scores_do_not_depend_on_the_scoring_chunk(tiny):
    """Choices split into several tree forwards, and choices longer than a chunk fed causally in pieces,
    score as one tree forward does."""
    model, proc = tiny
    frames = synthetic_frames(6, 90, 120)
    choices = ["circle", "a much longer choice than the chunk", "x", "two words", "y z"]
    scores = []
    for chunk in (128, 5, 1):
        engine = VideoStreamInference(model, proc, config=StreamConfig(choice_chunk_tokens=chunk))
        engine.append_frames(frames, fps=2)
        scores.append(torch.tensor(engine.ask_choice(QUESTION, choices).scores))
    assert torch.allclose(scores[0], scores[1], atol=TOL, rtol=0) and torch.allclose(scores[0], scores[2], atol=TOL, rtol=0)


def test_a_large_append_is_encoded_in_bounded_forwards_and_equals_offline(tiny):
    model, proc = tiny
    frames = synthetic_frames(13, 90, 120, seed=8)
    engine = VideoStreamInference(model, proc, config=StreamConfig(max_frames_per_forward=4))
    info = engine.append_frames(frames, fps=4)  # 13 frames: forwards of 4, 4, 4 frames, one held
    assert info.frames_encoded == 12 and info.pending
    ans = engine.ask(QUESTION, max_new_tokens=2)
    assert (ans.first_logits - offline_first_logits(model, proc, frames, 4)).abs().max() <= TOL
