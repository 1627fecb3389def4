"""The scheduler of a KV pool: every forward of the pool's streams, run in as few batched forwards as it can.

Engine calls stay as they are: each runs in its caller's thread, under its own stream's lock, as
its own transaction (``transaction.py``). In a pooled stream, ``SegmentWriter`` hands each
language-model segment and each vision grid to the pool's ``Scheduler`` and waits for its own
result; the scheduler's threads collect what many streams have pending and run it batched
(``batch_forward.py``):

- **gathering**: after a request arrives it waits for more, until none has come for
  ``PoolConfig.batch_window_ms``, at most ``max_wait_ms`` after the first, and not at all once
  every stream of the last batch has submitted again (a decode loop of B streams runs at the
  pace of the B-th) or a batch is full;
- **lanes**: language-model work and vision grids each have their own thread (and on a GPU the
  vision lane its own CUDA stream), so the two kinds of batch run beside each other and a question
  never waits behind a vision batch;
- **order**: questions, decode steps, choices and recall probes go before video chunks; a batch
  holds at most ``max_batch_tokens`` rows and ``max_batch_segments`` segments (one request always
  goes), so a question waits behind at most one language-model batch of chunks; vision grids batch
  among themselves (``max_vision_patches``);
- **graphs**: a batch of token segments (questions, decode steps) is replayed from a CUDA graph
  of its bucket (``batch_graphs.py``), captured when first met; other batches run eagerly;
- **failures**: if a batched forward raises, each of its requests is run again alone, so a
  request that fails (a bad input of one stream) fails only its own stream's call, whose
  transaction is then dropped; the others complete. Retrying is safe because a request only
  writes K/V into slots its own, uncommitted transaction allocated.

A caller that stops waiting (an interrupt) cancels its request if it has not started; a started
one finishes, and the stream's next call waits for it (``PooledKVCacheManager.fence``).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Optional

import torch

from .batch_forward import LMWork, VisionWork, run_lm, run_vision
from .batch_graphs import BatchGraphs
from .config import PoolConfig


LM, VISION = "lm", "vision"  # the scheduler's lanes: one thread each


def _lane(request) -> str:
    return VISION if isinstance(request.work, VisionWork) else LM


class Request:
    """One work of one stream, waiting for the scheduler (``finished`` is set when it is done or cancelled)."""

    __slots__ = ("work", "owner", "urgent", "group", "n", "t", "finished", "result", "error", "state", "stream")

    def __init__(self, work, owner: int, stream=None):
        self.work, self.owner = work, owner
        self.stream = stream  # the caller's CUDA stream (vision work on a GPU: the lane's stream waits for it)
        self.urgent, self.group, self.n = work.urgent, work.group, work.n
        self.t = time.perf_counter()
        self.finished = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.state = "queued"  # -> "running" -> "done", or "cancelled"


class Scheduler:
    """The batching threads of one ``KVPool`` (a language-model lane and a vision lane, started by the first request)."""

    def __init__(self, model, buffers, config: PoolConfig, scratch: torch.Tensor):
        self.model, self.buffers, self.config = model, buffers, config
        # batches of token segments replayed from CUDA graphs (on the CPU: the eager stand-in, for the tests)
        self.graphs = BatchGraphs(model, buffers, config.page, scratch, config, capture=model.device.type == "cuda")
        self._cond = threading.Condition()
        self._queue: list[Request] = []  # in arrival order
        self._threads: dict[str, threading.Thread] = {}  # one per lane: "lm", "vision"
        self._paused = 0
        self._stopped: Optional[str] = None
        self._expect: dict[str, set[int]] = {LM: set(), VISION: set()}  # per lane, owners of its last batch: when all
        # have submitted again, go at once
        self._last_arrival = {LM: 0.0, VISION: 0.0}
        self._layouts: dict = {}  # the vision tower's precomputed layout per tuple of grids (``run_vision``)
        self._counts = {"lm_batches": 0, "lm_segments": 0, "lm_rows": 0, "max_lm_segments": 0, "vision_batches": 0,
                        "vision_grids": 0, "max_vision_grids": 0, "failed_batches": 0, "lm_host_s": 0.0,
                        "vision_host_s": 0.0, "idle_s": 0.0, "vision_idle_s": 0.0}  # host seconds: issuing batches,
        # waiting for work (each lane's thread)

    # -- the callers' side ---------------------------------------------------------------
    def submit(self, work, owner) -> Any:
        """Run ``work`` (an ``LMWork`` or ``VisionWork``) of stream ``owner`` (its ``PooledKVCacheManager``) in a
        batch and return its result (or raise its error). Blocks the calling thread until then."""
        cuda = isinstance(work, VisionWork) and work.patches.is_cuda
        request = Request(work, id(owner), torch.cuda.current_stream(work.patches.device) if cuda else None)
        with self._cond:
            if self._stopped is not None:
                raise RuntimeError(f"the KV pool's scheduler is stopped ({self._stopped}): make a new KVPool")
            owner.last_request = request  # the stream's next call waits for it, whatever happens to this one
            self._queue.append(request)
            self._last_arrival[_lane(request)] = request.t
            if not self._threads:
                for lane in (LM, VISION):
                    self._threads[lane] = threading.Thread(target=self._loop, args=(lane,), daemon=True,
                                                           name=f"kv-pool-scheduler-{lane}")
                    self._threads[lane].start()
            self._cond.notify_all()
        try:
            request.finished.wait()
        except BaseException:
            self._cancel(request)
            raise
        if request.error is not None:
            raise request.error
        return request.result

    def _cancel(self, request: Request) -> None:
        """The caller stopped waiting: drop the request if it has not started (a started one runs to its end).
        Idempotent, so an interrupt inside it is repaired by ``settle``."""
        with self._cond:
            if request.state in ("queued", "cancelled"):
                if request in self._queue:
                    self._queue.remove(request)
                request.state = "cancelled"
                request.finished.set()

    def settle(self, request: Request) -> None:
        """Wait until a request its caller abandoned is over: cancelled if it has not started, else finished."""
        self._cancel(request)
        request.finished.wait()

    @contextmanager
    def paused(self):
        """Hold every batch while the block runs (requests queue up), then let them go together."""
        with self._cond:
            self._paused += 1
        try:
            yield self
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def pending(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict:
        """Batches run so far: counts and mean sizes (segments per language-model batch, grids per vision batch), and
        each lane's host time issuing its batches and waiting for work (``idle_s``: the language model's lane; on a
        GPU, issuing is not finishing: a busy thread with an idle GPU means launch-bound)."""
        c = dict(self._counts)
        c["mean_lm_batch"] = c["lm_segments"] / c["lm_batches"] if c["lm_batches"] else 0.0
        c["mean_vision_batch"] = c["vision_grids"] / c["vision_batches"] if c["vision_batches"] else 0.0
        c["graph_batches"], c["batch_graphs"] = self.graphs.replays, self.graphs.status()
        return c

    def reset_stats(self) -> None:
        """Start counting batches afresh (e.g. after a warm-up)."""
        self._counts = {k: type(v)() for k, v in self._counts.items()}
        self.graphs.replays = 0

    def stop(self, reason: str = "KVPool.close()") -> None:
        """End the thread; queued requests fail with RuntimeError."""
        with self._cond:
            if self._stopped is None:
                self._stopped = reason
            self._cond.notify_all()
            threads = list(self._threads.values())
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        self.graphs.release()

    # -- the scheduler's threads ---------------------------------------------------------
    def _loop(self, lane: str) -> None:
        torch.set_grad_enabled(False)  # per thread
        stream = None
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)
            if lane == VISION:  # its own CUDA stream: vision batches run beside the language model's, not before them
                stream = torch.cuda.Stream(self.model.device)
        try:
            while True:
                t0 = time.perf_counter()
                batch = self._next_batch(lane)
                if batch is None:
                    return
                t1 = time.perf_counter()
                self._run(batch, stream)
                self._counts["idle_s" if lane == LM else "vision_idle_s"] += t1 - t0
                self._counts["lm_host_s" if lane == LM else "vision_host_s"] += time.perf_counter() - t1
        finally:
            with self._cond:
                self._stopped = self._stopped or f"its {lane} thread ended"
                for request in self._queue:
                    request.error = RuntimeError(f"the KV pool's scheduler stopped ({self._stopped})")
                    request.state = "cancelled"
                    request.finished.set()
                self._queue = []
                self._cond.notify_all()

    def _next_batch(self, lane: str) -> Optional[list[Request]]:
        cfg = self.config
        with self._cond:
            while True:
                self._queue = [r for r in self._queue if r.state == "queued"]  # (an interrupted cancel's leftovers)
                while self._stopped is None and (not self._mine(lane) or self._paused):
                    self._cond.wait()
                if self._stopped is not None:
                    return None
                first = self._mine(lane)[0].t
                while self._stopped is None and not self._paused and not self._ready(lane):
                    now = time.perf_counter()
                    deadline = min(first + cfg.max_wait_ms / 1e3, self._last_arrival[lane] + cfg.batch_window_ms / 1e3)
                    if now >= deadline:
                        break
                    self._cond.wait(deadline - now)
                if self._stopped is None and not self._paused:
                    batch = self._pick(lane)
                    if batch:
                        return batch

    def _mine(self, lane: str) -> list[Request]:
        """The queued requests of a lane, in arrival order."""
        return [r for r in self._queue if r.state == "queued" and _lane(r) == lane]

    def _ready(self, lane: str) -> bool:
        """Go now: every stream of the lane's last batch has submitted again, or a batch is full."""
        mine = self._mine(lane)
        expect = self._expect[lane]
        if expect and expect <= {r.owner for r in mine}:
            return True
        if lane == VISION:
            return sum(r.n for r in mine) >= self.config.max_vision_patches
        return len(mine) >= self.config.max_batch_segments or sum(r.n for r in mine) >= self.config.max_batch_tokens

    def _pick(self, lane: str) -> list[Request]:
        """The lane's next batch: the group of the most urgent (then oldest) request, in that order, within the caps."""
        cfg = self.config
        order = sorted(self._mine(lane), key=lambda r: (not r.urgent, r.t))
        if not order:
            return []
        group = order[0].group
        cap = cfg.max_vision_patches if lane == VISION else cfg.max_batch_tokens
        batch, rows = [], 0
        for r in order:
            if r.group != group:
                continue
            if batch and (rows + r.n > cap or len(batch) >= cfg.max_batch_segments):
                break
            batch.append(r)
            rows += r.n
        for r in batch:
            self._queue.remove(r)
            r.state = "running"
        self._expect[lane] = {r.owner for r in batch}
        return batch

    def _execute(self, works: list) -> list:
        if isinstance(works[0], VisionWork):
            return run_vision(self.model, works, self._layouts)
        replayed = self.graphs.run(works)
        return replayed if replayed is not None else run_lm(self.model, self.buffers, self.config.page, works)

    def _run(self, batch: list[Request], stream=None) -> None:
        works = [r.work for r in batch]
        try:
            try:
                results = self._execute(works) if stream is None else self._on_stream(stream, batch)
                for r, out in zip(batch, results):
                    r.result = out
            except Exception as e:  # noqa: BLE001 (each request is retried alone: only the failing ones fail)
                if len(batch) == 1:
                    batch[0].error = e
                else:
                    self._counts["failed_batches"] += 1
                    for r in batch:
                        try:
                            r.result = (self._execute([r.work]) if stream is None else
                                        self._on_stream(stream, [r]))[0]
                        except Exception as alone:  # noqa: BLE001 (handed to that request's caller)
                            r.error = alone
            self._count(works)
        finally:
            for r in batch:
                r.state = "done"
                r.finished.set()

    def _on_stream(self, stream, batch: list[Request]) -> list:
        """Vision requests on the lane's own CUDA stream -> their outputs, complete and safe to use on their callers'
        streams."""
        callers = {r.stream for r in batch}
        for caller in callers:  # the callers' patches are ready
            stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            outs = self._execute([r.work for r in batch])
        for r, out in zip(batch, outs):  # (the allocator must not reuse their memory while the caller reads it)
            for t in (out.embeds, out.deepstack):
                if t is not None:
                    t.record_stream(r.stream)
        stream.synchronize()
        return outs

    def _count(self, works: list) -> None:
        c = self._counts
        if isinstance(works[0], LMWork):
            c["lm_batches"] += 1
            c["lm_segments"] += len(works)
            c["lm_rows"] += sum(w.n for w in works)
            c["max_lm_segments"] = max(c["max_lm_segments"], len(works))
        else:
            c["vision_batches"] += 1
            c["vision_grids"] += len(works)
            c["max_vision_grids"] = max(c["max_vision_grids"], len(works))
