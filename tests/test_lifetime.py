"""An engine's memory has an explicit lifetime: close(), a with-block, reset() and dropping it free at once.

The cache buffers (and the recall slab) are watched through weak references with the garbage
collector switched off: the memory must go by reference counting alone, which is what happens
after ``warmup(freeze_gc=True)`` (frozen objects are never visited by a collection). The graph
paths are emulated on CPU (``StreamConfig(emulate_graphs=True)``), so captured graphs hold the
buffers as real CUDA graphs do. On the GPU, ``benchmarks/bench_lifetime.py`` measures the same
with device memory.
"""
from __future__ import annotations

import gc
import weakref

import pytest

from model import StreamConfig, VideoStreamInference
from model.testing import synthetic_frames

FRAMES = synthetic_frames(12, 56, 84, seed=5)
CONFIGS = {
    "unbounded": StreamConfig(emulate_graphs=True),
    "bounded-recall": StreamConfig(emulate_graphs=True, cache_budget_tokens=80, recall_grids=1, recall_host_tokens=24),
}


def used(engine) -> VideoStreamInference:
    """An engine after a warm-up (with gc.freeze), a stream with eviction where bounded, and every kind of call."""
    engine.warmup(frame_size=(56, 84), chunk_frames=4, fps=2)
    for i in range(0, 12, 3):
        engine.append_frames(FRAMES[i:i + 3], fps=2)
    engine.ask("What?", max_new_tokens=2)
    engine.ask_choice("Which?", ["a", "b c"])
    for _ in engine.ask_stream("Go on.", max_new_tokens=2):
        pass
    engine.ask("Keep this.", update_state=True, max_new_tokens=2)
    return engine


def watch(engine) -> list:
    """Weak references to the stream's memory: every K/V buffer and the recall slab."""
    refs = [weakref.ref(t) for kv in engine.kv.cache.buffers for t in kv]
    if engine.kv.recall is not None and engine.kv.recall.slab is not None:
        refs.append(weakref.ref(engine.kv.recall.slab))
    assert refs and all(r() is not None for r in refs)
    return refs


@pytest.fixture
def no_gc():
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()  # warmup() froze the objects of this test's engines
        gc.enable()


@pytest.mark.parametrize("config", CONFIGS)
def test_dropping_a_warmed_up_engine_frees_its_memory_without_a_collection(tiny, no_gc, config):
    engine = used(VideoStreamInference(*tiny, config=CONFIGS[config]))
    assert engine.stats()["cuda_graphs"].startswith("on (")
    refs = watch(engine)
    del engine
    assert all(r() is None for r in refs), "an engine's memory outlives the engine (a reference cycle holds it)"


@pytest.mark.parametrize("config", CONFIGS)
def test_close_and_the_with_block_free_memory_and_refuse_later_calls(tiny, no_gc, config):
    with used(VideoStreamInference(*tiny, config=CONFIGS[config])) as engine:
        refs = watch(engine)
    assert all(r() is None for r in refs), "close() left the stream's memory alive"
    assert engine.stats()["cache_reserved_bytes"] == 0 and engine.stats()["cache_tokens"] == 0
    for call in (lambda: engine.append_frames(FRAMES[:2], fps=2), lambda: engine.ask("Still there?"),
                 lambda: engine.ask_choice("Which?", ["a", "b"]), lambda: engine.reset(),
                 lambda: next(engine.ask_stream("Hello?"))):
        with pytest.raises(ValueError, match="closed"):
            call()
    engine.close()  # closing twice is harmless


@pytest.mark.parametrize("config", CONFIGS)
def test_reset_frees_memory_and_keep_memory_keeps_it(tiny, no_gc, config):
    engine = used(VideoStreamInference(*tiny, config=CONFIGS[config]))
    refs = watch(engine)
    engine.reset(keep_memory=True)
    assert all(r() is not None for r in refs), "reset(keep_memory=True) must keep the buffers"
    engine.reset()
    assert all(r() is None for r in refs), "reset() left the stream's memory alive (graphs captured over it?)"
    used(engine)  # the engine goes on as a fresh one
    assert engine.stats()["cache_tokens"] > 0
