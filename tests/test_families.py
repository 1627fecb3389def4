"""Invariant 8: every family streams exactly (tiny random models of each, fp32, 1e-4).

Random streams: chunks of 1-5 frames (odd counts held and padded), fps, sizes, explicit frame
timestamps (which Qwen3-VL writes before each frame pair), questions at random moments, turns
kept with ``update_state``, images, and multiple choice; each answer's logits and greedy tokens
equal the offline path on the same events (``offline.build_inputs``), for fast, standard and
graph-path (emulated on CPU) engines. Bounded streams with eviction and recall equal their masked
reference. (The offline path itself equals transformers' forward on the processors' inputs:
``test_family_reference.py``.)
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model import StreamConfig, VideoStreamInference
from model.offline import Answer, Continuation, Image, Question, Video, build_inputs, native_generate, native_logits
from model.testing import build_tiny_model, synthetic_frames
from tests.test_bounded import FRAMES as BOUNDED_FRAMES, Recorded, check_policy

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"]
MODES = {"fast": StreamConfig(), "standard": StreamConfig(fast=False), "graphs": StreamConfig(emulate_graphs=True)}
SIZES = [(90, 120), (150, 200)]
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_tiny_model(family=request.param)


def check_question(engine, events, question, update_state=False):
    """Ask; the answer's first logits and greedy tokens equal the offline path's; returns the answer."""
    model, proc = engine.model, engine.processor
    ans = engine.ask(question, update_state=update_state, max_new_tokens=3)
    inputs = build_inputs(model, proc, events + [Question(question)])
    ref = native_generate(model, inputs, 3, engine.stop_ids)
    diff = float((ans.first_logits - ref.first_logits).abs().max())
    assert diff <= TOL, (question, diff)
    assert ans.token_ids == ref.token_ids, (question, ans.token_ids, ref.token_ids)
    return ans


@pytest.mark.parametrize("mode", MODES)
# seed 0 in the quick loop (-m "not slow"), every seed in CI
@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2))])
def test_random_streams_of_every_family_equal_offline(family, mode, seed):
    model, proc = family
    rng = random.Random(seed)
    fps, size = rng.choice([1, 2, 4, 30]), SIZES[seed % 2]
    frames = synthetic_frames(26, *size, seed=seed)
    image = np.asarray(synthetic_frames(1, 100, 70, seed=seed + 50)[0])
    engine = VideoStreamInference(model, proc, config=MODES[mode])
    events, seen, clock = [], 0, 3.0
    while seen < len(frames):
        n = min(rng.randint(1, 5), len(frames) - seen)
        chunk = frames[seen:seen + n]
        times = None
        if seed == 2:  # real capture times, irregular (what open_video yields)
            times = [clock + 0.37 * k for k in range(n)]
            clock = times[-1] + 0.41
        engine.append_frames(chunk, fps=fps, timestamps=times)
        events.append(Video(chunk, fps, times))
        seen += n
        r = rng.random()
        if r < 0.35:
            check_question(engine, events, f"What is at {seen}?")
        elif r < 0.5:
            ans = check_question(engine, events, "Describe it.", update_state=True)
            events += [Question("Describe it."), Answer(ans.token_ids)]
        elif r < 0.6:
            engine.append_image(image)
            events.append(Image(image))
    check_question(engine, events, "And now?")
    choices = ["circle", "a red square", "x"]
    scores = engine.ask_choice("Which?", choices).scores
    for choice, score in zip(choices, scores):
        ids = proc.tokenizer.encode(choice, add_special_tokens=False)
        inputs = build_inputs(model, proc, events + [Question("Which?"), Continuation(ids)])
        logp = torch.log_softmax(native_logits(model, inputs, last=len(ids) + 1)[0, :-1], -1)
        ref = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
        assert abs(ref - score) <= TOL * len(ids), (choice, ref, score)


@pytest.mark.parametrize("seed, recall, graphs", [(1, 0, False), (6, 2, False), (10, 1, True)])
def test_bounded_streams_of_every_family_equal_the_masked_reference(family, seed, recall, graphs):
    """Eviction in whole units (a frame pair, with its timestamp and markers for Qwen3-VL), recall included."""
    rng = random.Random(seed)
    config = StreamConfig(fast=seed % 2 == 0 or graphs, cache_budget_tokens=130, sink_frames=rng.choice([0, 2]),
                          recall_grids=recall, recall_host_tokens=60, emulate_graphs=graphs)
    rec, texts = Recorded(VideoStreamInference(*family, config=config)), set()
    seen = 0
    while seen < 30:
        n = rng.randint(1, 5)
        rec.video(BOUNDED_FRAMES[seen:seen + n], 2)
        seen += n
        r = rng.random()
        if r < 0.3:
            rec.check_ask(f"What is at {seen}?")
        elif r < 0.4:
            rec.turn("Describe.")
        elif r < 0.45:
            rec.image()
        check_policy(rec.engine, texts)
    rec.check_ask("And now?")
    layout = rec.engine.stream_state.layout
    assert layout.evicted_grids > 0, "the budget never evicted anything: the test would not test eviction"
    assert rec.recalls > 0 if recall else rec.recalls == 0
    units = {s.n for s in layout.spans if s.grid >= 0}
    if rec.engine.model.family.pair_blocks:  # a unit is a pair with its timestamp and markers: more than its 6 tokens
        assert min(units) > 6, units


def test_qwen3_timestamps_are_the_frames_times():
    """The text before each Qwen3-VL frame pair is the mean time of its two frames (one decimal), from the
    frames' real times: explicit timestamps, or the stream's time at its fps; a held frame keeps its own."""
    model, proc = build_tiny_model(family="qwen3_vl")
    frames = synthetic_frames(5, 64, 96, seed=1)
    engine = VideoStreamInference(model, proc)
    engine.append_frames(frames[:3], fps=2)  # pairs at 0.25 (the third frame is held)
    engine.append_frames(frames[3:], fps=2)  # 1.0 and 1.5 -> 1.25; frame 4 (2.0) held
    first = engine.ask("Now?", update_state=True, max_new_tokens=1)  # the held frame goes in padded: 2.0
    engine.append_frames(frames[:2], timestamps=[10.0, 10.31])  # a new turn's video, real times: 10.155 -> "10.2"
    events = [Video(frames[:3], 2), Video(frames[3:], 2), Question("Now?"), Answer(first.token_ids),
              Video(frames[:2], 2, [10.0, 10.31])]
    check_question(engine, events, "Then?")  # the stream fed exactly the offline transcript's timestamps
    text = proc.tokenizer.decode(build_inputs(model, proc, events + [Question("Then?")]).input_ids[0].tolist())
    assert [t for t in text.split("<") if "seconds>" in t] == ["0.2 seconds>", "1.2 seconds>", "2.0 seconds>",
                                                               "10.2 seconds>"]
    with pytest.raises(ValueError, match="back in time"):
        engine.append_frames(frames[:1], timestamps=[9.0])
    with pytest.raises(ValueError, match="one per frame"):
        engine.append_frames(frames[:2], timestamps=[11.0])
