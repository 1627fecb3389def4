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


def cache_signature(engine) -> tuple[int, list[torch.Tensor]]:
    """(length, every layer's live K and V, cloned): compare with ``same_cache``."""
    kv = engine.kv
    return kv.get_seq_length(), [t.clone() for i in range(kv.cache.num_layers) for t in kv.layer(i)]


def same_cache(a: tuple, b: tuple) -> bool:
    """Two ``cache_signature``s are the same cache: same length and bit-identical tensors."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


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
    assert same_cache(cache_signature(engine), sig)
    assert after is state, "stream_state must be restored as a whole"


def test_manual_snapshot_restore_round_trip():
    engine, frames, fps = streamed(4)
    sig, state = cache_signature(engine), engine.state
    engine.kv.snapshot()
    engine.append_frames(frames[4:8], fps=fps)
    assert engine.kv.get_seq_length() > sig[0]
    engine.kv.restore()
    assert same_cache(cache_signature(engine), sig) and engine.state is state


def test_frames_can_be_appended_after_a_question():
    """Frames appended after a question give the cache, and the next answer, of a stream never asked."""
    engine, frames, fps = streamed(4)
    engine.ask("First question?", max_new_tokens=4)
    before = engine.kv.get_seq_length()
    info = engine.append_frames(frames[4:8], fps=fps)
    assert info.tokens_added > 0 and engine.kv.get_seq_length() == before + info.tokens_added
    asked = cache_signature(engine)
    ans = engine.ask("Second question?", max_new_tokens=4)
    engine, _, _ = streamed(8)  # the same frames in the same chunks, no first question
    assert same_cache(cache_signature(engine), asked)
    ref = engine.ask("Second question?", max_new_tokens=4)
    assert torch.equal(ans.first_logits, ref.first_logits) and ans.token_ids == ref.token_ids
    assert len(ans.token_ids) <= 4


def test_cache_signature_sees_a_change_that_keeps_every_sum():
    """The signature compares tensors, not sums: swapping two cached values is a different cache."""
    engine, _, _ = streamed(4)
    sig = cache_signature(engine)
    k = engine.kv.layer(0)[0]  # (1, H_kv, length, D) a view of the live keys
    first, last = k[0, 0, 0, 0].clone(), k[0, 0, -1, -1].clone()
    assert not torch.equal(first, last)
    k[0, 0, 0, 0], k[0, 0, -1, -1] = last, first
    try:
        assert not same_cache(cache_signature(engine), sig)
    finally:
        k[0, 0, 0, 0], k[0, 0, -1, -1] = first, last
    assert same_cache(cache_signature(engine), sig)


def test_odd_frame_held_across_a_question():
    engine, frames, fps = streamed(0)
    engine.append_frames(frames[:3], fps=fps)
    assert engine.stats()["pending_frames"] == 1
    sig = cache_signature(engine)
    engine.ask("Anything?", max_new_tokens=2)
    assert same_cache(cache_signature(engine), sig) and engine.stats()["pending_frames"] == 1
    engine.append_frames(frames[3:4], fps=fps)
    assert engine.stats()["pending_frames"] == 0


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]

if __name__ == "__main__":
    from model.report import main

    main("STEP 1: KV cache + stream_state snapshot/restore isolation", CHECKS, ("QWEN_MODEL_PATH", "VIDEO_PATH"))
