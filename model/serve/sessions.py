"""Sessions: one stream each, created under admission control, closed on request or when idle.

``SessionRegistry`` owns every live ``Session`` of this server (or of this replica under Ray
Serve, where a session id starts with its replica's id). A session owns its ``SessionRunner``
(the engine and its thread), the fps sampler that turns the client's capture times into the
session's frame rate, its counters, and the WebSocket attached to it (a newer connection takes
over from an older one, so a client that lost its connection can resume). Sessions share the
model's weights and nothing else: each has its own engine, cache, thread and queues.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import secrets
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Optional

from ..config import PoolConfig, StreamConfig
from ..kv_pool import KVPool
from .admission import GIB, Admission, AdmissionRefused, MemoryModel
from .config import ServerConfig
from .protocol import (FrameRecord, ProtocolError, Question, SessionSettings, decode_frame, parse_frames,
                       parse_question)
from .runner import QueuedFrame, QuestionJob, RunnerClosed, SessionRunner, pixel_range

log = logging.getLogger("model.serve")
EPS = 1e-6
ENDED_REMEMBERED = 1024  # ended session ids kept to say why they are gone


class SessionError(Exception):
    """A request about a session that cannot be served: HTTP ``status``, a ``code`` for clients, a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def sample(next_k: int, t: float, fps: float) -> tuple[bool, int]:
    """The fps sampler: keep the first frame at or after each instant k / fps of the capture times.

    next_k: the next instant's index -> (keep this frame, the next instant's index after it).
    """
    if t + EPS >= next_k / fps:
        return True, math.floor((t + EPS) * fps) + 1
    return False, next_k


class Session:
    def __init__(self, sid: str, settings: SessionSettings, runner: SessionRunner, memory_bytes: int,
                 config: ServerConfig, min_frame: Callable[[int, int], Optional[str]], decoder: Optional[Executor] = None):
        self.id, self.settings, self.runner, self.memory_bytes = sid, settings, runner, memory_bytes
        self.config, self.limits = config, config.limits
        self._min_frame, self._decoder = min_frame, decoder
        self.created = time.time()
        self.last_active = time.monotonic()
        self.next_k = 0  # the fps sampler's next instant
        self.last_t: Optional[float] = None
        self.frames_received = self.frames_skipped = self.frames_rejected = 0
        self.connection: Optional[Any] = None  # the attached WebSocket connection (app.Connection)
        self._receiving = asyncio.Lock()  # frames messages of one session are checked and queued one at a time
        self._question_n = 0

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.last_active

    # ------------------------------------------------------------------ frames
    async def receive_frames(self, data: bytes) -> dict:
        """A frames message -> counts. Every record is checked (and decoded) before any is queued: a bad
        message is refused whole and changes nothing."""
        self.touch()
        try:
            records = parse_frames(data, self.limits)
        except ProtocolError:
            self.frames_rejected += 1
            raise
        async with self._receiving:
            last_t, next_k, keep = self.last_t, self.next_k, []
            for i, rec in enumerate(records):
                if last_t is not None and rec.t <= last_t:
                    self.frames_rejected += len(records)
                    raise ProtocolError("bad_frame", f"frame {i}: capture time {rec.t!r} s is not after the previous "
                                                     f"frame's {last_t!r} s (times must increase)")
                last_t = rec.t
                kept, next_k = sample(next_k, rec.t, self.settings.fps)
                if kept:
                    keep.append((i, rec))
            try:
                rgb = await asyncio.get_running_loop().run_in_executor(self._decoder, self._decode, keep)
            except ProtocolError:
                self.frames_rejected += len(records)
                raise
            now = time.monotonic()
            self.next_k, self.last_t = next_k, last_t  # the message is accepted: only now does the sampler move
            self.frames_received += len(records)
            self.frames_skipped += len(records) - len(keep)
            try:
                dropped = self.runner.submit_frames([QueuedFrame(rec.t, a, now) for (_, rec), a in zip(keep, rgb)])
            except RunnerClosed as e:
                raise SessionError(410, "session_closed", str(e)) from None
        return {"frames": len(records), "queued": len(keep), "skipped": len(records) - len(keep), "dropped": dropped}

    def _decode(self, keep: list[tuple[int, FrameRecord]]) -> list:
        out = []
        for i, rec in keep:
            rgb = decode_frame(rec, self.limits, f"frame {i}")
            problem = self._min_frame(rgb.shape[0], rgb.shape[1])
            if problem:
                raise ProtocolError("bad_frame", f"frame {i}: {problem}")
            out.append(rgb)
        return out

    # ------------------------------------------------------------------ questions
    def ask(self, msg: dict) -> QuestionJob:
        self.touch()
        self._question_n += 1
        question: Question = parse_question(msg, self.limits, f"q{self._question_n}")
        try:
            return self.runner.ask(question)
        except RunnerClosed as e:
            raise SessionError(410, "session_closed", str(e)) from None

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        r = self.runner.status()
        newest, behind = self.last_t, r["ingested_until_s"]
        if behind is None:
            behind = self.runner.first_t  # nothing ingested yet: all that was queued is behind
        lag = None if newest is None or behind is None else newest - behind
        return {"type": "status", "session": self.id, "frames_received": self.frames_received,
                "frames_skipped": self.frames_skipped, "frames_rejected": self.frames_rejected + r["frames_failed"],
                "newest_frame_s": newest, "ingest_lag_s": lag, **r, "idle_s": self.idle_s()}

    def summary(self) -> dict:
        return {"id": self.id, "created": self.created, "settings": self.settings.to_json(),
                "memory_bytes": self.memory_bytes, "connected": self.connection is not None,
                "frames_received": self.frames_received, "frames_ingested": self.runner.frames_ingested,
                "idle_s": self.idle_s()}

    # ------------------------------------------------------------------ the attached connection
    def attach(self, connection) -> Optional[Any]:
        """``connection`` becomes the session's WebSocket; returns the one it replaces (to be closed)."""
        previous, self.connection = self.connection, connection
        self.touch()
        return previous

    def detach(self, connection) -> None:
        if self.connection is connection:
            self.connection = None
        self.touch()

    def notify(self, event: dict) -> None:
        """From any thread: a session-level event (an ingest failure) to the attached connection, if any."""
        connection = self.connection
        if connection is not None:
            connection.send_threadsafe(event)


class SessionRegistry:
    """The sessions of this server: create (with admission control), get, delete, list, expire.

    id_prefix: "" on a plain server; under Ray Serve the replica's id and "-", so any replica can tell
    a session of a replica that is gone ("session lost") from one that never existed.
    """

    def __init__(self, model, processor, config: ServerConfig, observer: Any = None, id_prefix: str = ""):
        self.model, self.processor, self.config = model, processor, config
        self.observer, self.id_prefix = observer, id_prefix
        self._sessions: dict[str, Session] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        pixels = pixel_range(model, processor, config.stream)
        self._min_pixels, self._max_pixels, self._factor = pixels.min_pixels, pixels.max_pixels, pixels.factor
        cuda = model.device.type == "cuda"
        overhead = config.session_overhead_bytes
        if overhead is None:
            overhead = (256 if cuda else 16) * 2**20
        self.memory = MemoryModel.of(model, pixels.max_pixels, pixels.factor, overhead,
                                     config.stream.max_question_tokens, config.stream.choice_chunk_tokens)
        budget = config.memory_bytes
        if budget is None:
            if cuda:
                import torch

                budget = int(0.9 * torch.cuda.mem_get_info(model.device)[0])
            else:
                budget = GIB
        self.pool: Optional[KVPool] = None
        if config.pooled:
            # the sessions' caches, allocated once, here: the budget is the pool
            # (less the scratch slots of its captured batches, so that the pool's memory stays within the budget)
            tokens = config.pool_tokens or budget // self.memory.kv_bytes_per_token - PoolConfig().scratch_tokens
            if tokens < PoolConfig.page:
                raise ValueError(f"a memory budget of {budget} bytes holds {tokens} tokens of K/V, less than one page "
                                 f"of the pool ({PoolConfig.page}): raise --memory-gib or set --pool-tokens")
            self.pool = KVPool.for_model(model, tokens=tokens)
            budget = self.pool.capacity * self.pool.nbytes_per_token()  # its pages (not its scratch slots)
        self.admission = Admission(budget, config.max_sessions, config.retry_after_s,
                                   cuda_device=model.device if cuda and self.pool is None else None)
        warm = cuda if config.warmup is None else config.warmup
        # a pooled session captures no graphs of its own (the scheduler runs its forwards, replaying captured batches
        # of questions and decode steps): the pool is warmed up once, here, so that no session's first call compiles
        # a kernel
        self.warmup = self.pool is None and warm
        if self.pool is not None and warm:
            self._warm_pool()
        # Own threads for decoding frames and for opening sessions (a GPU warm-up takes seconds): neither
        # waits behind the other, nor behind anything else using asyncio's default pool.
        self._decoder = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="vsq-decode")
        self._opener = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vsq-open")

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # ------------------------------------------------------------------ create
    async def create(self, settings: SessionSettings) -> Session:
        """A new session -> it; ``AdmissionRefused`` when it would not fit, ``ProtocolError`` for settings the
        engine refuses (an impossible budget)."""
        sid = f"{self.id_prefix}{secrets.token_hex(8)}"
        need = self._need_bytes(settings)
        self.admission.reserve(sid, need, self._retry_after())
        try:
            runner = await asyncio.get_running_loop().run_in_executor(self._opener, self._open_runner, sid, settings)
        except BaseException:
            self.admission.release(sid)
            raise
        session = Session(sid, settings, runner, need, self.config, self._frame_problem, self._decoder)
        runner._notify = session.notify
        self._sessions[sid] = session
        log.info("session created", extra={"fields": {"event": "session_created", "session": sid,
                                                      "settings": settings.to_json(), "memory_bytes": need}})
        return session

    def _warm_pool(self) -> None:
        """One throwaway stream's warm-up through the pool (a chunk, questions, decode steps, choices) at the
        processor's default frame size: every kernel the sessions' forwards use is compiled before the first session."""
        from .. import VideoStreamInference

        side = max(self._factor, int(math.sqrt(min(self._max_pixels, 448 * 448))) // self._factor * self._factor)
        with VideoStreamInference(self.model, self.processor, config=self.config.stream, pool=self.pool) as engine:
            engine.warmup(frame_size=(side, side), chunk_frames=4, fps=2.0, freeze_gc=False)
        # the captured batches of the sessions' decode steps and questions, at every pages bucket up to a session
        # of the default budget (others are captured when first met)
        settings = SessionSettings(fps=2.0, cache_budget_tokens=self.config.bounds.default_budget_tokens)
        tokens = self.memory.pool_tokens(settings, self.config.limits, self.pool.page)
        self.pool.warm_graphs(streams=self.config.max_sessions, tokens=tokens)
        self.pool.scheduler.reset_stats()

    def _need_bytes(self, settings: SessionSettings) -> int:
        """What a session with ``settings`` holds of the budget: its pages of the pool, or its own cache and overhead."""
        if self.pool is not None:
            share = self.memory.pool_tokens(settings, self.config.limits, self.pool.page)
            return share * self.memory.kv_bytes_per_token
        return self.memory.session_bytes(settings, self.config.limits, self.config.recall_host_tokens)

    def _open_runner(self, sid: str, settings: SessionSettings) -> SessionRunner:
        """The session's runner and engine, its cache reserved now (running out of memory happens here, refused)."""
        limits = self.config.limits
        try:
            return SessionRunner.open(
                self.model, self.processor, stream_config(self.config, settings),
                capacity=self.memory.capacity_tokens(settings, limits),
                warmup_frame_size=settings.frame_size if self.warmup else None, fps=settings.fps,
                chunk_frames=settings.chunk_frames, max_queued_frames=limits.max_queued_frames,
                max_pending_questions=limits.max_pending_questions, observer=self.observer, name=sid, pool=self.pool)
        except (ValueError, TypeError) as e:
            raise ProtocolError("bad_settings", str(e)) from None
        except BaseException as e:
            if _out_of_memory(e):
                raise AdmissionRefused(f"the device ran out of memory reserving this session's cache ({e})",
                                       self._retry_after()) from None
            raise

    def _frame_problem(self, height: int, width: int) -> Optional[str]:
        """Why the engine would refuse a frame of this size (the processor's minimum, the aspect ratio), or None."""
        if min(height, width) < self._factor or height * width < self._min_pixels:
            return (f"{height}x{width} (HxW) is too small; the model's processor needs each side >= {self._factor} "
                    f"px and at least {self._min_pixels} pixels")
        if max(height, width) / min(height, width) > 200:
            return f"aspect ratio of {height}x{width} exceeds 200"
        return None

    def _retry_after(self) -> int:
        """Seconds until the idlest session would expire, else the configured default."""
        if not self._sessions:
            return self.config.retry_after_s
        soonest = min(self.config.idle_timeout_s - s.idle_s() for s in self._sessions.values())
        return max(1, min(self.config.retry_after_s, math.ceil(soonest)))

    # ------------------------------------------------------------------ get, delete, expire
    def owner_of(self, sid: str) -> str:
        """The replica prefix a session id carries ("" on a plain server)."""
        return sid.rsplit("-", 1)[0] + "-" if "-" in sid else ""

    def find(self, sid: str) -> Optional[Session]:
        """The live session ``sid`` held here, or None."""
        return self._sessions.get(sid)

    def get(self, sid: str) -> Session:
        """The live session ``sid``, or ``SessionError``: 404 unknown or ended (saying why), 410 lost with its replica."""
        session = self._sessions.get(sid)
        if session is not None:
            return session
        if sid in self._ended:
            raise SessionError(404, "session_ended", f"session {sid} has ended ({self._ended[sid]})")
        if self.id_prefix and self.owner_of(sid) and self.owner_of(sid) != self.id_prefix:
            raise SessionError(410, "session_lost", f"session {sid} is lost: the replica that held it is gone")
        raise SessionError(404, "not_found", f"no session {sid!r}")

    async def delete(self, sid: str, reason: str = "deleted") -> None:
        session = self.get(sid)
        self._sessions.pop(sid, None)
        self._ended[sid] = reason
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        connection = session.connection
        await session.runner.close()
        self.admission.release(sid)
        if connection is not None:
            await connection.close_for(reason)
        log.info("session ended", extra={"fields": {"event": "session_ended", "session": sid, "reason": reason,
                                                    "frames_ingested": session.runner.frames_ingested}})

    async def expire_idle(self) -> list[str]:
        """Close every session idle for longer than the timeout -> their ids."""
        idle = [s.id for s in self._sessions.values() if s.idle_s() > self.config.idle_timeout_s
                and s.runner.status()["questions_pending"] == 0]
        for sid in idle:
            if sid in self._sessions:
                await self.delete(sid, reason=f"idle for more than {self.config.idle_timeout_s:g} s")
        return idle

    async def close_all(self) -> None:
        for sid in list(self._sessions):
            await self.delete(sid, reason="server shutting down")
        self._decoder.shutdown(wait=False)
        self._opener.shutdown(wait=False)
        if self.pool is not None:
            self.pool.close()  # the scheduler's threads end and the pool's memory is freed now


def stream_config(config: ServerConfig, settings: SessionSettings) -> StreamConfig:
    """The ``StreamConfig`` of a session's engine: the server's, with the session's budget."""
    return config.stream.replace(cache_budget_tokens=settings.cache_budget_tokens,
                                 video_window_seconds=settings.video_window_seconds, sink_frames=settings.sink_frames,
                                 recall_grids=settings.recall_grids, recall_host_tokens=config.recall_host_tokens)


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.OutOfMemoryError, MemoryError))
