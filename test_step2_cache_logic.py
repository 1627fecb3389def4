"""Step 2: KVCacheManager logic, no model needed (CPU, seconds).

    python test_step2_cache_logic.py     # prints a report, exits non-zero on a failed check
    pytest test_step2_cache_logic.py
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from model.kv_cache_manager import KVCacheManager

LAYERS, HEADS, DIM = 3, 2, 8


@dataclass(frozen=True)
class FakeState:
    """Stands in for the stream's StreamState: the manager owns last_cache_position, the rest is the stream's."""

    last_cache_position: int = 0
    rope_deltas: int = 0


def write(mgr: KVCacheManager, txn, n: int, seed: int) -> list[torch.Tensor]:
    """Write n random tokens into every layer after the transaction's head (as a forward would)."""
    g = torch.Generator().manual_seed(seed)
    view = mgr.view(txn, n)
    ks = []
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, n, DIM, generator=g)
        view.update(k, -k, layer)
        ks.append(k)
    txn.wrote(n, rope_deltas=txn.state.rope_deltas + 1)
    return ks


def append(mgr: KVCacheManager, n: int, seed: int) -> list[torch.Tensor]:
    """One committed transaction of n tokens."""
    txn = mgr.begin()
    ks = write(mgr, txn, n, seed)
    mgr.commit(txn)
    return ks


def live(mgr: KVCacheManager) -> list[torch.Tensor]:
    return [t.clone() for i in range(LAYERS) for t in mgr.layer(i)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def fresh(**kw) -> KVCacheManager:
    return KVCacheManager(LAYERS, HEADS, DIM, initial_state=FakeState(), **kw)


def test_get_seq_length_counts_appended_tokens():
    mgr = fresh()
    assert mgr.get_seq_length() == 0 and mgr.nbytes() == 0
    append(mgr, 5, 0)
    append(mgr, 3, 1)
    assert mgr.get_seq_length() == 8 and mgr.state.last_cache_position == 8 and mgr.state.rope_deltas == 2
    assert mgr.nbytes() == 8 * LAYERS * 2 * HEADS * DIM * 4  # K and V, fp32


def test_appended_tokens_are_stored_in_order():
    mgr = fresh()
    a = append(mgr, 4, 0)
    b = append(mgr, 2, 1)
    k, v = mgr.layer(1)
    assert torch.equal(k, torch.cat([a[1], b[1]], dim=2)) and torch.equal(v, -k)


def test_uncommitted_transaction_leaves_no_trace():
    """Dropping a transaction is the rollback: the head, and so the live cache, are as before."""
    mgr = fresh()
    append(mgr, 6, 0)
    kv, state = live(mgr), mgr.state
    txn = mgr.begin()
    write(mgr, txn, 5, 1)
    assert txn.length == 11 and mgr.get_seq_length() == 6
    del txn
    assert same(live(mgr), kv) and mgr.state is state


def test_snapshot_restore_rolls_back_cache_and_state():
    mgr = fresh()
    append(mgr, 6, 0)
    kv, state = live(mgr), mgr.state
    mgr.snapshot()
    append(mgr, 5, 1)
    assert mgr.state.rope_deltas == 2
    mgr.restore()
    assert same(live(mgr), kv) and mgr.state is state and mgr.snapshot_depth == 0


def test_snapshot_is_o1_no_copy():
    mgr = fresh()
    append(mgr, 100, 0)
    ptrs, reserved = [k.data_ptr() for k, _ in mgr.cache.buffers], mgr.reserved_bytes()
    mgr.snapshot()
    append(mgr, 7, 1)
    mgr.restore()
    assert [k.data_ptr() for k, _ in mgr.cache.buffers] == ptrs and mgr.reserved_bytes() == reserved


def test_nested_snapshots_work_as_a_stack():
    mgr = fresh()
    append(mgr, 2, 0)
    s0 = (live(mgr), mgr.state)
    mgr.snapshot()
    append(mgr, 3, 1)
    s1 = (live(mgr), mgr.state)
    mgr.snapshot()
    append(mgr, 4, 2)
    assert mgr.snapshot_depth == 2
    mgr.restore()
    assert same(live(mgr), s1[0]) and mgr.state == s1[1]
    mgr.restore()
    assert same(live(mgr), s0[0]) and mgr.state == s0[1]


def test_discard_snapshot_keeps_new_tokens():
    mgr = fresh()
    append(mgr, 2, 0)
    mgr.snapshot()
    append(mgr, 3, 1)
    kv = live(mgr)
    mgr.discard_snapshot()
    assert same(live(mgr), kv) and mgr.get_seq_length() == 5 and mgr.snapshot_depth == 0


def test_restore_or_discard_without_snapshot_raises():
    mgr = fresh()
    with pytest.raises(RuntimeError, match="without a matching snapshot"):
        mgr.restore()
    with pytest.raises(RuntimeError, match="without a matching snapshot"):
        mgr.discard_snapshot()


def test_stale_transaction_cannot_commit():
    mgr = fresh()
    old = mgr.begin()
    append(mgr, 2, 0)
    write(mgr, old, 1, 1)
    with pytest.raises(RuntimeError, match="did not start from the current head"):
        mgr.commit(old)
    assert mgr.get_seq_length() == 2


def test_rolled_back_tokens_are_overwritten_by_later_appends():
    mgr = fresh()
    append(mgr, 3, 0)
    mgr.snapshot()
    append(mgr, 4, 1)
    mgr.restore()
    c = append(mgr, 4, 2)
    assert torch.equal(mgr.layer(0)[0][:, :, 3:], c[0])


def test_rollback_truncates():
    mgr = fresh()
    a = append(mgr, 5, 0)
    mgr.rollback(2)
    assert mgr.get_seq_length() == 2 and torch.equal(mgr.layer(0)[0], a[0][:, :, :2])
    with pytest.raises(ValueError, match="outside"):
        mgr.rollback(3)


def test_growth_past_capacity_keeps_content_and_snapshots():
    mgr = fresh(grow_min=16)
    append(mgr, 10, 0)
    mgr.snapshot()
    kv = live(mgr)
    cap = mgr.cache.capacity
    append(mgr, cap, 1)  # forces a reallocation inside the snapshot
    assert mgr.cache.capacity > cap and mgr.cache.allocations == 2
    mgr.restore()
    assert same(live(mgr), kv)


def test_growth_keeps_uncommitted_tokens_of_the_transaction():
    mgr = fresh(grow_min=16)
    append(mgr, 10, 0)
    txn = mgr.begin()
    a = write(mgr, txn, 5, 1)
    b = write(mgr, txn, 20, 2)  # grows while 5 uncommitted tokens are in flight
    mgr.commit(txn)
    assert torch.equal(mgr.layer(2)[0][:, :, 10:], torch.cat([a[2], b[2]], dim=2))


def test_failed_growth_leaves_buffers_untouched(monkeypatch):
    """Out of memory at any layer of a growth: no layer is swapped, the cache stays usable."""
    mgr = fresh(grow_min=16)
    append(mgr, 10, 0)
    kv, buffers = live(mgr), mgr.cache.buffers
    real_zeros, calls = torch.zeros, []

    def zeros(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # layer 1's keys
            raise torch.OutOfMemoryError("simulated out of memory")
        return real_zeros(*args, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    txn = mgr.begin()
    with pytest.raises(torch.OutOfMemoryError):
        write(mgr, txn, 40, 1)
    monkeypatch.undo()
    assert mgr.cache.buffers is buffers and same(live(mgr), kv)
    append(mgr, 40, 2)
    assert mgr.get_seq_length() == 50


def test_clone_is_an_independent_deep_copy():
    mgr = fresh()
    append(mgr, 5, 0)
    twin = mgr.clone()
    kv = live(twin)
    append(mgr, 2, 3)
    mgr.cache.buffers[0][0][:, :, :5].zero_()
    assert same(live(twin), kv) and twin.get_seq_length() == 5 and twin.state == FakeState(5, 1)
    assert twin.cache.buffers[0][0].data_ptr() != mgr.cache.buffers[0][0].data_ptr()


def test_clear_frees_memory():
    mgr = fresh()
    append(mgr, 50, 0)
    mgr.snapshot()
    mgr.clear()
    assert mgr.get_seq_length() == 0 and mgr.reserved_bytes() == 0 and mgr.snapshot_depth == 0
    assert mgr.cache.buffers == () and mgr.state == FakeState()


def test_build_full_attention_mask_concatenates():
    mgr = fresh()
    append(mgr, 4, 0)
    new = torch.tensor([[1, 1, 0]])
    full = mgr.build_full_attention_mask(new)
    assert full.tolist() == [[1, 1, 1, 1, 1, 1, 0]] and full.dtype == new.dtype
    with pytest.raises(ValueError, match="batch, new_tokens"):
        mgr.build_full_attention_mask(torch.ones(3))


CHECKS = [v for k, v in list(globals().items()) if k.startswith("test_")]  # definition order

if __name__ == "__main__":
    from model.report import main

    main("STEP 2: KVCacheManager logic (CPU, no model)", CHECKS)
