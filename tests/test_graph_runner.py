"""The CUDA-graph path's static-shape logic, run eagerly on CPU (capture itself needs a GPU).

Static index writes into the whole preallocated cache, per-row masks over the capacity,
buckets with pad rows, re-capture after the cache grows: answers and choice scores must
equal the dynamic path's and the offline path's.
"""
from __future__ import annotations

import torch

from model import StreamConfig, VideoStreamInference
from model.offline import build_inputs, question_events, native_generate
from model.testing import synthetic_frames
from tests.conftest import captures


def graph_engine(model, proc):
    return VideoStreamInference(model, proc, config=StreamConfig(emulate_graphs=True))


def test_static_path_equals_offline_across_pauses(tiny):
    model, proc = tiny
    frames = synthetic_frames(11, 90, 120)
    engine, seen = graph_engine(model, proc), 0
    for c in [3, 4, 1, 3]:
        seen += c
        engine.append_frames(frames[seen - c:seen], fps=4)
        a = engine.ask("What?", max_new_tokens=6)
        b = engine.ask("What?", max_new_tokens=6)  # replays
        ref = native_generate(model, build_inputs(model, proc, question_events("What?", frames[:seen], 4)), 6,
                              engine.stop_ids)
        assert a.token_ids == b.token_ids == ref.token_ids
        assert (a.first_logits - ref.first_logits).abs().max() <= 1e-4
    assert captures(engine) == 5  # text buckets (turn header, question, decode), chunks of 1 and 2 grids
    vision_hook = model.family.vision_static_kwargs(model, torch.tensor([[1, 6, 8]])) is not None
    assert engine.stats()["vision_graphs"] == ("on (2 captures)" if vision_hook else "off")  # 4.57: no varlen tower


def test_growth_recaptures_and_stays_exact(tiny):
    model, proc = tiny
    frames = synthetic_frames(52, 150, 200)  # 26 temporal patches x 35 tokens: ~935 of the first 1024 slots
    graphs = graph_engine(model, proc)
    graphs.append_frames(frames, fps=30)
    graphs.stop_ids = set()
    long = graphs.ask("Go on.", max_new_tokens=100)  # decodes past the first 1024-token buffer
    assert graphs.kv.get_seq_length() < 1024 < graphs.kv.cache.capacity
    captured = captures(graphs)
    scores = graphs.ask_choice("Which?", ["a b", "c", "dd"]).scores
    assert all(map(torch.isfinite, torch.tensor(scores))), scores  # grown buffers are zeroed, not garbage
    assert 2 < captured < 10, captured  # geometric growth: a few re-captures, not one per token

    plain = VideoStreamInference(model, proc, fast=True)
    plain.append_frames(frames, fps=30)
    plain.stop_ids = set()
    ref = plain.ask("Go on.", max_new_tokens=100)
    assert long.token_ids == ref.token_ids
    assert torch.allclose(torch.tensor(scores), torch.tensor(plain.ask_choice("Which?", ["a b", "c", "dd"]).scores),
                          atol=1e-4, rtol=0)
