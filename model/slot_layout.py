"""Bounded memory: where a budgeted stream's tokens sit in the cache, and which video it evicts.

A stream with a memory budget (``StreamConfig.cache_budget_tokens`` / ``video_window_seconds``)
stores its tokens in cache *slots* that need not be contiguous. Keys are stored already rotated
at their original M-RoPE positions and attention over cached keys does not depend on their
order, so evicting old video is only a change of which slots are visible: nothing is copied,
re-rotated or re-numbered. ``SlotLayout`` is that bookkeeping, one immutable record inside the
stream's committed head (``StreamState.layout``):

- ``spans``: the kept tokens in transcript order, one ``Span`` per written segment, split per
  temporal grid for video (a grid is two frames: never half a pair);
- a new segment goes to slots free in every head still reachable (the committed one, every
  snapshot, the working transaction), so a dropped transaction or a restored snapshot finds its
  tokens untouched: rollback stays O(1) and copies nothing;
- ``evict(budget)`` runs once per transaction, right before its commit: the oldest video grids
  outside the sink (the first ``sink_frames`` frames) go, until the kept tokens fit
  ``tokens`` and the kept video outside the sink fits ``window_seconds``. Text (system prompt,
  questions and answers kept with ``update_state=True``) and images are never evicted.

The exact reference (``offline.bounded_visibility``): every token attends to what was kept when
its call began plus its own call's earlier tokens, at original positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional

import torch


@dataclass(frozen=True)
class Budget:
    """What a bounded stream may keep (from ``StreamConfig``); None: no limit of that kind."""

    tokens: Optional[int] = None  # kept tokens, text included
    window_seconds: Optional[float] = None  # kept video outside the sink, in seconds
    sink_grids: int = 1  # the stream's first video grids (2 frames each), never evicted
    recall_grids: int = 0  # evicted grids a question may bring back (0: evicted video is dropped)
    host_tokens: int = 0  # evicted tokens kept in host memory for recall (the oldest dropped beyond)


@dataclass(frozen=True, eq=False)
class Span:
    """Tokens of one segment (or one video grid) that sit in the cache, in transcript order."""

    seq: int  # transcript index of its first token
    slots: torch.Tensor  # (n,) int64 CPU: the slot of each token
    grid: int = -1  # the stream's video grid number (0, 1, ...); -1: text or image, never evicted
    seconds: float = 0.0  # video it covers
    start_s: float = 0.0  # where that video starts in the stream (sum of the grids before it)
    recalled: bool = False  # brought back from host memory for one question (never committed)
    row: int = -1  # a stored grid's first row in the recall store's host slab

    @property
    def n(self) -> int:
        return self.slots.numel()

    def __eq__(self, other) -> bool:
        return (isinstance(other, Span)
                and (self.seq, self.grid, self.seconds, self.start_s, self.recalled, self.row)
                == (other.seq, other.grid, other.seconds, other.start_s, other.recalled, other.row)
                and torch.equal(self.slots, other.slots))

    def moved(self, slots: torch.Tensor, recalled: bool, row: int = -1) -> "Span":
        return Span(self.seq, slots, self.grid, self.seconds, self.start_s, recalled, row)


@dataclass(frozen=True)
class SlotLayout:
    """Which slots hold which kept tokens; counters of what was evicted. Immutable."""

    spans: tuple[Span, ...] = ()
    grids: int = 0  # video grids written so far
    evicted_grids: int = 0
    evicted_tokens: int = 0
    evicted_seconds: float = 0.0
    stored: tuple[Span, ...] = ()  # evicted grids whose K/V wait in the recall slab (``row``; slots: where they were)
    grid_seconds: float = 0.0  # video seconds of all grids written so far
    stored_tokens: int = 0  # tokens of ``stored`` (counted, not summed: streams store thousands of grids)
    stored_seconds: float = 0.0
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # derived tensors, per layout

    @cached_property
    def kept(self) -> int:
        return sum(s.n for s in self.spans)

    @property
    def kept_seconds(self) -> float:
        return sum(s.seconds for s in self.spans if not s.recalled)

    def _with(self, **changes) -> "SlotLayout":
        return replace(self, **changes)  # a new record: its derived tensors start empty

    def kept_ranges(self) -> list[tuple[int, int]]:
        """[(transcript index, tokens)] of every kept span, in order."""
        return [(s.seq, s.n) for s in self.spans]

    @cached_property
    def top(self) -> int:
        """One past the highest kept slot (0 when nothing is kept)."""
        return int(self.slot_list.max()) + 1 if self.spans else 0

    @cached_property
    def slot_list(self) -> torch.Tensor:
        """(kept,) int64 CPU: every kept slot."""
        return torch.cat([s.slots for s in self.spans]) if self.spans else torch.zeros(0, dtype=torch.long)

    def visible(self, capacity: int, device=None) -> torch.Tensor:
        """(capacity,) bool: the slots holding kept tokens (cached per capacity and device)."""
        key = (capacity, str(torch.device(device or "cpu")))
        if key not in self._cache:
            v = torch.zeros(capacity, dtype=torch.bool)
            v[self.slot_list] = True
            self._cache[key] = v.to(key[1])
        return self._cache[key]

    def add(self, seq: int, slots: torch.Tensor, units: tuple[int, ...] = (), seconds_per_unit: float = 0.0
            ) -> "SlotLayout":
        """The layout with ``slots`` (n,) holding transcript tokens [seq, seq+n).

        ``units``: the segment is these video units (frame pairs, with their markers where the family has
        them) of these sizes, evictable unless in the sink; () for text and images, never evicted.
        """
        slots = slots.to("cpu", torch.long)
        if not units:
            new = (Span(seq, slots),)
        else:
            assert sum(units) == slots.numel(), f"units {units} do not cover the segment's {slots.numel()} tokens"
            edges = [0]
            for size in units:
                edges.append(edges[-1] + size)
            new = tuple(Span(seq + a, slots[a:b], self.grids + k, seconds_per_unit,
                             self.grid_seconds + k * seconds_per_unit) for k, (a, b) in enumerate(zip(edges, edges[1:])))
        grids = len(units)
        out = self._with(spans=self.spans + new, grids=self.grids + grids,
                         grid_seconds=self.grid_seconds + grids * seconds_per_unit)
        top = int(slots.max())
        for (capacity, device), v in self._cache.items():  # decode steps: O(capacity) copy, no Python loop
            if top < capacity:
                v = v.clone()
                v[slots.to(v.device)] = True
                out._cache[(capacity, device)] = v
        return out

    def recall(self, spans: list[Span]) -> "SlotLayout":
        """The layout with stored grids back in the cache (``spans`` with their new slots), for one question."""
        merged = sorted(self.spans + tuple(spans), key=lambda s: s.seq)
        return self._with(spans=tuple(merged))

    def evict(self, budget: Budget, keep=None) -> "SlotLayout":
        """The layout after eviction: recalled grids leave first (they were there for one question), then
        the oldest video grids outside the sink go until ``budget`` holds; with recall on, ``keep``
        (evicted spans -> the same spans at their host rows) stores them and they join ``stored``
        (the oldest dropped beyond ``budget.host_tokens``).

        Raises ValueError when even evicting all of them cannot meet the token budget.
        """
        spans = [s for s in self.spans if not s.recalled]
        evictable = [i for i, s in enumerate(spans) if s.grid >= budget.sink_grids]
        kept, window = sum(s.n for s in spans), sum(spans[i].seconds for i in evictable)
        drop = 0
        while drop < len(evictable) and (
                (budget.tokens is not None and kept > budget.tokens)
                or (budget.window_seconds is not None and window > budget.window_seconds + 1e-9)):
            span = spans[evictable[drop]]
            kept, window, drop = kept - span.n, window - span.seconds, drop + 1
        if budget.tokens is not None and kept > budget.tokens:
            raise ValueError(
                f"the stream needs {kept} cached tokens after evicting all the video it may evict, more than "
                f"StreamConfig.cache_budget_tokens={budget.tokens} (text, images and the {budget.sink_grids}-grid "
                "sink are kept, and one call's tokens must fit): append fewer frames per call, raise the budget "
                "or lower sink_frames")
        if drop == 0 and len(spans) == len(self.spans):
            return self
        gone = {evictable[i] for i in range(drop)}
        out = [spans[i] for i in sorted(gone)]
        stored, tokens, seconds = self.stored, self.stored_tokens, self.stored_seconds
        if budget.recall_grids and out:
            stored = stored + tuple(keep(out) if keep is not None else out)
            tokens, seconds = tokens + sum(s.n for s in out), seconds + sum(s.seconds for s in out)
            first = 0
            while tokens > budget.host_tokens:  # the oldest go first
                tokens, seconds, first = tokens - stored[first].n, seconds - stored[first].seconds, first + 1
            stored = stored[first:]
        layout = self._with(spans=tuple(s for i, s in enumerate(spans) if i not in gone),
                            evicted_grids=self.evicted_grids + drop,
                            evicted_tokens=self.evicted_tokens + sum(s.n for s in out),
                            evicted_seconds=self.evicted_seconds + sum(s.seconds for s in out), stored=stored,
                            stored_tokens=tokens, stored_seconds=seconds if stored else 0.0)
        return layout


def check_budget(budget: Optional[Budget], sink_frames: int, grid_tokens: int, header_tokens: int) -> None:
    """Refuse a token budget that cannot hold the first turn's header, the sink and one more grid
    even at the smallest frames (``grid_tokens``: one 2-frame grid at the processor's minimum size;
    larger frames are checked when they come, at commit)."""
    if budget is None or budget.tokens is None:
        return
    sink = header_tokens + budget.sink_grids * grid_tokens
    if sink > budget.tokens:
        raise ValueError(f"StreamConfig.sink_frames={sink_frames} keeps at least {sink} tokens (the first turn's "
                         f"header and {budget.sink_grids} grid(s) of >= {grid_tokens} tokens), more than "
                         f"cache_budget_tokens={budget.tokens}: lower sink_frames or raise the budget")
    if sink + grid_tokens > budget.tokens:
        raise ValueError(f"StreamConfig.cache_budget_tokens={budget.tokens} cannot hold one chunk after the sink "
                         f"({sink} tokens) and one grid of >= {grid_tokens} tokens: raise it to at least "
                         f"{sink + grid_tokens}")


def budget_stats(layout: Optional["SlotLayout"], config, transcript_tokens: int, video_seconds: float,
                 host_bytes: int) -> dict:
    """What ``stats()`` reports about a memory budget (the keys of ``config.BUDGET_STATS`` and
    ``bounded``); an unbounded stream (``layout`` None) keeps all its video and evicts nothing."""
    bounded = layout is not None
    return {
        "bounded": bounded, "cache_budget_tokens": config.cache_budget_tokens,
        "video_window_seconds": config.video_window_seconds, "sink_frames": config.sink_frames if bounded else None,
        "transcript_tokens": transcript_tokens,
        "kept_video_seconds": layout.kept_seconds if bounded else video_seconds,
        "evicted_seconds": layout.evicted_seconds if bounded else 0.0,
        "evicted_grids": layout.evicted_grids if bounded else 0,
        "evicted_tokens": layout.evicted_tokens if bounded else 0,
        "recall_grids": config.recall_grids if bounded else 0,
        "stored_seconds": layout.stored_seconds if bounded else 0.0, "recall_host_bytes": host_bytes,
    }


def free_slots(taken: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """(capacity,) bool of slots in use -> (n,) int64 of the first n free slots, or None if fewer are free."""
    free = torch.nonzero(~taken)[:, 0]
    return free[:n].clone() if free.numel() >= n else None  # a copy: spans keep these, not the whole free list
