"""``warmup()`` prepares every call kind and changes nothing a user can see.

- a warmed-up stream answers exactly as one never warmed up (unbounded, bounded with recall, graphs
  emulated on CPU), ``ask_choice`` included;
- the warm-up runs ``ask_choice``'s eager forwards: a choice tree in the small row block of the
  attention kernel (<= 16 folded rows on every supported model), one in the large block, and a
  choice too long for a tree, fed alone (issue 21: the first ``ask_choice`` after ``warmup()``
  took 0.9-1.3 s on the H200 while its kernels compiled);
- the attention kernels do not specialise on the integers that change with a call's length, so a
  call of a new length compiles nothing.
"""
from __future__ import annotations

import pytest

from model import StreamConfig, VideoStreamInference
from model.segment_writer import SegmentWriter
from model.testing import synthetic_frames

FRAMES = synthetic_frames(10, 56, 84, seed=9)
CONFIGS = {
    "unbounded": StreamConfig(emulate_graphs=True),
    "bounded-recall": StreamConfig(emulate_graphs=True, cache_budget_tokens=80, recall_grids=1, recall_host_tokens=24),
}


def drive(engine: VideoStreamInference):
    for i in range(0, 10, 4):
        engine.append_frames(FRAMES[i:i + 4], fps=2)
    return engine.ask("What?", max_new_tokens=3), engine.ask_choice("Which?", ["a red one", "b", "the third"])


@pytest.mark.parametrize("name", CONFIGS)
def test_a_warmed_up_stream_answers_as_one_never_warmed_up(tiny, name):
    warmed = VideoStreamInference(*tiny, config=CONFIGS[name])
    warmed.warmup(frame_size=(56, 84), chunk_frames=4, fps=2, freeze_gc=False)
    assert warmed.stats()["cache_tokens"] == 0 and warmed.stats()["frames_seen"] == 0
    cold = VideoStreamInference(*tiny, config=CONFIGS[name])
    (a, c), (a0, c0) = drive(warmed), drive(cold)
    assert a.token_ids == a0.token_ids and (a.first_logits - a0.first_logits).abs().max() == 0
    assert c.scores == c0.scores and c.best == c0.best
    prepared = ("cuda_graphs", "vision_graphs", "recall_host_bytes")  # what a warm-up is for: graphs, the recall slab
    assert {k: v for k, v in warmed.stats().items() if k not in prepared} == \
        {k: v for k, v in cold.stats().items() if k not in prepared}


def test_the_warm_up_runs_ask_choice_forwards_of_each_kernel_block(tiny, monkeypatch):
    from model.triton_attention import launch_config

    fed = []
    feed = SegmentWriter.feed

    def record(self, txn, segment, vision=None, logits="none", **kw):
        fed.append((segment.n, kw.get("tree") is not None, logits))
        return feed(self, txn, segment, vision, logits, **kw)

    monkeypatch.setattr(SegmentWriter, "feed", record)
    engine = VideoStreamInference(*tiny, config=CONFIGS["unbounded"])
    engine.warmup(frame_size=(56, 84), chunk_frames=4, fps=2, freeze_gc=False)
    text = tiny[0].config.text_config
    group = text.num_attention_heads // text.num_key_value_heads
    trees = [n for n, tree, _ in fed if tree]
    blocks = {launch_config(group * n)[0] for n in trees}
    assert blocks == {16, 64}, (trees, group)
    # the small block holds a 2-row tree for every supported model's query heads per K/V head (<= 8)
    assert min(trees) == 2 and 8 * 2 <= 16
    limit = engine.config.choice_chunk_tokens
    assert any(not tree and logits == "all" and n == limit for n, tree, logits in fed), fed


def test_the_kernels_do_not_compile_per_call_length():
    triton_attention = pytest.importorskip("model.triton_attention")
    if triton_attention.triton is None:
        pytest.skip("no Triton")
    for kernel, runtime in [(triton_attention._split_kernel, {"n", "M", "SPLITS"}),
                            (triton_attention._merge_kernel, {"n", "M", "SPLITS"}),
                            (triton_attention._paged_split_kernel, {"MT", "SPLITS"}),
                            (triton_attention._paged_merge_kernel, {"MT", "SPLITS"})]:
        names = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
        assert names == runtime, (kernel, names)
