"""Step 2: KVCacheManager logic, no model needed (CPU, seconds).

    python test_step2_cache_logic.py     # prints a report, exits non-zero on a failed check
    pytest test_step2_cache_logic.py
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from model.kv_cache_manager import KVCacheManager

LAYERS, HEADS, DIM = 3, 2, 8


@dataclass(frozen=True)
class FakeState:
    last_cache_position: int = 0
    rope_deltas: int = 0


class Owner:
    """Stands in for StreamQwenModel: anything with a ``stream_state`` attribute."""

    def __init__(self):
        self.stream_state = FakeState()


def append(mgr: KVCacheManager, owner: Owner, n: int, seed: int) -> list[torch.Tensor]:
    """Write n random tokens into every layer (as a forward would), advance, update the state."""
    g = torch.Generator().manual_seed(seed)
    ks = []
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, n, DIM, generator=g)
        mgr.cache.update(k, -k, layer)
        ks.append(k)
    mgr.cache.advance(n)
    owner.stream_state = replace(owner.stream_state, last_cache_position=mgr.get_seq_length(),
                                 rope_deltas=owner.stream_state.rope_deltas + 1)
    return ks


def live(mgr: KVCacheManager) -> list[torch.Tensor]:
    return [t.clone() for i in range(LAYERS) for t in mgr.cache.layer(i)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def fresh():
    owner = Owner()
    return KVCacheManager(LAYERS, owner), owner


def test_get_seq_length_counts_appended_tokens():
    mgr, owner = fresh()
    assert mgr.get_seq_length() == 0 and mgr.nbytes() == 0
    append(mgr, owner, 5, 0)
    append(mgr, owner, 3, 1)
    assert mgr.get_seq_length() == 8
    assert mgr.nbytes() == 8 * LAYERS * 2 * HEADS * DIM * 4  # K and V, fp32


def test_appended_tokens_are_stored_in_order():
    mgr, owner = fresh()
    a = append(mgr, owner, 4, 0)
    b = append(mgr, owner, 2, 1)
    k, v = mgr.cache.layer(1)
    assert torch.equal(k, torch.cat([a[1], b[1]], dim=2)) and torch.equal(v, -k)


def test_snapshot_restore_rolls_back_cache_and_state():
    mgr, owner = fresh()
    append(mgr, owner, 6, 0)
    kv, state = live(mgr), owner.stream_state
    mgr.snapshot()
    append(mgr, owner, 5, 1)
    owner.stream_state = replace(owner.stream_state, rope_deltas=99)
    mgr.restore()
    assert same(live(mgr), kv) and owner.stream_state == state and mgr.snapshot_depth == 0


def test_snapshot_is_o1_no_copy():
    mgr, owner = fresh()
    append(mgr, owner, 100, 0)
    ptrs, reserved = [t.data_ptr() for t in mgr.cache.keys], mgr.reserved_bytes()
    mgr.snapshot()
    append(mgr, owner, 7, 1)
    mgr.restore()
    assert [t.data_ptr() for t in mgr.cache.keys] == ptrs and mgr.reserved_bytes() == reserved


def test_nested_snapshots_work_as_a_stack():
    mgr, owner = fresh()
    append(mgr, owner, 2, 0)
    s0 = (live(mgr), owner.stream_state)
    mgr.snapshot()
    append(mgr, owner, 3, 1)
    s1 = (live(mgr), owner.stream_state)
    mgr.snapshot()
    append(mgr, owner, 4, 2)
    assert mgr.snapshot_depth == 2
    mgr.restore()
    assert same(live(mgr), s1[0]) and owner.stream_state == s1[1]
    mgr.restore()
    assert same(live(mgr), s0[0]) and owner.stream_state == s0[1]


def test_discard_snapshot_keeps_new_tokens():
    mgr, owner = fresh()
    append(mgr, owner, 2, 0)
    mgr.snapshot()
    append(mgr, owner, 3, 1)
    kv = live(mgr)
    mgr.discard_snapshot()
    assert same(live(mgr), kv) and mgr.get_seq_length() == 5 and mgr.snapshot_depth == 0


def test_restore_or_discard_without_snapshot_raises():
    mgr, _ = fresh()
    with pytest.raises(RuntimeError, match="without a matching snapshot"):
        mgr.restore()
    with pytest.raises(RuntimeError, match="without a matching snapshot"):
        mgr.discard_snapshot()


def test_rolled_back_tokens_are_overwritten_by_later_appends():
    mgr, owner = fresh()
    append(mgr, owner, 3, 0)
    mgr.snapshot()
    append(mgr, owner, 4, 1)
    mgr.restore()
    c = append(mgr, owner, 4, 2)
    assert torch.equal(mgr.cache.layer(0)[0][:, :, 3:], c[0])


def test_growth_past_capacity_keeps_content_and_snapshots():
    mgr, owner = fresh()
    append(mgr, owner, 1000, 0)
    mgr.snapshot()
    kv = live(mgr)
    cap = mgr.cache.capacity
    append(mgr, owner, cap, 1)  # forces a reallocation inside the snapshot
    assert mgr.cache.capacity > cap
    mgr.restore()
    assert same(live(mgr), kv)


def test_clone_is_an_independent_deep_copy():
    mgr, owner = fresh()
    append(mgr, owner, 5, 0)
    twin = mgr.clone()
    kv = live(twin)
    mgr.snapshot()
    append(mgr, owner, 2, 1)
    mgr.restore()
    append(mgr, owner, 2, 3)  # overwrites the original's buffers beyond 5
    mgr.cache.keys[0][:, :, :5].zero_()
    assert same(live(twin), kv) and twin.get_seq_length() == 5
    assert twin.cache.keys[0].data_ptr() != mgr.cache.keys[0].data_ptr()


def test_clear_frees_memory():
    mgr, owner = fresh()
    append(mgr, owner, 50, 0)
    mgr.snapshot()
    mgr.clear()
    assert mgr.get_seq_length() == 0 and mgr.reserved_bytes() == 0 and mgr.snapshot_depth == 0
    assert all(k is None for k in mgr.cache.keys)


def test_build_full_attention_mask_concatenates():
    mgr, owner = fresh()
    append(mgr, owner, 4, 0)
    new = torch.tensor([[1, 1, 0]])
    full = mgr.build_full_attention_mask(new)
    assert full.tolist() == [[1, 1, 1, 1, 1, 1, 0]] and full.dtype == new.dtype
    with pytest.raises(ValueError, match="batch, new_tokens"):
        mgr.build_full_attention_mask(torch.ones(3))


def test_failed_forward_is_discarded_by_restore():
    """A forward that raised after writing some layers leaves pending tokens; restore drops them."""
    mgr, owner = fresh()
    append(mgr, owner, 3, 0)
    kv = live(mgr)
    mgr.snapshot()
    mgr.cache.update(torch.ones(1, HEADS, 2, DIM), torch.ones(1, HEADS, 2, DIM), 0)  # layer 0 only, then "crash"
    mgr.restore()
    assert same(live(mgr), kv) and mgr.cache.pending == 0


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]  # definition order

if __name__ == "__main__":
    from model.report import main

    main("STEP 2: KVCacheManager logic (CPU, no model)", CHECKS)
