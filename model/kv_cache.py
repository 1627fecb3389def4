"""The K/V buffers of one stream and the view a forward writes through.

``StreamKVCache`` holds per layer K and V of shape (1, H_kv, capacity, D), allocated with
explicit shapes and grown geometrically, all layers at once or not at all. It holds no length:
which tokens are live is the ``KVCacheManager``'s committed head (``kv_cache_manager.py``).
``CacheView`` is what transformers' attention layers see during one forward.
"""
from __future__ import annotations

from typing import Optional

import torch

Buffers = tuple  # ((K, V), ...) per layer, each (1, H_kv, capacity, D); replaced whole, never mutated in length


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

    def slot_index(self, slots: torch.Tensor) -> torch.Tensor:
        """(n,) int64 CPU slots -> where they are in the buffers, on the device (here: the same numbers)."""
        return slots.to(self.device)

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
    [0, start+n). Static form (``index``: CUDA graphs, bounded streams): K/V go to the device
    indices ``index`` and attention gets the whole buffers (a mask hides what a row must not see),
    or their first ``end`` slots.
    """

    def __init__(self, buffers: Buffers, start: int, index: Optional[torch.Tensor] = None, end: Optional[int] = None):
        self.buffers, self.start, self.index, self.end = buffers, start, index, end

    # 4.57 passes cache_kwargs positionally, 5.x as a keyword
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """(1, H_kv, n, D) new K/V -> (1, H_kv, keys, D) K and V to attend over."""
        k, v = self.buffers[layer_idx]
        if self.index is not None:
            k.index_copy_(2, self.index, key_states)
            v.index_copy_(2, self.index, value_states)
            return (k, v) if self.end is None else (k[:, :, :self.end], v[:, :, :self.end])
        end = self.start + key_states.shape[2]
        assert end <= k.shape[2], f"segment ends at {end}, past the capacity {k.shape[2]}: call ensure() first"
        k[:, :, self.start:end].copy_(key_states)
        v[:, :, self.start:end].copy_(value_states)
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start
