"""The KV cache of one stream and its lifecycle: transactions, O(1) snapshots, clone, clear.

``StreamKVCache`` (``kv_cache.py``) holds the buffers and no length: a forward writes a segment
at an explicit start (``view``), so writes past the committed length are invisible until they
are committed.

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

With a memory ``Budget`` the head also holds a ``slot_layout.SlotLayout``: a forward writes into
slots free in every reachable head (``slot_view``), and ``settle(txn)``, a transaction's last
step before its commit, evicts the oldest video to fit the budget. The length then counts every
token of the transcript; the kept ones are ``layout.kept``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from .kv_cache import CacheView, StreamKVCache
from .recall import RecallStore
from .slot_layout import Budget, SlotLayout, free_slots


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class CacheState:
    """The smallest head: just the length (streams use their richer ``StreamState``)."""

    last_cache_position: int = 0
    layout: Optional[SlotLayout] = None


class Transaction:
    """A working copy of the head. Forwards write past the committed length; nothing shows until commit."""

    def __init__(self, base: Any, commits: bool = True):
        self.base = base  # the committed head this transaction started from
        self.state = base
        self.settled = None  # the working head ``KVCacheManager.settle`` last produced
        self.commits = commits  # False: dropped whatever happens (a question's isolated fork): no budget applies

    @property
    def length(self) -> int:
        return self.state.last_cache_position

    def wrote(self, n: int, slots: Optional[torch.Tensor] = None, units: tuple[int, ...] = (), seconds: float = 0.0,
              **changes) -> None:
        """A forward wrote n tokens at ``length``: advance the working length (and other state fields).

        Bounded streams: ``slots`` (n,) where they went; ``units``: the sizes of the evictable video units
        (frame pairs, ``seconds`` of video each) they are, if any.
        """
        if slots is not None:
            changes["layout"] = self.state.layout.add(self.length, slots, units, seconds)
        self.state = replace(self.state, last_cache_position=self.length + n, **changes)

    def update(self, **changes) -> None:
        assert "last_cache_position" not in changes, f"only wrote() moves the length: {changes}"
        self.state = replace(self.state, **changes)

    def fork(self) -> "Transaction":
        """A nested transaction starting at this one's working head (dropped = rolled back)."""
        return Transaction(self.state, commits=False)


class KVCacheManager:
    """A ``StreamKVCache`` plus the committed head, transactions and a stack of O(1) snapshots."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu",
                 initial_state: Any = None, grow_min: int = 1024, initial_capacity: int = 0,
                 budget: Optional[Budget] = None):
        self.cache = StreamKVCache(num_layers, num_kv_heads, head_dim, dtype, device, grow_min, initial_capacity)
        self.budget = budget
        self.recall = RecallStore(budget.host_tokens) if budget is not None and budget.recall_grids else None
        state = initial_state if initial_state is not None else CacheState()
        self.initial_state = replace(state, layout=SlotLayout()) if budget is not None else state
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

    def begin(self, commits: bool = True) -> Transaction:
        """A transaction from the committed head; ``commits=False``: it will be dropped (isolated questions)."""
        return Transaction(self._state, commits)

    def ensure(self, txn: Transaction, n: int) -> None:
        """Room for n more tokens after the working head (growth keeps what the transaction wrote)."""
        self.cache.ensure(txn.length + n, keep=txn.length)

    def view(self, txn: Transaction, n: int) -> CacheView:
        """Where a forward of n tokens writes: right after the working head."""
        assert self.budget is None, "a bounded stream writes through slot_view()"
        self.ensure(txn, n)
        return self.cache.view(txn.length)

    # -- bounded streams ---------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.budget is not None

    @property
    def slotted(self) -> bool:
        """Whether tokens sit in slots recorded by a ``SlotLayout`` (bounded streams, and every pooled stream)."""
        return self.budget is not None

    def _taken(self, txn: Transaction) -> torch.Tensor:
        """(capacity,) bool CPU: slots holding tokens of the working head, the committed one or a snapshot."""
        cap = self.cache.capacity
        heads = (txn.state, self._state, txn.base, *self._snapshots)
        layouts = list({id(st.layout): st.layout for st in heads}.values())  # usually fewer than the heads
        taken = layouts[0].visible(cap)
        for layout in layouts[1:]:
            taken = taken | layout.visible(cap)
        return taken

    def slot_view(self, txn: Transaction, n: int, trim: bool = False) -> tuple[CacheView, torch.Tensor]:
        """Where a bounded stream's forward of n tokens writes -> (view, (n,) int64 CPU slots; the
        view's ``index`` holds them on the device).

        Slots free in every reachable head, lowest first (the cache grows when too few are free).
        ``trim``: attention sees the slots below the highest one in use only (``CacheView.end``), so
        its sums do not depend on the cache's capacity (slots are the same at any capacity).
        """
        self.check_call(txn, n)
        slots = self.allocate(txn, n)
        end = max(txn.state.layout.top, int(slots.max()) + 1) if trim else None
        return CacheView(self.cache.buffers, txn.length, self.cache.slot_index(slots), end), slots

    def check_call(self, txn: Transaction, n: int) -> None:
        """A committing call may add at most the token budget (so a bounded cache never holds more than twice it);
        what a call never commits (an isolated question, its answer, choices) does not count."""
        if not txn.commits:
            return
        added = txn.length + n - self._state.last_cache_position
        if self.budget.tokens is not None and added > self.budget.tokens:
            raise ValueError(f"this call adds {added} tokens to the cache, more than StreamConfig.cache_budget_tokens="
                             f"{self.budget.tokens}: append fewer frames per call (or raise the budget)")

    def allocate(self, txn: Transaction, n: int) -> torch.Tensor:
        """(n,) int64 CPU slots free in every reachable head, lowest first (grows the cache if needed).
        On the host, so that recording them never waits for the device."""
        slots = free_slots(self._taken(txn), n)
        if slots is None:
            cap = self.cache.capacity
            self.cache.ensure(cap + n, keep=cap)  # scattered slots: keep the whole buffers
            slots = free_slots(self._taken(txn), n)
        return slots

    def bring_back(self, txn: Transaction, spans: list) -> None:
        """Load stored (evicted) grids ``spans`` from the recall store into free slots of ``txn``: visible to the
        rest of this transaction only (the next ``settle`` drops them again)."""
        slots = self.allocate(txn, sum(s.n for s in spans))  # (n,) CPU
        self.recall.load(self.cache, spans, self.cache.slot_index(slots))
        parts = slots.split([s.n for s in spans])
        txn.update(layout=txn.state.layout.recall([s.moved(part, recalled=True) for s, part in zip(spans, parts)]))

    def settle(self, txn: Transaction) -> None:
        """A transaction's last step before its commit: evict what the budget requires (bounded streams).

        Raises ValueError (nothing evicted, nothing committed) when the budget cannot be met.
        """
        if self.budget is not None and txn.settled is not txn.state:  # once per head: appends settle early
            reachable = [txn.state, self._state, *self._snapshots]
            keep = (lambda spans: self.recall.keep(spans, self.cache, reachable)) if self.recall is not None else None
            txn.update(layout=txn.state.layout.evict(self.budget, keep))
            txn.settled = txn.state

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` cached tokens in all (a bounded stream keeps its whole buffers when growing)."""
        self.cache.reserve(tokens, keep=self.cache.capacity if self.slotted else self.get_seq_length())

    def kept(self, state: Any = None) -> int:
        """Tokens in the cache of ``state`` (default: the head): its length, or its kept tokens when bounded."""
        state = state if state is not None else self._state
        return state.layout.kept if self.slotted else state.last_cache_position

    def commit(self, txn: Transaction, result: Any = None, then: Callable[[], None] = _nothing) -> Any:
        """Publish the transaction's head in one assignment, call ``then`` (e.g. a C lock release), return ``result``.

        Callers make ``return kv.commit(txn, result)`` their last step, so no library line runs
        between publishing and returning: a call that raised has not committed.
        """
        if txn.base is not self._state:
            raise RuntimeError("commit() of a transaction that did not start from the current head "
                               "(another commit, restore or clear came in between)")
        assert self.budget is None or self.budget.tokens is None or txn.state.layout.kept <= self.budget.tokens, (
            f"commit of {txn.state.layout.kept} kept tokens over the budget {self.budget}: settle(txn) first")
        self._state = txn.state; then(); return result  # noqa: E702  (one line: no line event after publishing)

    def rollback(self, length: int) -> None:
        """Truncate the cache to its first ``length`` tokens (the rest of the head unchanged)."""
        if self.slotted:
            raise ValueError("rollback(length) truncates a contiguous cache; a bounded or pooled stream "
                             "keeps scattered slots: use snapshot()/restore() instead")
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
                               initial_capacity=self.cache.initial_capacity, budget=self.budget)
        other.cache = self.cache.clone(self.cache.capacity if self.bounded else self.get_seq_length())
        other._state = self._state
        if self.recall is not None:
            other.recall = self.recall.clone()
        return other

    def clear(self, keep_buffers: bool = False) -> None:
        """The head goes back to the empty state and every snapshot is dropped; the cache buffers and the
        recall slab are freed, or with ``keep_buffers`` kept for the next stream (what they hold is stale:
        an empty head reads none of it, and every slot and slab row is free)."""
        # each step leaves a valid manager: empty head over old buffers, then no snapshots, then new buffers
        self._state = self.initial_state
        self._snapshots = []
        if keep_buffers:
            if self.recall is not None:
                self.recall.forget()
            return
        self.recall = RecallStore(self.budget.host_tokens) if self.recall is not None else None
        self.cache = StreamKVCache(*self.cache.shape, dtype=self.cache.dtype, device=self.cache.device,
                                   grow_min=self.cache.grow_min, initial_capacity=self.cache.initial_capacity)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, kept, D) layer i's live keys and values (views; copies in transcript order when bounded)."""
        if not self.slotted:
            return self.cache.layer(i, self.get_seq_length())
        k, v = self.cache.buffers[i]
        index = self.cache.slot_index(self._state.layout.slot_list)
        return k.index_select(2, index), v.index_select(2, index)

    def nbytes(self) -> int:
        return self.cache.nbytes(self.kept())

    def reserved_bytes(self) -> int:
        return self.cache.reserved_bytes()

    def build_full_attention_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """(B, n) mask of new tokens -> (B, length + n): ones for every cached token, then ``new_mask``."""
        if new_mask.ndim != 2:
            raise ValueError(f"new_mask must be (batch, new_tokens), got shape {tuple(new_mask.shape)}")
        past = torch.ones(new_mask.shape[0], self.get_seq_length(), dtype=new_mask.dtype, device=new_mask.device)
        return torch.cat([past, new_mask], dim=1)
