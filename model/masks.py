"""Every attention mask the engine uses, built in one place.

- ``causal_mask``: a segment of n tokens after ``past`` cached ones (all of the cache visible,
  causal among the new): the dense (1, 1, n, past+n) additive form;
- ``tree_mask``: several choice branches packed after a shared prefix, each seeing the cache
  and its own earlier tokens;
- ``static_causal_mask``: the graph form, a row per token over the whole preallocated capacity;
- ``rank_of`` / ``rank_mask`` / ``slot_mask``: a bounded stream's forms, over scattered cache
  slots (``slot_layout.py``): a per-slot rank (kept, k-th new token, nothing), and the dense mask;
- ``StreamMask``: what the fast attention kernels are handed instead of a tensor (the causal
  case needs no tensor at all: a bottom-right causal bias);
- ``Masks``: one stream's builder, choosing among these forms by its settings (dense for a
  ``fast=False`` stream, a ``StreamMask`` for the torch kernels, the live length on the device
  for the Triton kernel).
Additive masks hold 0 where a key is visible and the dtype's minimum where it is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class StreamMask:
    """The keys are ``past`` cached tokens then the n new ones (fast kernels only).

    ``dense``: an additive (1, 1, n, keys) mask, or None for plain causal-after-the-cache.
    ``start``: ``past`` as a 0-d device tensor: then the live-length kernel
    (``triton_attention``) runs, reading keys [0, start+n) of buffers of any capacity.
    The two limits choose among the torch kernels (``fast_attention.text_attention``); they
    come from the stream's ``StreamConfig``.
    """

    past: int
    dense: Optional[torch.Tensor] = None
    fold_max_rows: int = 1024
    rows_max_scores: int = 96 * 2**20
    start: Optional[torch.Tensor] = None
    branches: Optional[torch.Tensor] = None  # (n,) int32 where each token's branch starts (a tree), with ``start``
    rank: Optional[torch.Tensor] = None  # (capacity,) int32 ``rank_of`` of a bounded stream, with ``start`` = slots to scan
    on_query: Optional[Callable] = None  # recall's probe: called (layer index, (B, H_q, n, D) rotated queries)


def causal_mask(past: int, n: int, dtype, device) -> torch.Tensor:
    """(1, 1, n, past+n) additive mask: every cached token visible, causal among the n new ones."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(past + n, device=device)[None, :]
    mask = torch.zeros(n, past + n, dtype=dtype, device=device)
    return mask.masked_fill_(j > past + i, torch.finfo(dtype).min)[None, None]


def branch_starts(lengths: list[int], device) -> torch.Tensor:
    """(L,) int32: for each token of branches packed one after another, where its branch starts."""
    starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
    return torch.repeat_interleave(starts, torch.tensor(lengths, device=device)).to(torch.int32)


def tree_mask(past: int, lengths: list[int], dtype, device) -> torch.Tensor:
    """(1, 1, L, past+L) additive mask for branches of ``lengths`` tokens packed after a shared prefix.

    Each branch sees the whole cache and its own earlier tokens only (L = sum(lengths)).
    """
    total = sum(lengths)
    branch = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    idx = torch.arange(total, device=device)
    visible = (branch[:, None] == branch[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros(total, past + total, dtype=dtype, device=device)
    mask[:, past:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def static_causal_mask(index: torch.Tensor, columns: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(1, 1, b, capacity) additive mask: row r sees every slot up to its own index ``index[r]``.

    ``index`` (b,) where the segment's K/V are written, ``columns`` = arange(capacity), ``zero``
    a 0-d tensor of the model dtype; no host sync, so it can run inside a CUDA graph.
    """
    return torch.where(columns[None, :] <= index[:, None], zero, torch.finfo(zero.dtype).min)[None, None]


def rank_of(visible: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(capacity,) int32 rank of each slot of a slot cache for a segment written at (n,) ``slots``:
    0 a kept token (``visible``), k >= 1 the segment's k-th new token, -1 nothing."""
    rank = visible.to(torch.int32) - 1
    return rank.index_copy_(0, slots, torch.arange(1, slots.numel() + 1, dtype=torch.int32, device=slots.device))


def scan_end(rank: torch.Tensor) -> torch.Tensor:
    """0-d int64: 1 + the highest slot that a ``rank_of`` gives to anything (kept or new).

    A bounded stream's attention reads slots [0, scan_end) only, so its cost follows the slots in
    use, not the reserved capacity (slots are allocated lowest first). On the device, no host sync.
    """
    slot = torch.arange(rank.numel(), device=rank.device)
    return torch.where(rank >= 0, slot, -1).amax() + 1


def rank_mask(rank: torch.Tensor, rows: int, lengths: Optional[list[int]], dtype) -> torch.Tensor:
    """(1, 1, rows, capacity) additive mask from a ``rank_of``: row r sees kept slots and the new tokens
    at or before it (with ``lengths``, choice branches: only those of its own branch)."""
    r = torch.arange(rows, device=rank.device)[:, None]
    new = rank[None, :].long() - 1  # (1, capacity) index of a new token in the segment
    allowed = (rank[None, :] == 0) | ((new >= 0) & (new <= r))
    if lengths is not None:
        allowed &= (rank[None, :] == 0) | (new >= branch_starts(lengths, rank.device).long()[:, None])
    zero = torch.zeros((), dtype=dtype, device=rank.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def slot_mask(visible: torch.Tensor, slots: torch.Tensor, lengths: Optional[list[int]], dtype) -> torch.Tensor:
    """(1, 1, n, capacity) additive mask for n new tokens written at (n,) ``slots`` of a slot cache.

    ``visible`` (capacity,) bool: the slots of kept tokens, all visible. Among the new tokens:
    causal in their order, or, with ``lengths``, choice branches (each sees its own earlier tokens).
    """
    return rank_mask(rank_of(visible.to(slots.device), slots), slots.numel(), lengths, dtype)


@dataclass(frozen=True)
class Masks:
    """The masks of one stream, in the form its kernels take (``fast``: a ``StreamMask``; ``live``:
    with the length on the device, for the Triton kernel), with its kernel-selection limits."""

    fast: bool
    live: bool
    fold_max_rows: int
    rows_max_scores: int
    dtype: torch.dtype
    device: torch.device

    def _stream(self, past: int, dense=None, start=None, branches=None, rank=None, on_query=None) -> StreamMask:
        return StreamMask(past, dense, self.fold_max_rows, self.rows_max_scores, start, branches, rank, on_query)

    def causal(self, past: int, n: int, dtype, start: Optional[torch.Tensor] = None):
        """n tokens after ``past`` cached ones. ``start``: ``past`` as a device tensor already (CUDA graphs)."""
        if not self.fast:
            return causal_mask(past, n, dtype, self.device)
        if self.live:
            start = start if start is not None else torch.tensor(past, dtype=torch.long, device=self.device)
        return self._stream(past, start=start)

    def tree(self, past: int, lengths: list[int]):
        """Choice branches of ``lengths`` tokens packed after ``past`` cached ones."""
        if self.live:
            start = torch.tensor(past, dtype=torch.long, device=self.device)
            return self._stream(past, start=start, branches=branch_starts(lengths, self.device))
        dense = tree_mask(past, lengths, self.dtype, self.device)  # (1, 1, L, past+L)
        return self._stream(past, dense) if self.fast else dense

    def bounded(self, past: int, visible: torch.Tensor, slots: torch.Tensor, tree: Optional[list[int]] = None,
                on_query=None):
        """A bounded stream's new tokens at (n,) device ``slots``: the (capacity,) ``visible`` kept slots,
        then causal (or ``tree`` branches) among the new ones; (1, 1, n, capacity) in this form."""
        if self.live:  # the Triton kernel scans the slots in use, each slot's rank says who sees it
            rank = rank_of(visible, slots)  # (capacity,) int32
            branches = branch_starts(tree, self.device) if tree is not None else None
            return self._stream(past, start=scan_end(rank), branches=branches, rank=rank, on_query=on_query)
        dense = slot_mask(visible, slots, tree, self.dtype)
        if not self.fast and on_query is None:
            return dense
        return self._stream(past, dense, on_query=on_query)
