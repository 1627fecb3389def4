"""Recall of evicted video: host copies of evicted grids, scored against a question and brought back.

With ``StreamConfig.recall_grids`` > 0, a bounded stream keeps each grid it evicts in host memory
(pinned on CUDA): its K/V exactly as they were in the cache (keys rotated at their original
positions), plus a summary, the mean key per layer and K/V head. At question time
(``Stream.open_question``) the question is first run on a dropped fork to read its own queries
at every layer; each stored grid scores sum over layers and heads of (mean query . mean key),
ReKV's block retrieval; the ``recall_grids`` best are copied into free cache slots of the
question's transaction and attended at their original positions, by the question and its answer
only (the commit of a turn drops them again). Which grids are stored is part of the committed
head (``SlotLayout.stored``); this store only holds their tensors, keyed by grid number, and
forgets the ones no reachable head lists.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class RecallStore:
    """Host copies of evicted grids: grid number -> (K, V) (L, H_kv, n, D) and summary (L, H_kv, D) float32."""

    def __init__(self):
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.token_bytes = 0  # host bytes of one token's K and V (all layers)

    def keep(self, evicted: list[Span], cache: StreamKVCache, reachable: list) -> None:
        """Copy ``evicted`` grids (still in their slots) to host memory; forget grids no reachable head stores
        (checked when the store holds twice what the newest head does: O(1) per commit on average)."""
        newest = reachable[0].layout.stored
        if len(self._grids) > 2 * len(newest) + 64:
            live = {s.grid for state in reachable for s in state.layout.stored}
            for grid in [g for g in self._grids if g not in live]:
                del self._grids[grid]
        pin = cache.device.type == "cuda"
        for span in evicted:
            index = span.slots.to(cache.device)
            k = torch.stack([kb.index_select(2, index)[0] for kb, _ in cache.buffers])  # (L, H_kv, n, D)
            v = torch.stack([vb.index_select(2, index)[0] for _, vb in cache.buffers])
            summary = k.float().mean(2)  # (L, H_kv, D), stays on the device: questions score all of them
            # pinned host memory, copied without waiting for the device (later loads are ordered after it)
            k, v = (torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin) for t in (k, v))
            self._grids[span.grid] = (k, v, summary)
            self.token_bytes = 2 * k[:, :, :1].numel() * k.element_size()

    def scores(self, queries: dict[int, torch.Tensor], candidates: tuple[Span, ...]) -> list[float]:
        """queries: layer -> (1, H_q, n, D) the question's rotated queries; -> a relevance per candidate."""
        layers = sorted(queries)
        summaries = torch.stack([self._grids[s.grid][2] for s in candidates])  # (N, L, H_kv, D)
        hkv = summaries.shape[2]
        q = torch.stack([queries[i][0].float().mean(1) for i in layers])  # (L, H_q, D): mean over tokens
        q = q.view(len(layers), hkv, -1, q.shape[-1]).sum(2)  # (L, H_kv, D): the query heads of each K/V head
        return torch.einsum("lhd,nlhd->n", q, summaries).tolist()

    def load(self, cache: StreamKVCache, span: Span, slots: torch.Tensor) -> None:
        """Write a stored grid's K/V into (n,) device ``slots`` of every layer."""
        k, v, _ = self._grids[span.grid]
        for i, (kb, vb) in enumerate(cache.buffers):
            kb.index_copy_(2, slots, k[i][None].to(kb.device, non_blocking=True))
            vb.index_copy_(2, slots, v[i][None].to(vb.device, non_blocking=True))

    def nbytes(self, stored_tokens: int) -> int:
        """Host bytes of ``stored_tokens`` tokens of K/V (what a head's ``stored`` grids hold)."""
        return stored_tokens * self.token_bytes


def bring_back(stream, txn, question: str) -> None:
    """Score the stored grids with the question's own queries (read on a dropped fork of ``txn``), load
    the best ``recall_grids`` into free slots of ``txn``: visible to this question and its answer only."""
    queries: dict = {}
    probe = txn.fork()
    stream.ensure_turn(probe)
    stream.close_block(probe, stream.pieces.question_ids(stream.tokenizer, question), on_query=queries.__setitem__)
    stored, kv = txn.state.layout.stored, stream.kv
    scores = kv.recall.scores(queries, stored)
    best = sorted(sorted(range(len(stored)), key=lambda i: (-scores[i], -stored[i].seq))[:stream.config.recall_grids])
    slots = kv.allocate(txn, sum(stored[i].n for i in best))  # (n,) CPU
    device_slots = slots.to(kv.cache.device)
    spans, at = [], 0
    for i in best:
        span = stored[i]
        kv.recall.load(kv.cache, span, device_slots[at:at + span.n])
        spans.append(span.moved(slots[at:at + span.n], recalled=True))
        at += span.n
    txn.update(layout=txn.state.layout.recall(spans))
