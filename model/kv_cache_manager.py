"""The KV cache of one stream and its lifecycle: transactions, O(1) snapshots, clone, clear.

``StreamKVCache`` holds the buffers: per layer K and V of shape (1, H_kv, capacity, D),
allocated with explicit shapes and grown geometrically, all layers at once or not at all.
It holds no length: a forward writes a segment at an explicit start (``view``), so writes past
the committed length are invisible until they are committed.

``KVCacheManager`` owns the committed head: one immutable state record whose
``last_cache_position`` is the cache length (the stream's ``StreamState``; any frozen dataclass
with that field). Only the manager changes the length:
- ``begin()`` gives a ``Transaction``, a working copy of the head; ``view(txn, n)`` lets a
  forward write n tokens at ``txn.length``; ``txn.wrote(n)`` advances the working length;
- ``commit(txn)`` publishes the working head in ONE assignment; dropping the transaction is
  the rollback, so an exception anywhere (``KeyboardInterrupt`` included) leaves the head as it was;
- ``snapshot()``/``restore()``/``discard_snapshot()`` keep a stack of heads for callers that
  want nested save points; ``rollback(length)`` truncates.
Snapshots and restores are O(1) and copy nothing: tokens are only ever written past the length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

Buffers = tuple  # ((K, V), ...) per layer, each (1, H_kv, capacity, D); replaced whole, never mutated in length


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class CacheState:
    """The smallest head: just the length (streams use their richer ``StreamState``)."""

    last_cache_position: int = 0


class StreamKVCache:
    """Per-layer K/V buffers of one stream, with explicit shapes."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu",
                 grow_min: int = 1024, initial_capacity: int = 0):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.grow_min, self.initial_capacity = grow_min, initial_capacity
        self.buffers: Buffers = ()  # graphs compare this tuple by identity to know when to re-capture
        self.allocations = 0

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def capacity(self) -> int:
        return self.buffers[0][0].shape[2] if self.buffers else 0

    def reserve(self, n_tokens: int, keep: int) -> None:
        """Make room for ``n_tokens``, copying the first ``keep``. All layers are allocated before any
        is swapped in: an allocation failure (out of memory) leaves the old buffers untouched."""
        if n_tokens <= self.capacity:
            return
        layers, h, d = self.shape
        new = []
        for i in range(layers):
            k = torch.zeros(1, h, n_tokens, d, dtype=self.dtype, device=self.device)  # zeros: graphs read the
            v = torch.zeros(1, h, n_tokens, d, dtype=self.dtype, device=self.device)  # whole buffer (masked)
            if keep:
                k[:, :, :keep].copy_(self.buffers[i][0][:, :, :keep])
                v[:, :, :keep].copy_(self.buffers[i][1][:, :, :keep])
            new.append((k, v))
        self.buffers = tuple(new)
        self.allocations += 1

    def ensure(self, n_tokens: int, keep: int) -> None:
        """Room for ``n_tokens``: the first allocation takes max(n, initial_capacity, grow_min), later ones x1.5."""
        cap = self.capacity
        if n_tokens <= cap:
            return
        grown = max(cap + cap // 2, cap + self.grow_min) if cap else max(self.initial_capacity, self.grow_min)
        self.reserve(max(n_tokens, grown), keep)

    def layer(self, i: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, length, D) views of layer i's keys and values."""
        k, v = self.buffers[i]
        return k[:, :, :length], v[:, :, :length]

    def view(self, start: int) -> "CacheView":
        return CacheView(self.buffers, start)

    def nbytes(self, length: int) -> int:
        """Bytes of the first ``length`` tokens of all K/V buffers."""
        layers, h, d = self.shape
        return 2 * layers * h * d * length * self.buffers[0][0].element_size() if self.buffers else 0

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.buffers for t in kv)

    def clone(self, length: int) -> "StreamKVCache":
        other = StreamKVCache(*self.shape, dtype=self.dtype, device=self.device, grow_min=self.grow_min,
                              initial_capacity=self.initial_capacity)
        if self.buffers:
            other.buffers = tuple((k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in self.buffers)
        return other


class CacheView:
    """What transformers' attention layers see during one forward: ``update`` and ``get_seq_length``.

    Dynamic form (``start``): the segment's K/V go to [start, start+n) and attention gets views of
    [0, start+n). Static form (``index``, CUDA graphs): K/V go to the device indices ``index`` and
    attention gets the whole buffers (a mask hides what a row must not see).
    """

    def __init__(self, buffers: Buffers, start: int, index: Optional[torch.Tensor] = None):
        self.buffers, self.start, self.index = buffers, start, index

    # 4.57 passes cache_kwargs positionally, 5.x as a keyword
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """(1, H_kv, n, D) new K/V -> (1, H_kv, keys, D) K and V to attend over."""
        k, v = self.buffers[layer_idx]
        if self.index is not None:
            k.index_copy_(2, self.index, key_states)
            v.index_copy_(2, self.index, value_states)
            return k, v
        end = self.start + key_states.shape[2]
        assert end <= k.shape[2], f"segment ends at {end}, past the capacity {k.shape[2]}: call ensure() first"
        k[:, :, self.start:end].copy_(key_states)
        v[:, :, self.start:end].copy_(value_states)
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class Transaction:
    """A working copy of the head. Forwards write past the committed length; nothing shows until commit."""

    def __init__(self, base: Any):
        self.base = base  # the committed head this transaction started from
        self.state = base

    @property
    def length(self) -> int:
        return self.state.last_cache_position

    def wrote(self, n: int, **changes) -> None:
        """A forward wrote n tokens at ``length``: advance the working length (and other state fields)."""
        self.state = replace(self.state, last_cache_position=self.length + n, **changes)

    def update(self, **changes) -> None:
        assert "last_cache_position" not in changes, f"only wrote() moves the length: {changes}"
        self.state = replace(self.state, **changes)

    def fork(self) -> "Transaction":
        """A nested transaction starting at this one's working head (dropped = rolled back)."""
        return Transaction(self.state)


class KVCacheManager:
    """A ``StreamKVCache`` plus the committed head, transactions and a stack of O(1) snapshots."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu",
                 initial_state: Any = None, grow_min: int = 1024, initial_capacity: int = 0):
        self.cache = StreamKVCache(num_layers, num_kv_heads, head_dim, dtype, device, grow_min, initial_capacity)
        self.initial_state = initial_state if initial_state is not None else CacheState()
        assert self.initial_state.last_cache_position == 0, self.initial_state
        self._state = self.initial_state
        self._snapshots: list = []

    # -- the head ----------------------------------------------------------------------
    @property
    def state(self) -> Any:
        """The committed head (immutable)."""
        return self._state

    def get_seq_length(self) -> int:
        return self._state.last_cache_position

    def begin(self) -> Transaction:
        return Transaction(self._state)

    def ensure(self, txn: Transaction, n: int) -> None:
        """Room for n more tokens after the working head (growth keeps what the transaction wrote)."""
        self.cache.ensure(txn.length + n, keep=txn.length)

    def view(self, txn: Transaction, n: int) -> CacheView:
        """Where a forward of n tokens writes: right after the working head."""
        self.ensure(txn, n)
        return self.cache.view(txn.length)

    def commit(self, txn: Transaction, result: Any = None, then: Callable[[], None] = _nothing) -> Any:
        """Publish the transaction's head in one assignment, call ``then`` (e.g. a C lock release), return ``result``.

        Callers make ``return kv.commit(txn, result)`` their last step, so no library line runs
        between publishing and returning: a call that raised has not committed.
        """
        if txn.base is not self._state:
            raise RuntimeError("commit() of a transaction that did not start from the current head "
                               "(another commit, restore or clear came in between)")
        self._state = txn.state; then(); return result  # noqa: E702  (one line: no line event after publishing)

    def rollback(self, length: int) -> None:
        """Truncate the cache to its first ``length`` tokens (the rest of the head unchanged)."""
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(f"rollback({length}) outside [0, {self.get_seq_length()}]")
        self._state = replace(self._state, last_cache_position=length)

    # -- snapshots -----------------------------------------------------------------------
    def snapshot(self) -> int:
        """Push the head; returns the stack depth. O(1), no copy."""
        self._snapshots.append(self._state)
        return len(self._snapshots)

    def restore(self) -> None:
        """Pop the last snapshot and make it the head again (cache length and state together)."""
        if not self._snapshots:
            raise RuntimeError("restore() without a matching snapshot()")
        self._state = self._snapshots.pop()

    def discard_snapshot(self) -> None:
        """Pop the last snapshot and keep everything committed since."""
        if not self._snapshots:
            raise RuntimeError("discard_snapshot() without a matching snapshot()")
        self._snapshots.pop()

    @property
    def snapshot_depth(self) -> int:
        return len(self._snapshots)

    # -- copies and memory ---------------------------------------------------------------
    def clone(self) -> "KVCacheManager":
        """An independent deep copy of the cache and head (no snapshots)."""
        other = KVCacheManager(*self.cache.shape, dtype=self.cache.dtype, device=self.cache.device,
                               initial_state=self.initial_state, grow_min=self.cache.grow_min,
                               initial_capacity=self.cache.initial_capacity)
        other.cache = self.cache.clone(self.get_seq_length())
        other._state = self._state
        return other

    def clear(self) -> None:
        """Drop every tensor and snapshot (frees the memory); the head goes back to the empty state."""
        # each step leaves a valid manager: empty head over old buffers, then no snapshots, then new buffers
        self._state = self.initial_state
        self._snapshots = []
        self.cache = StreamKVCache(*self.cache.shape, dtype=self.cache.dtype, device=self.cache.device,
                                   grow_min=self.cache.grow_min, initial_capacity=self.cache.initial_capacity)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, length, D) views of layer i's live keys and values."""
        return self.cache.layer(i, self.get_seq_length())

    def nbytes(self) -> int:
        return self.cache.nbytes(self.get_seq_length())

    def reserved_bytes(self) -> int:
        return self.cache.reserved_bytes()

    def build_full_attention_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """(B, n) mask of new tokens -> (B, length + n): ones for every cached token, then ``new_mask``."""
        if new_mask.ndim != 2:
            raise ValueError(f"new_mask must be (batch, new_tokens), got shape {tuple(new_mask.shape)}")
        past = torch.ones(new_mask.shape[0], self.get_seq_length(), dtype=new_mask.dtype, device=new_mask.device)
        return torch.cat([past, new_mask], dim=1)
