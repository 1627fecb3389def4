"""Step 1: KV cache + stream_state snapshot/restore isolation on the engine.

A question (ask with update_state=False) must leave the cache signature and stream_state
(last_cache_position, rope_deltas, positions) exactly as before, and frames can be appended
afterwards. Uses QWEN_MODEL_PATH if set, else a random model (tiny on CPU, 3B on a GPU).

    python test_step1_cache.py
"""
from __future__ import annotations

import functools

import torch

from model.report import load_engine, video_path
from model.video_io import load_frames


@functools.lru_cache(maxsize=1)
def setup():
    engine, _ = load_engine()
    frames, fps = load_frames(video_path(), 1.0)
    return engine, frames, fps


def cache_signature(engine) -> tuple:
    """(length, per-layer sums of K and V): changes if any cached value changes."""
    kv = engine.kv
    sums = tuple(round(float(t.double().sum()), 6) for i in range(kv.cache.num_layers) for t in kv.layer(i))
    return kv.get_seq_length(), sums


def streamed(n_frames: int):
    engine, frames, fps = setup()
    engine.reset()
    for i in range(0, n_frames, 4):
        engine.append_frames(frames[i:min(i + 4, n_frames)], fps=fps)
    return engine, frames, fps


def test_ask_restores_cache_signature_and_stream_state():
    engine, _, _ = streamed(8)
    sig, state = cache_signature(engine), engine.state
    print(f"    before: cache_len={sig[0]} last_cache_position={state.last_cache_position} rope_deltas={state.rope_deltas}")
    engine.ask("What is happening?", max_new_tokens=8)
    after = engine.state
    print(f"    after:  cache_len={engine.kv.get_seq_length()} last_cache_position={after.last_cache_position} "
          f"rope_deltas={after.rope_deltas}")
    assert cache_signature(engine) == sig
    assert after is state, "stream_state must be restored as a whole"


def test_manual_snapshot_restore_round_trip():
    engine, frames, fps = streamed(4)
    sig, state = cache_signature(engine), engine.state
    engine.kv.snapshot()
    engine.append_frames(frames[4:8], fps=fps)
    assert engine.kv.get_seq_length() > sig[0]
    engine.kv.restore()
    assert cache_signature(engine) == sig and engine.state is state


def test_frames_can_be_appended_after_a_question():
    engine, frames, fps = streamed(4)
    engine.ask("First question?", max_new_tokens=4)
    before = engine.kv.get_seq_length()
    info = engine.append_frames(frames[4:8], fps=fps)
    assert info.tokens_added > 0 and engine.kv.get_seq_length() == before + info.tokens_added
    ans = engine.ask("Second question?", max_new_tokens=4)
    assert ans.num_tokens >= 0 and torch.isfinite(ans.first_logits).all()


def test_odd_frame_held_across_a_question():
    engine, frames, fps = streamed(0)
    engine.append_frames(frames[:3], fps=fps)
    assert engine.stats()["pending_frames"] == 1
    sig = cache_signature(engine)
    engine.ask("Anything?", max_new_tokens=2)
    assert cache_signature(engine) == sig and engine.stats()["pending_frames"] == 1
    engine.append_frames(frames[3:4], fps=fps)
    assert engine.stats()["pending_frames"] == 0


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]

if __name__ == "__main__":
    from model.report import main

    main("STEP 1: KV cache + stream_state snapshot/restore isolation", CHECKS)
