"""Invariant 6 (bounded memory): a stream with a cache budget equals its masked offline reference.

- Random streams (chunkings with odd frames, budgets, windows, sink sizes, asks, committed
  turns, images between videos): every question's logits equal ONE offline forward over the
  whole transcript in which each token sees what the cache kept when its call began plus its
  own call's earlier tokens (``offline.bounded_visibility``), to 1e-4 in fp32;
- the policy: kept tokens within the budget after every call, the sink and all text kept,
  evicted video is always the oldest whole grids;
- isolation and atomicity with eviction on: ``test_bounded_transactions.py``;
- impossible settings are errors at construction.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import pytest

from model import StreamConfig, VideoStreamInference
from model.offline import Answer, Image, Question, Video, bounded_visibility, build_inputs, masked_logits
from model.testing import synthetic_frames
from tests.conftest import assert_same_signature, captures, signature

TOL = 1e-4
FRAMES = synthetic_frames(40, 56, 84, seed=21)  # 6 tokens per 2-frame grid
IMAGE = np.asarray(synthetic_frames(1, 84, 56, seed=22)[0])


class Recorded:
    """Drives a bounded engine and records, call by call, the transcript's events and what each call saw."""

    def __init__(self, engine: VideoStreamInference):
        self.engine = engine
        self.events: list = []
        self.calls: list = []  # (start, end, kept ranges when the call began)
        self.recalls = 0

    def _refused(self, fn) -> bool:
        """Run a committing call; True if the budget refused it (kept text fills it), the stream unchanged."""
        before = signature(self.engine)
        try:
            self._call(fn)
        except ValueError as e:
            assert "after evicting all the video it may evict" in str(e)
            assert_same_signature(before, signature(self.engine))
            return True
        return False

    def _call(self, fn):
        st = self.engine.stream_state
        start, kept = st.last_cache_position, st.layout.kept_ranges()
        out = fn()
        recalled = [(r.seq, r.tokens) for r in getattr(out, "recalled", ())]  # evicted grids the call saw again
        self.calls.append((start, self.engine.stream_state.last_cache_position, kept + recalled))
        return out

    def video(self, frames, fps) -> None:
        if not self._refused(lambda: self.engine.append_frames(frames, fps=fps)):
            self.events.append(Video(list(frames), fps))

    def image(self) -> None:
        if not self._refused(lambda: self.engine.append_image(IMAGE)):
            self.events.append(Image(IMAGE))

    def turn(self, question: str) -> None:
        answers = []
        if self._refused(lambda: answers.append(self.engine.ask(question, update_state=True, max_new_tokens=2))
                         or answers[-1]):
            return
        self.events += [Question(question), Answer(answers[-1].token_ids)]

    def check_ask(self, question: str) -> None:
        """The question's logits equal the masked offline reference (the stream is left as it was)."""
        st, before = self.engine.stream_state, signature(self.engine)
        ans = self.engine.ask(question, max_new_tokens=1)
        assert_same_signature(before, signature(self.engine))
        model, proc = self.engine.model, self.engine.processor
        inputs = build_inputs(model, proc, self.events + [Question(question)])
        recalled = [(r.seq, r.tokens) for r in ans.recalled]
        assert len(recalled) == min(self.engine.config.recall_grids, len(st.layout.stored))
        self.recalls += len(recalled)
        calls = self.calls + [(st.last_cache_position, inputs.num_tokens, st.layout.kept_ranges() + recalled)]
        ref = masked_logits(model, inputs, bounded_visibility(inputs.num_tokens, calls))[0, -1]
        diff = (ans.first_logits - ref).abs().max()
        assert diff <= TOL, diff


def check_policy(engine: VideoStreamInference, texts_written: set) -> None:
    layout, budget = engine.stream_state.layout, engine.config.budget()
    if budget.tokens is not None:
        assert layout.kept <= budget.tokens, (layout.kept, budget)
    grids = [s.grid for s in layout.spans if s.grid >= 0]
    assert all(g in grids for g in range(min(budget.sink_grids, layout.grids))), ("sink evicted", grids)
    late = [g for g in grids if g >= budget.sink_grids]
    assert late == list(range(layout.grids - len(late), layout.grids)), ("not the oldest evicted", grids)
    texts_written |= {s.seq for s in layout.spans if s.grid < 0}
    assert texts_written == {s.seq for s in layout.spans if s.grid < 0}, "text or an image was evicted"
    assert not any(s.recalled for s in layout.spans), "a recalled grid was committed"
    if budget.window_seconds is not None:
        assert sum(s.seconds for s in layout.spans if s.grid >= budget.sink_grids) <= budget.window_seconds + 1e-9


@pytest.mark.parametrize("seed, recall, graphs", [(s, 0, False) for s in range(6)] + [(s, 1 + s % 3, False) for s in
                                                   range(6, 10)] + [(s, s % 2, True) for s in range(10, 13)])
def test_random_bounded_streams_equal_the_masked_offline_reference(tiny, seed, recall, graphs):
    """With recall, each question's reference also shows it the grids it recalled (Answer.recalled).
    ``graphs``: the CUDA-graph path's static shapes (slots padded to buckets), replayed eagerly."""
    rng = random.Random(seed)
    fps = rng.choice([1, 2, 4])
    tokens = [None, 90, 110, 140 if seed < 6 else 100][seed % 4]
    window = rng.choice([2.0, 3.0]) if tokens is None else rng.choice([None, 1.5, 3.0])
    config = StreamConfig(fast=seed % 2 == 0 or graphs, cache_budget_tokens=tokens, video_window_seconds=window,
                          sink_frames=rng.choice([0, 2, 3]), recall_grids=recall, recall_host_tokens=60,
                          emulate_graphs=graphs)
    rec, texts = Recorded(VideoStreamInference(*tiny, config=config)), set()
    seen, evictions = 0, 0
    while seen < 30:
        n = rng.randint(1, 5)
        rec.video(FRAMES[seen:seen + n], fps)
        seen += n
        r = rng.random()
        if r < 0.25:
            rec.check_ask(f"What is at {seen}?")
        elif r < 0.35:
            rec.turn("Describe.")
        elif r < 0.42:
            rec.image()
        check_policy(rec.engine, texts)
        evictions = rec.engine.stream_state.layout.evicted_grids
    rec.check_ask("And now?")
    assert evictions > 0, "the budget never evicted anything: the test would not test eviction"
    assert rec.recalls > 0 if recall else rec.recalls == 0
    assert not graphs or captures(rec.engine) > 0
    if recall:  # the host keeps at most recall_host_tokens of evicted video, the newest
        stored = rec.engine.stream_state.layout.stored
        assert 0 < sum(s.n for s in stored) <= 60 and [s.grid for s in stored] == sorted(s.grid for s in stored)
        assert rec.engine.stats()["recall_host_bytes"] > 0
    stats = rec.engine.stats()
    assert stats["cache_tokens"] == rec.engine.stream_state.layout.kept < rec.engine.stream_state.last_cache_position
    assert stats["evicted_seconds"] > 0 and stats["kept_video_seconds"] >= 0


def bounded(tiny, **kw) -> VideoStreamInference:
    return VideoStreamInference(*tiny, config=StreamConfig(**{"cache_budget_tokens": 100, **kw}))


@pytest.mark.slow
@pytest.mark.parametrize("recall", [0, 2])
def test_memory_stays_bounded_over_a_long_stream(tiny, recall):
    engine = bounded(tiny, cache_budget_tokens=120, recall_grids=recall, recall_host_tokens=60)
    host = []
    for i in range(200):
        engine.append_frames(FRAMES[(2 * i) % 38:(2 * i) % 38 + 2], fps=2)
        if i % 50 == 0:
            engine.ask("What?", update_state=i == 0, max_new_tokens=2)
        host.append(engine.stats()["recall_host_bytes"])
    assert engine.stream_state.last_cache_position > 1200 and engine.stream_state.layout.kept <= 120
    assert engine.kv.cache.capacity <= 1024 and engine.kv.cache.allocations == 1
    if recall:  # one host slab: host_tokens plus room for a few calls' evictions, allocated once
        layers, heads, dim = engine.kv.cache.shape
        row = 2 * layers * heads * dim * 4  # fp32 K and V of one token
        assert engine.kv.recall.allocations == 1 and 0 < host[-1] == max(host) <= (60 + 4 * 6) * row
        assert engine.stream_state.layout.stored_tokens <= 60


@pytest.mark.parametrize("kw, match", [
    (dict(cache_budget_tokens=0), "cache_budget_tokens must be"),
    (dict(cache_budget_tokens=1.5), "cache_budget_tokens must be"),
    (dict(video_window_seconds=-1.0), "video_window_seconds must be"),
    (dict(video_window_seconds=float("inf")), "video_window_seconds must be"),
    (dict(cache_budget_tokens=100, sink_frames=-2), "sink_frames must be"),
    (dict(recall_grids=2), "needs cache_budget_tokens or video_window_seconds"),
    (dict(cache_budget_tokens=100, recall_grids=-1), "recall_grids must be"),
    (dict(cache_budget_tokens=100, recall_grids=1, recall_probe_layers=0), "recall_probe_layers must be"),
    (dict(cache_budget_tokens=100, recall_grids=1, recall_host_tokens=True), "recall_host_tokens must be"),
])
def test_invalid_budget_settings_are_refused_by_the_config(kw, match):
    with pytest.raises(ValueError, match=match):
        StreamConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(cache_budget_tokens=40), "keeps at least"),  # the sink alone does not fit
    (dict(cache_budget_tokens=80, sink_frames=40), "sink_frames=40"),  # a sink larger than the budget
    (dict(cache_budget_tokens=52), "cannot hold one chunk"),  # no room for one grid after the sink
])
def test_impossible_budgets_are_refused_at_construction(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        VideoStreamInference(*tiny, config=StreamConfig(**kw))


@pytest.mark.slow
def test_warmup_allocates_the_recall_slab_so_no_eviction_allocates(tiny):
    engine = bounded(tiny, cache_budget_tokens=300, recall_grids=2, recall_host_tokens=60)
    engine.warmup((56, 84), chunk_frames=2, fps=2)  # 6 tokens per grid
    layers, heads, dim = engine.kv.cache.shape
    slab = engine.stats()["recall_host_bytes"]
    assert engine.kv.recall.allocations == 1 and slab == (60 + 4 * 6) * 2 * layers * heads * dim * 4, slab
    assert engine.stats()["transcript_tokens"] == 0  # warm-up leaves the stream empty
    for i in range(100):  # evicting into the store from the ~45th call on
        engine.append_frames(FRAMES[(2 * i) % 38:(2 * i) % 38 + 2], fps=2)
    engine.ask("What?", max_new_tokens=1)
    assert engine.stats()["evicted_grids"] > 0 and engine.stream_state.layout.stored_tokens > 0
    assert engine.kv.recall.allocations == 1 and engine.stats()["recall_host_bytes"] == slab


@pytest.mark.parametrize("fast", [True, False])
def test_a_bounded_stream_does_not_depend_on_its_cache_capacity(tiny, fast):
    """Bit for bit: the same bounded stream grown on demand, with its capacity reserved up front, and
    replayed after reset(keep_memory=True) (attention reads only the slots below the highest in use)."""
    def run(engine):
        answers = []
        for i in range(0, 24, 3):
            engine.append_frames(FRAMES[i:i + 3], fps=2)
            a = engine.ask("What is there?", max_new_tokens=3)
            answers.append((a.first_logits, a.token_ids, engine.ask_choice("Which?", ["a", "b c"]).scores))
        return answers, signature(engine)

    config = StreamConfig(fast=fast, cache_budget_tokens=100, grow_min=16)
    grown = VideoStreamInference(*tiny, config=config)
    reserved = VideoStreamInference(*tiny, config=config)
    reserved.reserve(4096)
    results = [run(grown), run(reserved)]
    grown.reset(keep_memory=True)
    results.append(run(grown))
    assert reserved.kv.cache.capacity == 4096 > grown.kv.cache.capacity
    for answers, sig in results[1:]:
        assert_same_signature(results[0][1], sig)
        for (la, ta, ca), (lb, tb, cb) in zip(results[0][0], answers):
            assert torch.equal(la, lb) and ta == tb and ca == cb
