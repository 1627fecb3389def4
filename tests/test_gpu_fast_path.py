"""On a GPU: the fast path (varlen vision windows, stream attention, CUDA graphs) is exact in fp32.

Skipped without CUDA (CI has no GPU); run on the GPU machine with ``pytest tests/test_gpu_fast_path.py``.
"""
from __future__ import annotations

import pytest
import torch

from model import VideoStreamInference
from model.offline import build_inputs, question_events, native_generate
from model.testing import TINY_CONFIG, TINY_CONFIGS, build_random_model, build_tiny_model, synthetic_frames
from model.timing import set_exact_fp32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_tiny(tiny):
    set_exact_fp32()
    model = build_random_model(TINY_CONFIG, device="cuda")
    return model, tiny[1]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def cuda_family(request):
    """Each family's tiny model on the GPU, fp32 (TF32 off)."""
    set_exact_fp32()
    _, proc = build_tiny_model(family=request.param)
    return build_random_model(TINY_CONFIGS[request.param], device="cuda"), proc


@pytest.mark.parametrize("size", [(90, 120), (150, 200)])
def test_graphs_and_fast_attention_equal_offline(cuda_family, size):
    """Every family: Triton attention, LM graphs (DeepStack rows in Qwen3-VL's chunk graphs), vision graphs."""
    model, proc = cuda_family
    frames = synthetic_frames(11, *size)
    fast = VideoStreamInference(model, proc, fast=True)
    for k, c in enumerate([3, 4, 1, 3]):
        seen = sum([3, 4, 1, 3][:k + 1])
        fast.append_frames(frames[seen - c:seen], fps=4)
        a = fast.ask("What?", max_new_tokens=6)
        b = fast.ask("What?", max_new_tokens=6)  # replays the captured graphs
        ref = native_generate(model, build_inputs(model, proc, question_events("What?", frames[:seen], 4)), 6,
                              fast.stop_ids)
        assert a.token_ids == b.token_ids == ref.token_ids
        assert (a.first_logits - ref.first_logits).abs().max() <= 1e-4
        assert torch.equal(a.first_logits, b.first_logits)
    stats = fast.stats()
    assert stats["vision_attention"] != "sdpa", stats
    if model.family.name == "qwen3_vl_moe":  # its expert routing syncs with the host: graphs fall back to eager
        assert stats["cuda_graphs"].startswith("off (capture failed"), stats
    else:
        assert stats["cuda_graphs"].startswith("on"), stats
    choices = ["a", "bb", "c c"]
    fast_scores = fast.ask_choice("Which?", choices).scores
    plain = VideoStreamInference(model, proc, fast=False)  # a second stream on the same model
    plain.append_frames(frames, fps=4)
    plain_scores = plain.ask_choice("Which?", choices).scores
    assert torch.allclose(torch.tensor(fast_scores), torch.tensor(plain_scores), atol=1e-3, rtol=0)


def test_graphs_of_several_streams_share_a_pool_and_survive_growth(cuda_tiny):
    """Two streams capture into the shared pool, one grows (re-capture) mid-stream: both stay exact."""
    model, proc = cuda_tiny
    frames = synthetic_frames(52, 150, 200)
    a, b = VideoStreamInference(model, proc), VideoStreamInference(model, proc)
    a.append_frames(frames[:4], fps=30)
    b.append_frames(frames[:4], fps=30)
    for e in (a, b):
        e.ask("Warm?", max_new_tokens=2)
    a.append_frames(frames[4:], fps=30)  # ~935 tokens: the next answer grows a's cache past 1024
    a.stop_ids = set()
    long = a.ask("Go on.", max_new_tokens=100)
    assert a.kv.cache.allocations >= 2, a.kv.cache.allocations
    ans_b = b.ask("Still?", max_new_tokens=4)
    ref_a = native_generate(model, build_inputs(model, proc, question_events("Go on.", frames, 30)), 100, set())
    ref_b = native_generate(model, build_inputs(model, proc, question_events("Still?", frames[:4], 30)), 4,
                            b.stop_ids)
    assert long.token_ids == ref_a.token_ids and ans_b.token_ids == ref_b.token_ids
    assert (ans_b.first_logits - ref_b.first_logits).abs().max() <= 1e-4


def test_pooled_streams_with_captured_batches_equal_each_alone(cuda_tiny):
    """Three pooled streams from threads (questions and decode steps replayed from the pool's CUDA graphs, padding rows
    in scratch slots) each equal the same stream on its own engine; the graphs were captured and replayed."""
    from model import KVPool, StreamConfig
    from tests.test_pool import CONFIGS, close, run, same_stream, script
    from tests.test_scheduler import drive

    model, proc = cuda_tiny
    pool = KVPool.for_model(model, tokens=4096, page=16, batch_window_ms=20.0, max_wait_ms=100.0)
    configs = [StreamConfig(**CONFIGS[c]) for c in ("unbounded", "budget-recall", "window")]
    engines = [VideoStreamInference(model, proc, config=cfg, pool=pool) for cfg in configs]
    assert pool.warm_graphs(streams=3, tokens=512) > 0  # captured over padding only, before any stream wrote
    ops = [script(500 + k) for k in range(3)]
    results = drive([lambda k=k: [run(engines[k], op) for op in ops[k]] for k in range(3)])
    st = pool.stats()
    assert st["graph_batches"] > 0 and st["batch_graphs"].startswith("on"), st
    for k, cfg in enumerate(configs):
        alone = VideoStreamInference(model, proc, config=cfg)
        for op, got in zip(ops[k], results[k]):
            assert close(got, run(alone, op)), (k, op)
        same_stream(engines[k], alone)
    pool.close()
