"""Recall of evicted video: host copies of evicted grids, scored against a question and brought back.

With ``StreamConfig.recall_grids`` > 0, a bounded stream keeps each grid it evicts in one host
slab (pinned on CUDA): its K/V exactly as they were in the cache (keys rotated at their original
positions), plus a summary on the device, the mean key per layer and K/V head. At question time
(``Stream.open_question``) the question is first run on a dropped fork through the first
``recall_probe_layers`` decoder layers (a CUDA graph on the GPU) to read its own queries; each stored
grid scores sum over those layers and heads of (mean query . mean key), ReKV's block retrieval;
the ``recall_grids`` best are copied into free cache slots of the question's transaction and
attended at their original positions, by the question and its answer only (the commit of a turn
drops them again). The probe leaves out a held odd frame (encoding it twice would double the cost)
and the deeper layers: a cheaper, coarser relevance, which only decides *which* grids come back;
what the question computes with them is exact either way. Which grids are stored is part of the committed
head (``SlotLayout.stored``, whose spans' slots are slab rows); this store holds the slab and
the summaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kv_cache import StreamKVCache
from .slot_layout import Span


@dataclass(frozen=True)
class Recalled:
    """One grid of evicted video a question saw again."""

    seq: int  # transcript index of its first token
    tokens: int
    start_s: float  # its video, in stream seconds
    end_s: float


def recalled(layout) -> tuple[Recalled, ...]:
    """The grids a working head holds for its question only (none for an unbounded stream)."""
    if layout is None:
        return ()
    return tuple(Recalled(s.seq, s.n, s.start_s, s.start_s + s.seconds) for s in layout.spans if s.recalled)


class QueryProbe:
    """The probe's reading: per layer, the (row-weighted) mean of the question's rotated queries, per K/V head.

    Called by the attention function as ``on_query(layer, query)``; writes into ``out`` in place, so a
    CUDA graph can capture it (``weights`` and ``out`` are then the graph's static buffers).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, weights: torch.Tensor):
        self.layers = layers
        self.weights = weights  # (rows,) float32: 1/n for the n real rows, 0 for a graph's pad rows
        self.out = torch.zeros(layers, kv_heads, head_dim, dtype=torch.float32, device=weights.device)

    @classmethod
    def for_model(cls, model, probe_layers: int, rows: int, n: int) -> "QueryProbe":
        """The probe of ``model`` for n tokens in ``rows`` rows: its first ``probe_layers`` layers' query means."""
        layers, kv_heads, head_dim = model.kv_shape()
        return cls(min(probe_layers, layers), kv_heads, head_dim, cls.uniform(rows, n, model.device))

    @staticmethod
    def uniform(rows: int, n: int, device) -> torch.Tensor:
        return (torch.arange(rows, device=device) < n).float() / n

    def __call__(self, layer: int, query: torch.Tensor) -> None:  # query (1, H_q, rows, D)
        if layer < self.layers:
            q = torch.einsum("hrd,r->hd", query[0].float(), self.weights)  # (H_q, D)
            kv_heads, head_dim = self.out.shape[1:]
            self.out[layer].copy_(q.view(kv_heads, -1, head_dim).sum(1))  # the query heads of each K/V head


class RecallStore:
    """Evicted grids in one host slab (pinned on CUDA) plus a summary per grid on the model's device.

    The slab holds (capacity, 2, L, H_kv, D): a token's K and V of every layer side by side, so a
    grid is one contiguous block, copied in one transfer each way; a stored span's ``row`` is its
    first row. A grid goes to rows free in every reachable head (as cache slots do), so a dropped
    transaction never overwrites what the committed head or a snapshot still stores. The slab is
    sized ``host_tokens`` plus room for a few grids, and grows (x1.25) only when old snapshots hold
    more than that.
    """

    def __init__(self, host_tokens: int):
        self.host_tokens = host_tokens
        self.slab: Optional[torch.Tensor] = None
        self.summaries: dict[int, torch.Tensor] = {}  # grid -> (L, H_kv, D) float32 mean key
        self.allocations = 0

    @property
    def capacity(self) -> int:
        return self.slab.shape[0] if self.slab is not None else 0

    def _taken(self, reachable: list) -> torch.Tensor:
        """(capacity,) bool: rows a reachable head's stored grids occupy (heads usually share one tuple)."""
        ranges = [(s.row, s.n) for stored in {id(st.layout.stored): st.layout.stored for st in reachable}.values()
                  for s in stored]
        edges = torch.zeros(self.capacity + 1, dtype=torch.long)
        if ranges:
            first, n = torch.tensor(ranges).unbind(1)
            edges.index_add_(0, first, torch.ones_like(first)).index_add_(0, first + n, -torch.ones_like(first))
        return edges.cumsum(0)[:-1] > 0

    def _grow(self, capacity: int, like: torch.Tensor) -> None:
        pin = like.device.type == "cuda"
        slab = torch.empty((capacity, *like.shape[1:]), dtype=like.dtype, pin_memory=pin)
        if self.slab is not None:
            slab[:self.capacity].copy_(self.slab)
        self.slab, self.allocations = slab, self.allocations + 1

    def forget(self) -> None:
        """Drop what is stored, keep the slab (a stream reset that keeps its memory): rows are free when no
        head stores a grid in them."""
        self.summaries = {}

    def reserve(self, cache: StreamKVCache, grid_tokens: int) -> None:
        """Allocate the slab now (``host_tokens`` plus room for 4 grids of ``grid_tokens``) rather than at the
        first eviction: pinning GiBs of host memory takes seconds (2.8 s for 2.3 GiB on the H200 host)."""
        if self.slab is None:
            k = cache.buffers[0][0]  # (1, H_kv, capacity, D)
            like = torch.empty(0, 2, len(cache.buffers), k.shape[1], k.shape[3], dtype=k.dtype, device=k.device)
            self._grow(self.host_tokens + 4 * grid_tokens, like)

    def keep(self, evicted: list[Span], cache: StreamKVCache, reachable: list) -> list[Span]:
        """Copy ``evicted`` grids (still in their cache slots) into the slab -> the same spans at their rows."""
        if len(self.summaries) > 2 * len(reachable[0].layout.stored) + 64:  # forget what no head stores
            live = {s.grid for state in reachable for s in state.layout.stored}
            self.summaries = {g: t for g, t in self.summaries.items() if g in live}
        out, taken = [], None
        for span in evicted:
            index = cache.slot_index(span.slots)
            k = torch.stack([kb.index_select(2, index)[0] for kb, _ in cache.buffers])  # (L, H_kv, n, D)
            v = torch.stack([vb.index_select(2, index)[0] for _, vb in cache.buffers])
            rows = torch.stack([k, v]).permute(3, 0, 1, 2, 4).contiguous()  # (n, 2, L, H_kv, D)
            self.reserve(cache, span.n)  # the slab, if warmup() did not allocate it
            taken = self._taken(reachable) if taken is None else taken
            first = _first_run(~taken, span.n)
            while first is None:  # old snapshots hold more than the slab has room for: grow it
                self._grow(max(self.capacity + span.n, self.capacity * 5 // 4), rows)
                taken = torch.cat([taken, torch.zeros(self.capacity - taken.numel(), dtype=torch.bool)])
                first = _first_run(~taken, span.n)
            taken[first:first + span.n] = True  # the call's next grid goes elsewhere
            # copied without waiting for the device: later loads are ordered after it on the same stream
            self.slab[first:first + span.n].copy_(rows, non_blocking=self.slab.is_pinned())
            self.summaries[span.grid] = k.float().mean(2)  # (L, H_kv, D) on the device: questions score them all
            out.append(span.moved(span.slots, recalled=False, row=first))
        return out

    def scores(self, queries: torch.Tensor, candidates: tuple[Span, ...]) -> list[float]:
        """queries: (P, H_kv, D) ``QueryProbe.out`` of the first P layers -> a relevance per candidate."""
        p = queries.shape[0]
        summaries = torch.stack([self.summaries[s.grid][:p] for s in candidates])  # (N, P, H_kv, D)
        return torch.einsum("lhd,nlhd->n", queries, summaries).tolist()

    def load(self, cache: StreamKVCache, spans: list[Span], slots: torch.Tensor) -> None:
        """Write stored grids' K/V into (sum n,) device ``slots`` of every layer, in ``spans`` order.

        One host-to-device copy per grid (pinned: asynchronous) into one staging tensor, then one
        write per layer and K/V for all grids together.
        """
        rows = torch.empty((slots.numel(), *self.slab.shape[1:]), dtype=self.slab.dtype, device=cache.device)
        at = 0
        for span in spans:
            rows[at:at + span.n].copy_(self.slab[span.row:span.row + span.n], non_blocking=True)  # (n, 2, L, H_kv, D)
            at += span.n
        for i, (kb, vb) in enumerate(cache.buffers):
            kb.index_copy_(2, slots, rows[:, 0, i].transpose(0, 1)[None])
            vb.index_copy_(2, slots, rows[:, 1, i].transpose(0, 1)[None])

    def nbytes(self) -> int:
        """Host bytes the slab holds (what recall costs in host memory, stored or not)."""
        return self.slab.numel() * self.slab.element_size() if self.slab is not None else 0

    def clone(self) -> "RecallStore":
        other = RecallStore(self.host_tokens)
        other.slab = self.slab.clone() if self.slab is not None else None
        other.summaries = dict(self.summaries)  # summaries are never written after they are made
        other.allocations = self.allocations
        return other


def _first_run(free: torch.Tensor, n: int):
    """The first index of n consecutive True in (capacity,) ``free``, or None."""
    if free.numel() < n:
        return None
    runs = torch.cat([torch.zeros(1, dtype=torch.long), free.long().cumsum(0)])
    fits = torch.nonzero(runs[n:] - runs[:-n] == n)[:, 0]
    return int(fits[0]) if fits.numel() else None


def best(scores: list[float], stored: tuple[Span, ...], k: int) -> list[Span]:
    """The ``k`` stored grids that score highest (ties: the newer first), in transcript order."""
    order = sorted(range(len(stored)), key=lambda i: (-scores[i], -stored[i].seq))[:k]
    return [stored[i] for i in sorted(order)]
