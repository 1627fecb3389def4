"""The KV cache and its lifecycle: append, O(1) snapshot / restore, clone, clear.

``StreamKVCache`` is a preallocated cache with an explicit length counter (no O(n) copy per
append; capacity grows geometrically when needed). Tokens are only ever written at
positions >= ``length``, so a snapshot is just (length, stream_state) and restore is "set
the length back": O(1) time, zero extra memory. ``KVCacheManager`` owns one such cache
plus the snapshot stack, and saves the owner's ``stream_state`` (an immutable dataclass)
with every snapshot. No model code lives here.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

_GROW_MIN = 1024  # tokens added at least per reallocation
_ALLOCATIONS = itertools.count(1)  # process-wide, so no two buffer sets ever share a generation


class StreamKVCache:
    """Per-layer K/V buffers (1, H_kv, capacity, D) with a shared length counter.

    Implements the one method transformers' attention layers call, ``update``. The model
    writes a segment at ``[length, length+n)`` in every layer, then calls ``advance(n)``.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # committed tokens
        self.pending = 0  # tokens written by the forward in flight
        self.generation = 0  # changes whenever buffers are (re)allocated: CUDA graphs must be re-captured
        # Graph mode (cuda_graphs.py): write at these device indices and return whole buffers, so
        # shapes and addresses stay static; attention then masks everything past the segment.
        self.static_index: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` in total (one copy of the live part if it grows)."""
        for i in range(self.num_layers):
            k = self.keys[i]
            if k is None or k.shape[2] >= n_tokens:
                continue
            self.generation = next(_ALLOCATIONS)
            for buf in (self.keys, self.values):
                old = buf[i]
                # zeros, not garbage: graph mode attends over the whole buffer (masked), and 0 * NaN = NaN
                new = old.new_zeros(old.shape[0], old.shape[1], n_tokens, old.shape[3])
                new[:, :, : self.length].copy_(old[:, :, : self.length])
                buf[i] = new

    def ensure(self, n_tokens: int) -> None:
        """Grow geometrically (x1.5, at least 1024 tokens) if ``n_tokens`` do not fit."""
        cap = self.capacity
        if 0 < cap < n_tokens:
            self.reserve(max(n_tokens, cap + max(cap // 2, _GROW_MIN)))

    # Called by transformers' attention layers (4.57 passes cache_kwargs positionally, 5.x as kwargs=).
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """(1, H_kv, n, D) new K/V -> (1, H_kv, length+n, D) views of everything cached."""
        if self.static_index is not None:
            self.keys[layer_idx].index_copy_(2, self.static_index, key_states)
            self.values[layer_idx].index_copy_(2, self.static_index, value_states)
            return self.keys[layer_idx], self.values[layer_idx]
        n = key_states.shape[2]
        end = self.length + n
        if self.keys[layer_idx] is None:
            self.generation = next(_ALLOCATIONS)
            shape = (key_states.shape[0], key_states.shape[1], max(end, _GROW_MIN), key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
        else:
            self.ensure(end)
        self.keys[layer_idx][:, :, self.length : end].copy_(key_states)
        self.values[layer_idx][:, :, self.length : end].copy_(value_states)
        self.pending = n
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        assert n == self.pending, f"advance({n}) but the last forward wrote {self.pending} tokens"
        self.length += n
        self.pending = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def nbytes(self) -> int:
        """Bytes of the live (length) part of all K/V buffers."""
        if self.keys[0] is None:
            return 0
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k in self.keys if k is not None)
        return per_token * self.length

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, length, D) views of layer i's live keys and values."""
        return self.keys[i][:, :, : self.length], self.values[i][:, :, : self.length]

    def clone(self) -> "StreamKVCache":
        c = StreamKVCache(self.num_layers)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                c.keys[i] = self.keys[i][:, :, : self.length].clone()
                c.values[i] = self.values[i][:, :, : self.length].clone()
        c.length = self.length
        return c


@dataclass(frozen=True)
class Snapshot:
    length: int
    state: Any


class KVCacheManager:
    """A ``StreamKVCache`` plus a stack of O(1) snapshots that also save ``owner.stream_state``.

    ``owner`` is any object with a ``stream_state`` attribute holding an immutable value
    (``StreamQwenModel``); pass None to snapshot the cache alone.
    """

    def __init__(self, num_layers: int, owner: Any = None):
        self.num_layers = num_layers
        self.owner = owner
        self.cache = StreamKVCache(num_layers)
        self._snapshots: list[Snapshot] = []

    # -- lifecycle -------------------------------------------------------------------
    def snapshot(self) -> int:
        """Push (length, stream_state); returns the stack depth. O(1), no copy."""
        state = self.owner.stream_state if self.owner is not None else None
        self._snapshots.append(Snapshot(self.cache.length, state))
        return len(self._snapshots)

    def restore(self) -> None:
        """Pop the last snapshot and roll the cache and stream_state back to it."""
        if not self._snapshots:
            raise RuntimeError("restore() without a matching snapshot()")
        snap = self._snapshots.pop()
        assert snap.length <= self.cache.length, f"snapshot length {snap.length} > cache length {self.cache.length}"
        self.cache.length = snap.length
        self.cache.pending = 0
        if self.owner is not None:
            self.owner.stream_state = snap.state

    def discard_snapshot(self) -> None:
        """Pop the last snapshot and keep everything appended since (commit)."""
        if not self._snapshots:
            raise RuntimeError("discard_snapshot() without a matching snapshot()")
        self._snapshots.pop()

    @property
    def snapshot_depth(self) -> int:
        return len(self._snapshots)

    def clone(self) -> "KVCacheManager":
        """An independent deep copy of the cache (no snapshots, same owner)."""
        other = KVCacheManager(self.num_layers, self.owner)
        other.cache = self.cache.clone()
        return other

    def clear(self) -> None:
        """Drop every tensor and snapshot (frees the memory)."""
        self.cache = StreamKVCache(self.num_layers)
        self._snapshots.clear()

    # -- queries ---------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cache.length

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def reserved_bytes(self) -> int:
        return self.cache.reserved_bytes()

    def build_full_attention_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """(B, n) mask of new tokens -> (B, length + n): ones for every cached token, then ``new_mask``."""
        if new_mask.ndim != 2:
            raise ValueError(f"new_mask must be (batch, new_tokens), got shape {tuple(new_mask.shape)}")
        past = torch.ones(new_mask.shape[0], self.cache.length, dtype=new_mask.dtype, device=new_mask.device)
        return torch.cat([past, new_mask], dim=1)
