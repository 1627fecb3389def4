"""One K/V pool per model and device, shared by many streams: pages of slots, each owned by one stream at a time.

``KVPool`` holds per layer K and V of shape (1, H_kv, tokens, D), allocated once when it is
built (that is the pool's memory: no K/V is allocated afterwards), cut into pages of
``PoolConfig.page`` slots. A pooled stream (``VideoStreamInference(model, processor, pool=pool)``)
keeps its tokens in slots of pages it owns, through its own page table:

- ``PooledCache`` is the stream's local slot space: local slot s sits in pool slot
  ``table[s // page] * page + s % page``. The stream's ``SlotLayout`` records local slots exactly
  as a bounded stream's does, so transactions, O(1) snapshots and rollback, eviction and recall
  work unchanged, per stream.
- ``PooledKVCacheManager`` is a ``KVCacheManager`` over a ``PooledCache``. A forward writes into
  slots free in every reachable head (the committed one, every snapshot, the working
  transaction): lowest first among the pages the stream owns, then in new pages taken from the
  pool. A page goes back to the pool when no reachable head uses any of its slots: checked when
  the stream's next call begins (after an eviction or a dropped question), on ``reset``/``close``
  and when the engine is dropped. A full pool is a ``ValueError`` (nothing committed), never an
  out-of-memory error.
- Every forward of a pooled stream runs on the pool's ``Scheduler`` (``scheduler.py``), batched
  with other streams' forwards.
"""
from __future__ import annotations

import itertools
import math
import mmap
import threading
import weakref
from dataclasses import replace
from typing import Any, Optional

import torch

from .config import PoolConfig
from .kv_cache_manager import KVCacheManager, Transaction
from .recall import RecallStore
from .slot_layout import Budget, SlotLayout


class KVPool:
    """The K/V buffers of many streams over one ``StreamQwenModel``, in pages, and the scheduler of their forwards."""

    def __init__(self, model, config: Optional[PoolConfig] = None):
        from .stream_qwen_model import StreamQwenModel

        if not isinstance(model, StreamQwenModel):
            raise TypeError(f"model must be a StreamQwenModel, got {type(model).__name__}")
        if config is not None and not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a PoolConfig, got {type(config).__name__}")
        if not model.stream_kernels:
            raise ValueError("a KVPool needs the model built on attn_implementation='sdpa' (pooled streams attend "
                             "through the stream attention dispatcher)")
        self.config = config or PoolConfig()
        self.model = model
        self.shape = model.kv_shape()  # (layers, K/V heads, head dim)
        self.dtype, self.device = model.dtype, model.device
        self.page = self.config.page
        layers, heads, dim = self.shape
        capacity = self.config.pages * self.page
        # past the pages: scratch slots, where the padding rows of captured batches write (``batch_graphs``)
        scratch = self.config.scratch_tokens
        shape = (1, heads, capacity + scratch, dim)
        self.buffers = tuple((_zeroed(shape, self.dtype, self.device), _zeroed(shape, self.dtype, self.device))
                             for _ in range(layers))  # ((K, V), ...) per layer: allocated here, never again
        self.scratch = torch.arange(capacity, capacity + scratch, device=self.device)  # (scratch,) slot indices
        self.allocations = 1
        # the owner of each page (-1: free): the one record of who owns what. A stream's page table may lag
        # behind it (an interrupt between taking pages and mapping them): ``reconcile`` repairs that
        self._owner = torch.full((self.config.pages,), -1, dtype=torch.long)
        self._owners = itertools.count()
        self._lock = threading.Lock()
        from .scheduler import Scheduler

        self.scheduler = Scheduler(model, self.buffers, self.config, self.scratch)

    @classmethod
    def for_model(cls, model, tokens: int = 65_536, **settings) -> "KVPool":
        """A pool of ``tokens`` K/V slots for ``model`` (on its device and dtype); ``settings``: other ``PoolConfig`` fields."""
        return cls(model, PoolConfig(tokens=tokens, **settings))

    @property
    def capacity(self) -> int:
        """Slots in the pool."""
        return self.config.pages * self.page

    @property
    def free_pages(self) -> int:
        return int((self._owner < 0).sum())

    def new_owner(self) -> int:
        return next(self._owners)

    def take(self, k: int, owner: int) -> list[int]:
        """``k`` free pages (lowest first), now owned by ``owner``; ValueError when fewer are free."""
        with self._lock:
            free = torch.nonzero(self._owner < 0)[:k, 0]
            if free.numel() < k:
                raise ValueError(
                    f"the KV pool is full: {k} more page(s) of {self.page} slots needed, {free.numel()} of "
                    f"{self.config.pages} free (PoolConfig.tokens={self.config.tokens}): build a larger pool, bound the "
                    "streams (StreamConfig.cache_budget_tokens) or reset/close streams you no longer need")
            self._owner[free] = owner  # one step: taken and recorded together
            return free.tolist()

    def give(self, pages: list[int], owner: int) -> None:
        """``owner``'s ``pages`` back to the pool (pages it does not own are left alone)."""
        if pages:
            with self._lock:
                index = torch.tensor(pages, dtype=torch.long)
                self._owner[index[self._owner[index] == owner]] = -1

    def release(self, owner: int, keep: Optional[list[int]] = None) -> None:
        """Every page of ``owner`` back to the pool, except ``keep``."""
        with self._lock:
            mine = self._owner == owner
            if keep:
                mine[torch.tensor(keep, dtype=torch.long)] = False
            self._owner[mine] = -1

    def owned_by(self, owner: int) -> int:
        return int((self._owner == owner).sum())

    def nbytes_per_token(self) -> int:
        layers, heads, dim = self.shape
        return 2 * layers * heads * dim * self.buffers[0][0].element_size()

    def reserved_bytes(self) -> int:
        """The pool's K/V memory (its pages and the scratch slots)."""
        return self.buffers[0][0].shape[2] * self.nbytes_per_token() if self.buffers[0][0].numel() else 0

    def stats(self) -> dict:
        """The pool's size and use, and its scheduler's batching."""
        return {"pool_tokens": self.capacity, "pool_page": self.page, "pool_pages": self.config.pages,
                "pool_free_pages": self.free_pages, "pool_bytes": self.reserved_bytes(),
                "pool_allocations": self.allocations, **self.scheduler.stats()}

    def warm_graphs(self, streams: int, tokens: int) -> int:
        """Capture the CUDA graphs of batched decode steps of up to ``streams`` streams and of a few questions, for
        streams of up to ``tokens`` slots, now rather than when each is first met (no-op on the CPU) -> how many."""
        if self.device.type != "cuda":
            return 0
        with self.scheduler.paused():
            return self.scheduler.graphs.prepare(self.scheduler.graphs.keys(streams, tokens))

    def close(self) -> None:
        """Stop the scheduler's threads and free the pool's K/V memory now (calls on the pool's streams raise
        afterwards). Without ``close`` the memory goes with the last reference to the pool."""
        self.scheduler.stop()  # (its captured batches go with it)
        # empty buffers of the same dtype in their place: whatever still holds the pool (an app object in a reference
        # cycle, a closed engine) no longer holds its memory, and any use of it fails loudly
        self.buffers = tuple((k.new_empty(0), v.new_empty(0)) for k, v in self.buffers)
        self.scheduler.buffers = self.buffers


def _zeroed(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed K/V memory (masked slots are multiplied by zero weights: they must never hold NaN). On a GPU allocated
    now; on the CPU an anonymous mapping, zero pages that the OS commits when first written, so a host pool costs
    the memory its streams have written, not its size (a CPU server's default pool)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, max(1, count * dtype.itemsize)), dtype=dtype, count=count).view(shape)


class PooledCache:
    """A stream's local slot space over pages of a ``KVPool`` (the subset of ``StreamKVCache`` the stream uses).

    ``table[i]`` is the pool page holding local page i, or -1 (unmapped: no reachable head uses it).
    Every change is ordered so that an interrupt between two lines loses nothing: pages are taken
    (and recorded as this stream's by the pool) before they are mapped, and unmapped before they
    are given back; pages the pool records as this stream's but the table lacks go back at the next
    ``reconcile`` (when a call begins).
    """

    def __init__(self, pool: KVPool):
        self.pool, self.page = pool, pool.page
        self.shape, self.dtype, self.device = pool.shape, pool.dtype, pool.device
        self.grow_min, self.initial_capacity = pool.page, 0
        self.allocations = 0  # the pool allocated the memory; a pooled stream never does
        self.key = pool.new_owner()
        self.table: list[int] = []
        self._device_table: tuple = ((), None)  # (the table it was made from, its tensor on the device)
        weakref.finalize(self, pool.release, self.key)  # a dropped engine's pages go back (no cycle holds it)

    @property
    def buffers(self):
        return self.pool.buffers

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def capacity(self) -> int:
        """Local slots (mapped or not)."""
        return len(self.table) * self.page

    @property
    def owned(self) -> int:
        """Pages of the pool this stream owns."""
        return self.pool.owned_by(self.key)

    def table_tensor(self, device=None) -> torch.Tensor:
        """(local pages,) int64: the pool page of each local page, -1 unmapped (on ``device``: cached per table)."""
        table = torch.tensor(self.table, dtype=torch.long)
        if device is None or torch.device(device).type == "cpu":
            return table
        key = (str(device), tuple(self.table))
        if self._device_table[0] != key:
            self._device_table = (key, table.to(device))
        return self._device_table[1]

    def slot_index(self, slots: torch.Tensor) -> torch.Tensor:
        """(n,) int64 CPU local slots -> (n,) their pool slots, on the device."""
        pages = self.table_tensor()[slots // self.page]
        assert bool((pages >= 0).all()), f"local slots {slots[pages < 0].tolist()} are in pages the stream does not own"
        return (pages * self.page + slots % self.page).to(self.device)

    def gather_index(self, length: int, device) -> torch.Tensor:
        """(length,) int64 on ``device``: the pool slot of local slots [0, length) (unmapped pages: slot 0, never
        attended: nothing is kept or written there)."""
        table = self.table_tensor(device).clamp(min=0)
        offsets = torch.arange(self.page, device=table.device)
        return (table[:, None] * self.page + offsets).flatten()[:length]

    def ensure(self, n_tokens: int, keep: int = 0) -> None:
        """Local room for ``n_tokens`` (unmapped pages: nothing is taken from the pool until a slot is used)."""
        missing = -(-n_tokens // self.page) - len(self.table)
        if missing > 0:
            self.table.extend([-1] * missing)

    reserve = ensure

    def pick(self, taken: torch.Tensor, n: int) -> torch.Tensor:
        """(capacity,) bool slots in use -> (n,) int64 CPU free local slots: in owned pages first (lowest first),
        then in new pages taken from the pool (ValueError if it is full; then nothing is taken)."""
        page = self.page
        mapped = (self.table_tensor() >= 0).repeat_interleave(page)
        free = ~taken
        first = torch.nonzero(free & mapped)[:, 0]
        if first.numel() >= n:
            return first[:n].clone()
        need = n - first.numel()
        rest = torch.nonzero(free & ~mapped)[:, 0]
        if rest.numel() < need:
            cap = self.capacity
            self.ensure(cap + need - rest.numel())
            rest = torch.cat([rest, torch.arange(cap, self.capacity)])
        chosen = rest[:need]
        local = sorted(set((chosen // page).tolist()))
        for i, p in zip(local, self.pool.take(len(local), self.key)):
            self.table[i] = p
        return torch.cat([first, chosen])

    def release_unused(self, taken: torch.Tensor) -> None:
        """Give back every owned page none of whose slots is ``taken`` ((capacity,) bool), and any page the pool
        records as this stream's that the table lacks; drop trailing unmapped local pages."""
        used = taken.view(-1, self.page).any(1).tolist() if self.table else []
        for i, p in enumerate(self.table):
            if p >= 0 and not used[i]:
                self.table[i] = -1  # unmapped first: a page the pool has is never still mapped here
        while self.table and self.table[-1] < 0:
            self.table.pop()
        self.pool.release(self.key, keep=[p for p in self.table if p >= 0])

    def release_all(self) -> None:
        """Every page back to the pool; the local space empties."""
        self.table.clear()
        self.pool.release(self.key)

    def nbytes(self, length: int) -> int:
        """Bytes of ``length`` tokens' K/V."""
        return length * self.pool.nbytes_per_token()

    def reserved_bytes(self) -> int:
        """Bytes of the pages this stream owns."""
        return self.owned * self.page * self.pool.nbytes_per_token()


class PooledKVCacheManager(KVCacheManager):
    """A stream's ``KVCacheManager`` over pages of a ``KVPool``: always slot-based (a ``SlotLayout`` in its head),
    bounded or not."""

    def __init__(self, pool: KVPool, initial_state: Any = None, budget: Optional[Budget] = None):
        layers, heads, dim = pool.shape
        super().__init__(layers, heads, dim, dtype=pool.dtype, device=pool.device, initial_state=initial_state,
                         budget=budget)
        self.pool = pool
        self.cache = PooledCache(pool)
        if self.initial_state.layout is None:
            self.initial_state = replace(self.initial_state, layout=SlotLayout())
        self._state = self.initial_state
        self.last_request = None  # the last request this stream handed the scheduler (``fence``)

    @property
    def slotted(self) -> bool:
        return True

    def fence(self) -> None:
        """Wait until the stream's last request to the scheduler is finished (one a caller stopped waiting for, after
        an interrupt, may still be running: its slots must not be reused, nor its pages given away, before it ends)."""
        request = self.last_request
        if request is not None:
            self.pool.scheduler.settle(request)

    def _reachable(self) -> torch.Tensor:
        """(capacity,) bool: slots the committed head or a snapshot holds (between calls: every reachable head)."""
        cap = self.cache.capacity
        heads = (self._state, *self._snapshots)
        taken = torch.zeros(cap, dtype=torch.bool)
        for layout in {id(st.layout): st.layout for st in heads}.values():
            taken |= layout.visible(cap)
        return taken

    def begin(self, commits: bool = True) -> Transaction:
        """A transaction from the committed head; first, pages no reachable head uses go back to the pool."""
        self.fence()
        self.cache.release_unused(self._reachable())
        return super().begin(commits)

    def allocate(self, txn: Transaction, n: int) -> torch.Tensor:
        """(n,) int64 CPU local slots free in every reachable head (new pages from the pool as needed)."""
        return self.cache.pick(self._taken(txn), n)

    def reserve(self, tokens: int) -> None:
        """Nothing to allocate (the pool holds the memory); refuses more than the whole pool."""
        if tokens > self.pool.capacity:
            raise ValueError(f"reserve({tokens}) is more than the whole KV pool ({self.pool.capacity} tokens): build a "
                             "larger pool (PoolConfig.tokens)")

    def clear(self, keep_buffers: bool = False) -> None:
        """The head goes back to the empty state, snapshots are dropped, and every page goes back to the pool
        (``keep_buffers`` keeps the recall slab; the pool's memory is never freed by a stream)."""
        self.fence()
        self._state = self.initial_state
        self._snapshots = []
        if self.recall is not None:
            if keep_buffers:
                self.recall.forget()
            else:
                self.recall = RecallStore(self.budget.host_tokens)
        self.cache.release_all()

    def clone(self) -> "PooledKVCacheManager":
        """An independent copy in the same pool: new pages holding the same K/V (no snapshots)."""
        self.fence()
        other = PooledKVCacheManager(self.pool, initial_state=self.initial_state, budget=self.budget)
        mapped = [i for i, p in enumerate(self.cache.table) if p >= 0]
        other.cache.ensure(self.cache.capacity)
        for i, p in zip(mapped, self.pool.take(len(mapped), other.cache.key)):
            other.cache.table[i] = p
        if mapped:
            local = (torch.tensor(mapped)[:, None] * self.cache.page + torch.arange(self.cache.page)).flatten()
            src, dst = self.cache.slot_index(local), other.cache.slot_index(local)
            for k, v in self.pool.buffers:
                k.index_copy_(2, dst, k.index_select(2, src))
                v.index_copy_(2, dst, v.index_select(2, src))
        other._state = self._state
        if self.recall is not None:
            other.recall = self.recall.clone()
        return other

    def reserved_bytes(self) -> int:
        return self.cache.reserved_bytes()
