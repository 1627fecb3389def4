"""Attention of a batched forward over a shared K/V pool: the rows of each segment see only their own stream's slots.

A batched forward (``batch_forward.py``) concatenates the segments of several pooled streams into
one row dimension and writes each segment's K/V at its own pool slots; the attention layers then
get the whole pool's buffers and a ``PagedMask`` instead of a mask tensor (``fast_attention``
dispatches on it). Each ``PagedSegment`` describes one segment's view: its stream's local slots
[0, length) (``kv_pool.PooledCache``: a page table maps them to pool slots) and a rank per local
slot (``masks.rank_of``: 0 kept, k >= 1 the segment's k-th new token, -1 nothing), so what a row
sees is exactly what it would see in a bounded stream's own buffer.

- torch kernels (CPU, or ``attention_kernel="torch"``): per segment, its stream's keys are
  gathered into (1, H_kv, length, D) and the stream kernels run with the dense rank mask, as for
  a bounded stream alone;
- the Triton kernel (CUDA, or the interpreter): every segment in one launch, reading keys
  through each segment's block table (``triton_attention.paged_attention``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import triton_attention
from .masks import StreamMask, branch_starts, rank_mask, rank_of


@dataclass(frozen=True, eq=False)
class PagedSegment:
    """One segment of a batched forward: n rows over its stream's local slots [0, length)."""

    n: int
    rank: torch.Tensor  # (length,) int32 on the device: ``rank_of`` of the stream's local slots
    gather: torch.Tensor  # (length,) int64 on the device: the pool slot of each local slot
    table: torch.Tensor  # (ceil(length / page),) int32 on the device: the pool page of each local page
    tree: Optional[tuple[int, ...]] = None  # choice branches' lengths (their tokens see their own branch only)
    on_query: Optional[Callable] = None  # recall's probe: (layer, (1, H_q, n, D) rotated queries)
    live: bool = False  # the Triton kernel (else the torch kernels)
    fold_max_rows: int = 1024
    rows_max_scores: int = 96 * 2**20

    @property
    def length(self) -> int:
        return self.rank.numel()


def segment(cache, layout, slots: torch.Tensor, tree: Optional[list[int]], on_query, masks) -> PagedSegment:
    """The ``PagedSegment`` of n new tokens at (n,) CPU local ``slots`` of a pooled stream whose working head holds
    ``layout``; ``cache`` its ``PooledCache``, ``masks`` its ``Masks`` (kernel choice and limits).

    Only local slots below the highest in use are scanned (as a bounded stream trims to its top slot).
    """
    device = cache.device
    length = max(layout.top, int(slots.max()) + 1)
    visible = layout.visible(cache.capacity, device)[:length]
    rank = rank_of(visible, slots.to(device))  # (length,) int32
    pages = -(-length // cache.page)
    table = cache.table_tensor(device)[:pages].clamp(min=0).to(torch.int32)
    return PagedSegment(slots.numel(), rank, cache.gather_index(length, device), table,
                        tuple(tree) if tree is not None else None, on_query, masks.live, masks.fold_max_rows,
                        masks.rows_max_scores)


@dataclass(frozen=True, eq=False)
class PagedMask:
    """What the attention layers of a batched forward get: the segments, in row order (rows [starts[i], +n_i))."""

    segments: tuple[PagedSegment, ...]
    page: int
    static: Optional[dict] = None  # a captured batch (``batch_graphs``): the Triton kernel's tables, static buffers
    _derived: dict = field(default_factory=dict, repr=False)  # per forward: dense masks, the Triton tables

    @property
    def starts(self) -> list[int]:
        if "starts" not in self._derived:
            at, starts = 0, []
            for s in self.segments:
                starts.append(at)
                at += s.n
            self._derived["starts"] = starts
        return self._derived["starts"]

    def dense(self, i: int, dtype) -> torch.Tensor:
        """(1, 1, n, length) additive mask of segment i (built once per forward, used by every layer)."""
        key = ("dense", i)
        if key not in self._derived:
            s = self.segments[i]
            self._derived[key] = rank_mask(s.rank, s.n, list(s.tree) if s.tree else None, dtype)
        return self._derived[key]

    def tables(self, which: list[int], device) -> dict:
        """The Triton kernel's per-segment tables for segments ``which`` (built once per forward)."""
        key = ("tables", tuple(which))
        if key not in self._derived:
            segs = [self.segments[i] for i in which]
            starts = [self.starts[i] for i in which]
            pages = max(s.table.numel() for s in segs)
            length = pages * self.page
            table = torch.zeros(len(segs), pages, dtype=torch.int32, device=device)
            rank = torch.full((len(segs), length), -1, dtype=torch.int32, device=device)
            branch = torch.zeros(sum(s.n for s in self.segments), dtype=torch.int32, device=device)
            for k, (s, r0) in enumerate(zip(segs, starts)):
                table[k, :s.table.numel()] = s.table
                rank[k, :s.length] = s.rank
                if s.tree:
                    branch[r0:r0 + s.n] = branch_starts(list(s.tree), device)
            self._derived[key] = dict(
                table=table, rank=rank, branch=branch if any(s.tree for s in segs) else None,
                rows=torch.tensor(starts, dtype=torch.int32, device=device),
                n=torch.tensor([s.n for s in segs], dtype=torch.int32, device=device),
                length=torch.tensor([s.length for s in segs], dtype=torch.int32, device=device),
                n_list=[s.n for s in segs], max_length=max(s.length for s in segs))
        return self._derived[key]


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: PagedMask,
              scaling: float) -> torch.Tensor:
    """query (1, H_q, N, D) of all segments' rows; key/value (1, H_kv, pool, D) the pool's buffers -> (1, N, H_q, D)."""
    from .fast_attention import _stream_kernels as stream_kernels  # imported here: fast_attention imports this module

    _, hq, total, d = query.shape
    if mask.static is not None:  # every segment on the Triton kernel; padding rows (no segment's) stay zero
        out = torch.zeros(1, total, hq, d, dtype=query.dtype, device=query.device)
        triton_attention.paged_attention(query, key, value, mask.static, scaling, mask.page, out)
        return out
    out = torch.empty(1, total, hq, d, dtype=query.dtype, device=query.device)
    live = []
    for i, (s, r0) in enumerate(zip(mask.segments, mask.starts)):
        q = query[:, :, r0:r0 + s.n]
        if s.on_query is not None:
            s.on_query(module.layer_idx, q)
        if s.live:
            live.append(i)
            continue
        k, v = key.index_select(2, s.gather), value.index_select(2, s.gather)  # (1, H_kv, length, D)
        spec = StreamMask(0, mask.dense(i, query.dtype), s.fold_max_rows, s.rows_max_scores)
        out[:, r0:r0 + s.n] = stream_kernels(q, k, v, spec, scaling)
    if live:
        triton_attention.paged_attention(query, key, value, mask.tables(live, query.device), scaling, mask.page, out)
    return out
