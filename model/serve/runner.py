"""SessionRunner: every engine call of one session goes through here.

One worker thread per session runs the engine's calls one at a time, questions first: a question
waits at most for the chunk being encoded when it arrived, never for the frames queued behind it,
and is answered from what the engine holds when it starts (its done event says how much that
was). Frames wait in a bounded queue; when ingest falls behind, the oldest queued frames are
dropped and counted, and what reaches the engine is always whole, in order, and consistent (each
engine call is a transaction). Nothing else in the server touches an engine; the asyncio side
talks to it through these calls:

    runner = SessionRunner.open(model, processor, config, capacity=...)   # the engine, cache reserved
    runner.submit_frames(frames)      # non-blocking; returns how many queued frames it dropped
    job = runner.ask(question)        # non-blocking; ``async for event in job.events()``
    await runner.close()              # cancels what is pending, closes the engine (frees its memory)
    runner.status(), runner.stats()   # counters; the engine's stats() (lock-free)

Answers are streamed with ``engine.ask_stream`` from the worker thread and handed to the event
loop piece by piece; a cancelled job (client gone) closes its answer, which rolls it back.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .protocol import Question, error_event

log = logging.getLogger("model.serve")

TERMINAL = ("response.done", "response.choice", "response.cancelled", "error")


@dataclass
class QueuedFrame:
    t: float  # capture time (s), as the client sent it
    rgb: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    received: float  # time.monotonic() when it arrived


class RunnerClosed(RuntimeError):
    """The session's runner was closed (deleted, expired, or its worker failed)."""


class QuestionJob:
    """One question, queued or being answered; its events reach the event loop through an asyncio queue."""

    def __init__(self, question: Question, loop: asyncio.AbstractEventLoop):
        self.question = question
        self.arrival = time.monotonic()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False  # a terminal event was emitted

    def emit(self, event: dict) -> None:
        """Thread-safe: hand an event to the event loop (dropped if the loop has already stopped)."""
        if event["type"] in TERMINAL:
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping and nobody listens
            pass

    async def events(self):
        """The job's events, up to and including its terminal one."""
        while True:
            event = await self._queue.get()
            yield event
            if event["type"] in TERMINAL:
                return

    def cancel(self) -> None:
        """Stop answering (between two pieces); the answer is rolled back, the stream left as it was."""
        self.cancelled.set()


class SessionRunner:
    """The engine of one session and the one thread that calls it.

    engine: a ``VideoStreamInference`` (this runner owns it and closes it). fps: of the session's
    video. chunk_frames: frames per ``append_frames`` at most. max_queued_frames: the ingest queue's
    bound. notify(event): session-level events (an ingest failure), called from the worker thread.
    observer: optional metrics hooks (``frames_ingested(n, seconds)``, ``frames_dropped(n)``,
    ``frames_failed(n)``, ``question_answered(kind, ttft_s, engine_ttft_s)``).
    """

    def __init__(self, engine, fps: float, chunk_frames: int = 4, max_queued_frames: int = 32,
                 max_pending_questions: int = 4, notify: Callable[[dict], None] = lambda event: None,
                 observer: Any = None, name: str = "session"):
        self.engine = engine
        self.fps, self.chunk_frames = fps, chunk_frames
        self.max_queued_frames, self.max_pending_questions = max_queued_frames, max_pending_questions
        self._notify, self._observer, self.name = notify, observer, name
        # Capture times reach the engine as soon as it takes them (append_frames(..., timestamps=...));
        # until then frames are placed at the session's fps. This is the one switch.
        self._takes_timestamps = "timestamps" in inspect.signature(engine.append_frames).parameters
        self._cond = threading.Condition()
        self._frames: collections.deque[QueuedFrame] = collections.deque()
        self._questions: collections.deque[QuestionJob] = collections.deque()
        self._running: Optional[QuestionJob] = None
        self._closing = False
        self._failed: Optional[BaseException] = None
        self.frames_ingested = self.frames_dropped = self.frames_failed = 0
        self.questions_answered = 0
        self.ingested_until_s: Optional[float] = None  # capture time of the newest frame in the engine
        self.first_t: Optional[float] = None
        self.last_chunk_s: Optional[float] = None
        self.ingest_delay_s: Optional[float] = None  # arrival -> in the engine, for the last chunk's newest frame
        self._final_stats: dict = {}
        self._closing_engine = threading.Lock()  # stats() readers vs the worker closing the engine
        self._done: concurrent.futures.Future = concurrent.futures.Future()  # set when the worker has closed the engine
        self._thread = threading.Thread(target=self._run, name=f"runner-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, model, processor, config, capacity: int, warmup_frame_size: Optional[tuple[int, int]] = None,
             fps: float = 2.0, pool=None, **runner_options) -> "SessionRunner":
        """A new engine over ``model`` (its ``StreamConfig`` ``config``) with ``capacity`` tokens of cache reserved now,
        or warmed up for frames of ``warmup_frame_size`` (H, W) (graphs captured, cache reserved), and its runner.
        ``pool``: a ``KVPool``: the engine keeps its K/V in the pool's pages and its forwards run on the pool's
        scheduler, batched with the other sessions' (``capacity`` is then checked against the pool, not allocated).

        Raises what the engine raises: ValueError/TypeError for a config it refuses, out of memory while
        reserving (the engine is closed again either way).
        """
        from .. import VideoStreamInference

        engine = VideoStreamInference(model, processor, config=config, pool=pool)
        try:
            if warmup_frame_size is not None:
                engine.warmup(frame_size=tuple(warmup_frame_size), chunk_frames=runner_options.get("chunk_frames", 4),
                              fps=fps, capacity=capacity)
            else:
                engine.reserve(capacity)
        except BaseException:
            engine.close()
            raise
        return cls(engine, fps, **runner_options)

    # ------------------------------------------------------------------ the asyncio side
    def submit_frames(self, frames: list[QueuedFrame]) -> int:
        """Queue frames for ingest -> how many queued frames were dropped to make room (the oldest)."""
        with self._cond:
            self._check_open()
            if self.first_t is None and frames:
                self.first_t = frames[0].t
            self._frames.extend(frames)
            dropped = 0
            while len(self._frames) > self.max_queued_frames:
                self._frames.popleft()
                dropped += 1
            self.frames_dropped += dropped
            self._cond.notify()
        if dropped and self._observer is not None:
            self._observer.frames_dropped(dropped)
        return dropped

    def ask(self, question: Question) -> QuestionJob:
        """Queue a question (answered before any queued frame) -> its job. Call from the event loop."""
        job = QuestionJob(question, asyncio.get_running_loop())
        with self._cond:
            self._check_open()
            if len(self._questions) >= self.max_pending_questions:
                from .protocol import ProtocolError

                raise ProtocolError("busy", f"{len(self._questions)} questions are already waiting in this session "
                                            f"(limit {self.max_pending_questions}); ask again when one is answered")
            self._questions.append(job)
            self._cond.notify()
        return job

    def status(self) -> dict:
        """A consistent reading of the runner's counters and the engine's numbers (lock-free on the engine)."""
        with self._cond:
            out = {"frames_ingested": self.frames_ingested, "frames_dropped": self.frames_dropped,
                   "frames_failed": self.frames_failed, "queued_frames": len(self._frames),
                   "ingested_until_s": self.ingested_until_s, "ingest_delay_s": self.ingest_delay_s,
                   "last_chunk_ms": None if self.last_chunk_s is None else 1000 * self.last_chunk_s,
                   "questions_pending": len(self._questions) + (self._running is not None),
                   "questions_answered": self.questions_answered, "closed": self._closing}
        stats = self.stats()
        out.update({k: stats.get(k) for k in ("cache_tokens", "video_seconds", "kept_video_seconds",
                                              "evicted_seconds", "cache_reserved_bytes")})
        return out

    def stats(self) -> dict:
        """The engine's own ``stats()`` (it reads the committed state without the engine's lock; the last
        reading once the engine is closed)."""
        with self._closing_engine:
            engine = self.engine
            return engine.stats() if engine is not None else dict(self._final_stats)

    async def close(self) -> None:
        """Cancel every pending question, stop ingest, close the engine (its memory is freed) and join the thread."""
        self.begin_close()
        await asyncio.wrap_future(self._done)  # no thread waits: the worker says when it is done

    def begin_close(self) -> None:
        """No more work is taken: queued frames are dropped, queued questions answered 'session_closed', the running
        one cancelled."""
        with self._cond:
            self._closing = True
            pending = list(self._questions)
            self._questions.clear()
            self._frames.clear()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        for job in pending:
            job.emit(error_event("session_closed", "the session was closed before this question was answered",
                                 job.question.id))

    @property
    def closed(self) -> bool:
        return self._closing

    def _check_open(self) -> None:
        if self._failed is not None:
            raise RunnerClosed(f"session worker failed: {type(self._failed).__name__}: {self._failed}")
        if self._closing:
            raise RunnerClosed("session is closed")

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._questions or self._frames):
                        self._cond.wait()
                    if self._closing:
                        break
                    if self._questions:
                        job, chunk = self._questions.popleft(), None
                        self._running = job
                    else:
                        job, chunk = None, [self._frames.popleft()
                                            for _ in range(min(self.chunk_frames, len(self._frames)))]
                try:
                    if job is not None:
                        self._answer(job)
                    else:
                        self._ingest(chunk)
                finally:
                    with self._cond:
                        self._running = None
        except BaseException as e:  # noqa: BLE001 - the worker must record any death, then re-raise it
            self._failed = e
            log.exception("session worker failed", extra={"fields": {"event": "worker_failed", "session": self.name}})
            raise
        finally:
            try:
                self._shutdown()
            finally:
                self._done.set_result(None)

    def _shutdown(self) -> None:
        self.begin_close()  # (nothing is running: the worker is ending)
        with self._closing_engine:
            engine, self.engine = self.engine, None
            if engine is not None:
                try:
                    self._final_stats = engine.stats()
                    engine.close()
                except Exception:  # noqa: BLE001 - closing must not leave the thread with an exception
                    log.exception("closing an engine failed", extra={"fields": {"event": "close_failed",
                                                                                "session": self.name}})

    def _ingest(self, chunk: list[QueuedFrame]) -> None:
        t0 = time.monotonic()
        kwargs = {"timestamps": [f.t - self.first_t for f in chunk]} if self._takes_timestamps else {}
        try:
            self.engine.append_frames([f.rgb for f in chunk], fps=self.fps, **kwargs)
        except Exception as e:  # noqa: BLE001 - the engine committed nothing: report, count and go on
            with self._cond:
                self.frames_failed += len(chunk)
            if self._observer is not None:
                self._observer.frames_failed(len(chunk))
            internal = not isinstance(e, (ValueError, TypeError))
            if internal:
                log.exception("ingest failed", extra={"fields": {"event": "ingest_failed", "session": self.name}})
            self._notify(error_event("internal" if internal else "bad_frame",
                                     f"{len(chunk)} frame(s) at t={chunk[0].t:.3f}..{chunk[-1].t:.3f} s were not "
                                     f"ingested: {type(e).__name__}: {e}"))
            return
        done = time.monotonic()
        with self._cond:
            self.frames_ingested += len(chunk)
            self.ingested_until_s = chunk[-1].t
            self.last_chunk_s = done - t0
            self.ingest_delay_s = done - chunk[-1].received
        if self._observer is not None:
            self._observer.frames_ingested(len(chunk), done - t0)

    def _seen(self) -> dict:
        """What a question starting now sees (the engine's lock is not needed: this thread is its only caller)."""
        with self._cond:
            seen = {"frames": self.frames_ingested, "until_s": self.ingested_until_s,
                    "not_ingested_frames": len(self._frames)}
        stats = self.engine.stats()
        seen.update({"video_seconds": stats.get("video_seconds"),
                     "kept_video_seconds": stats.get("kept_video_seconds", stats.get("video_seconds")),
                     "evicted_seconds": stats.get("evicted_seconds", 0.0), "cache_tokens": stats.get("cache_tokens"),
                     "as_of": "question start: frames ingested by then; queued frames were not waited for"})
        return seen

    def _answer(self, job: QuestionJob) -> None:
        q = job.question
        if job.cancelled.is_set():
            job.emit({"type": "response.cancelled", "id": q.id})
            return
        seen = self._seen()
        start = time.monotonic()
        try:
            if q.choices is not None:
                r = self.engine.ask_choice(q.text, list(q.choices))
                end = time.monotonic()
                job.emit({"type": "response.choice", "id": q.id, "best": r.best, "index": r.index,
                          "scores": r.scores, "normalized_scores": r.normalized_scores, "choices": list(r.choices),
                          "queue_s": start - job.arrival, "total_s": end - job.arrival,
                          "seen": {**seen, "recalled": [[g.start_s, g.end_s] for g in r.recalled]}})
                self._answered("choice", end - job.arrival, None)
                return
            stream = self.engine.ask_stream(q.text, max_new_tokens=q.max_new_tokens)
            first = None
            try:
                for piece in stream:
                    first = first or time.monotonic()
                    job.emit({"type": "response.text.delta", "id": q.id, "delta": piece})
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()  # after a break: rolls the answer back; after the end: nothing to do
            if job.cancelled.is_set():
                job.emit({"type": "response.cancelled", "id": q.id})
                return
            a, end = stream.answer, time.monotonic()
            ttft = (first or end) - job.arrival
            job.emit({"type": "response.done", "id": q.id, "text": a.text, "token_ids": list(a.token_ids),
                      "tokens": a.num_tokens, "finish_reason": a.finish_reason, "ttft_s": ttft,
                      "engine_ttft_s": a.ttft_s, "queue_s": start - job.arrival, "total_s": end - job.arrival,
                      "seen": {**seen, "recalled": [[g.start_s, g.end_s] for g in a.recalled]}})
            self._answered("text", ttft, a.ttft_s)
        except (ValueError, TypeError) as e:
            job.emit(error_event("bad_question", f"{type(e).__name__}: {e}", q.id))
        except Exception as e:  # noqa: BLE001 - one question's failure is that question's error, not the server's
            log.exception("question failed", extra={"fields": {"event": "question_failed", "session": self.name}})
            job.emit(error_event("internal", f"the question failed ({type(e).__name__}); the session is unchanged",
                                 q.id))

    def _answered(self, kind: str, ttft_s: float, engine_ttft_s: Optional[float]) -> None:
        with self._cond:
            self.questions_answered += 1
        if self._observer is not None:
            self._observer.question_answered(kind, ttft_s, engine_ttft_s)


def pixel_range(model, processor, config):
    """The frame sizes the model's video processor accepts: ``min_pixels``, ``max_pixels``, ``factor`` (px per merged patch)."""
    from .. import VideoStreamInference

    with VideoStreamInference(model, processor, config=config) as probe:  # constructing one allocates no cache
        return probe.video_pixels
