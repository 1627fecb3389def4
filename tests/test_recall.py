"""Recall's probe: what it reads is what the question itself computes, graph or eager.

Which evicted grids come back is decided by the question's queries at the first
``recall_probe_layers`` layers (``recall.QueryProbe``), read by a forward that stops after those
layers (``StreamQwenModel.forward_segment(layers=...)``) and, on the GPU, runs as a CUDA graph padded to a bucket.
The reference here is a full forward of the same segment through transformers' text model with
the attention hook collecting every layer's queries: the probe must read the same numbers for
its layers, whatever the path, and not run the layers after them. (That the answers with the
recalled grids equal the masked offline reference is ``test_bounded.py``.)
"""
from __future__ import annotations

import pytest
import torch

from model import StreamConfig, VideoStreamInference, compat
from model.prompt import encode_user_text
from model.positions import text_positions
from model.testing import synthetic_frames
from tests.conftest import captures

FRAMES = synthetic_frames(30, 56, 84, seed=31)  # 6 tokens per 2-frame grid


def _evicting(tiny, config) -> VideoStreamInference:
    engine = VideoStreamInference(*tiny, config=config)
    for i in range(0, 30, 2):
        engine.append_frames(FRAMES[i:i + 2], fps=2)
    assert engine.stream_state.layout.stored, "nothing was evicted into the store: the probe would not run"
    return engine


# White-box: the probe is internal to a stream's segment writer, so these tests drive it directly.
@pytest.mark.parametrize("fast", [True, False])
def test_the_probe_reads_the_queries_of_the_question_graph_or_eager(tiny, fast):
    config = StreamConfig(fast=fast, cache_budget_tokens=60, recall_grids=2, recall_host_tokens=60,
                          recall_probe_layers=1)
    engine = _evicting(tiny, config)
    stream, kv = engine._stream, engine.kv
    writer, model = stream.writer, engine.model
    txn = kv.begin()
    ids = list(stream.grammar.question(encode_user_text(engine.tokenizer, "Where is the red square?")).ids)
    layers, kv_heads, dim = model.kv_shape()

    seen = {}  # layer -> (1, H_q, n, D) rotated queries of a full forward of the same segment
    fork = txn.fork()
    view, _ = kv.slot_view(fork, len(ids))
    visible = fork.state.layout.visible(kv.cache.capacity, model.device)
    mask = writer.masks.bounded(fork.length, visible, view.index, on_query=lambda i, q: seen.__setitem__(i, q.clone()))
    model.forward_segment(view, model.embed_ids(torch.tensor(ids)), text_positions(fork.state.next_position, len(ids)),
                          mask)
    assert sorted(seen) == list(range(layers))
    ref = seen[0][0].float().mean(1).view(kv_heads, -1, dim).sum(1)[None]  # (1, H_kv, D): layer 0 only

    graphed = _evicting(tiny, config.replace(fast=True, emulate_graphs=True))
    before = captures(graphed)
    calls = []  # the probe runs the first layer only: the second layer is never called
    hook = compat.language_model(model).layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    eager = writer.feed_ids(txn.fork(), ids, probe=True)
    gw = graphed._stream.writer
    graph = gw.feed_ids(graphed.kv.begin().fork(), ids, probe=True)  # padded to a bucket: the pad rows weigh 0
    assert captures(graphed) == before + 1 and gw.runner.rows("probe", len(ids)) > len(ids)
    for got in (eager, graph):
        assert got.shape == (1, kv_heads, dim)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    hook.remove()
    assert not calls
    assert engine.stream_state.last_cache_position == txn.state.last_cache_position  # forks only: nothing committed


def test_a_question_recalls_through_the_probe_graph_on_the_graph_path(tiny):
    config = StreamConfig(cache_budget_tokens=60, recall_grids=2, recall_host_tokens=60, emulate_graphs=True)
    engine = VideoStreamInference(*tiny, config=config)
    for i in range(0, 30, 3):  # odd chunks: a frame is held when the question comes
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    before = captures(engine)
    answer = engine.ask("What was first?", max_new_tokens=2)
    assert len(answer.recalled) == 2
    assert any(kind == "probe" for kind, _ in engine._stream.writer.runner.graphs) and captures(engine) > before
