"""LiveStream: a video source fed into an engine in chunks while the caller asks about "now".

    with LiveStream(engine, "rtsp://camera/stream", chunk=4, fps=2.0) as live:   # a background thread
        while live.running:
            print(live.progress, engine.ask("What is happening now?").text)
    # entering starts it (live.start() inside is a no-op); leaving stops the thread, and a source
    # or engine error is raised there, never lost

    live = LiveStream(engine, "clip.mp4")   # or in the caller's thread, exactly up to a time:
    live.advance(until_s=10.0)              # every frame with timestamp <= 10 s is in the engine
    engine.ask("What happened so far?")

Frames come from ``model.sources.open_video`` (timestamp sampling, pacing, drop counts). Thread
safety comes from the engine, which serialises its calls: questions from another thread see
the stream between two chunks, and each call is atomic, so stopping (or an error) at any moment
leaves a consistent stream holding every chunk appended so far.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

from .arguments import check_fps
from .sources import EPS, VideoSource, masked_url, open_video


@dataclass(frozen=True)
class LiveProgress:
    """A consistent reading of a ``LiveStream``'s counters."""

    video_s: float  # timestamp of the newest frame in the engine (0.0 before any)
    frames: int  # frames appended to the engine
    chunks: int  # append_frames calls that completed
    dropped: int  # frames the source dropped because ingestion fell behind the video
    lost: int  # frames the media promised but could not decode
    last_chunk_ms: Optional[float]  # how long the last append_frames took (lock wait included)
    running: bool  # the background thread is alive
    ended: bool  # the source has no more frames (end of file, max_seconds, or an error)
    error: Optional[BaseException]  # what stopped the stream, if anything did

    def __str__(self) -> str:
        chunk = "-" if self.last_chunk_ms is None else f"{self.last_chunk_ms:.0f} ms"
        return (f"video {self.video_s:.1f}s | frames {self.frames} | dropped {self.dropped} | "
                f"chunks {self.chunks} | last chunk {chunk}")


class LiveStream:
    """Streams ``source`` into ``engine``: ``chunk`` frames per ``append_frames`` call, at ``fps``.

    source: anything ``open_video`` takes (file path, camera index, URL, iterable of frames), or an
        open ``VideoSource`` (used as it is: its fps is the one appended; other options refused).
    fps: sampling rate, also the fps given to ``append_frames`` (default 2.0, or the open source's).
    realtime, max_seconds, **source_options: passed to ``open_video``.
    A trailing partial chunk at the end of a finite source is appended too. The source is opened
    by ``start()``, by entering a ``with`` block (which starts it; a ``start()`` inside that block
    does nothing) or by the first ``advance()``; a LiveStream runs once (the engine keeps its stream).
    """

    def __init__(self, engine, source, chunk: int = 4, fps: Optional[float] = None, realtime: bool = False,
                 max_seconds: Optional[float] = None, **source_options):
        if not callable(getattr(engine, "append_frames", None)):
            raise TypeError(f"engine must be a VideoStreamInference, got {type(engine).__name__}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1 (frames per append_frames call), got {chunk!r}")
        self.engine, self.chunk = engine, chunk
        self._source: Optional[VideoSource] = None
        if isinstance(source, VideoSource):
            self._source = source
            self.fps = self._open_source_fps(source, fps, realtime, max_seconds, source_options)
            self._open_args = None
        else:
            self.fps = check_fps(2.0 if fps is None else fps)
            self._open_args = (source, dict(fps=self.fps, realtime=realtime, max_seconds=max_seconds, **source_options))
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._appending = threading.Lock()  # held around each append; paused() takes it
        self._paused_by: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._held = None  # the (t, frame) read past an advance() limit, appended by the next call
        self._used = self._ended = self._flush_on_stop = self._started_by_with = False
        self._frames = self._chunks = 0
        self._video_s, self._last_chunk_ms = 0.0, None
        self._error: Optional[BaseException] = None
        self._error_raised = False

    @staticmethod
    def _open_source_fps(source: VideoSource, fps, realtime, max_seconds, options) -> float:
        if realtime or max_seconds is not None or options:
            raise ValueError("realtime, max_seconds and source options apply when LiveStream opens the source; "
                             "pass them to open_video for an open VideoSource")
        if source.fps is None:
            raise ValueError("the open VideoSource delivers every frame (fps=None); open it with fps=<rate> "
                             "so the frames' rate is known")
        if fps is not None and check_fps(fps) != source.fps:
            raise ValueError(f"fps={fps} differs from the open VideoSource's fps={source.fps}; leave fps unset")
        return source.fps

    # ------------------------------------------------------------------ control
    def start(self) -> "LiveStream":
        """Open the source (errors raise here) and stream it into the engine from a background thread.

        Once per LiveStream: a second call raises RuntimeError, except inside a ``with`` block that
        started the stream, where it returns the stream unchanged.
        """
        if self._started_by_with and not self._stop.is_set():
            return self
        self._claim()
        self._thread = threading.Thread(target=self._run, name="live-stream", daemon=True)
        self._thread.start()
        return self

    def advance(self, until_s: Optional[float] = None) -> LiveProgress:
        """In the caller's thread: append every frame with timestamp <= ``until_s`` (None: to the end).

        The last chunk may be partial, so the engine then holds exactly those frames. A source or
        engine error is raised here (the frames before it stay in the engine); once the source has
        ended, calls return at once.
        """
        if self._thread is not None:
            raise RuntimeError("advance() is for a LiveStream that was not started (by start() or a with "
                               "block); its thread owns the source")
        self._not_paused_here("advance()")
        if until_s is not None and not until_s >= 0:
            raise ValueError(f"until_s must be a number of seconds >= 0 or None, got {until_s!r}")
        if not self._used:
            self._claim()
        if not self._ended:
            self._pump(until_s, flush=True)
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error
        return self.progress

    def stop(self, timeout: Optional[float] = None, flush: bool = True) -> bool:
        """Stop streaming; True once the thread has ended (False if still inside a call after ``timeout``).

        The chunk being appended completes (calls are atomic); ``flush`` also appends the frames read
        for the next chunk. The source is closed. A source or engine error that ended the stream is
        raised here, once (``error`` keeps it).
        """
        self._not_paused_here("stop()")
        self._used = True  # never (re)opened after a stop
        self._flush_on_stop = bool(flush)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        elif self._source is not None:
            self._source.close()
        self._ended = True
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the background thread to end by itself (the source ended); True if it has."""
        if self._thread is None:
            raise RuntimeError("wait() needs a started LiveStream; call start() first")
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @contextlib.contextmanager
    def paused(self):
        """Within the block no chunk is appended (the one in flight completes first), so questions asked
        there see exactly ``progress.frames`` frames (the block's value). A live source keeps its newest
        frames meanwhile. ``stop()`` and ``advance()`` are refused inside it."""
        with self._appending:
            self._paused_by = threading.get_ident()
            try:
                yield self.progress
            finally:
                self._paused_by = None

    def _not_paused_here(self, what: str) -> None:
        if self._paused_by == threading.get_ident():
            raise RuntimeError(f"{what} inside paused() would wait for itself; leave the paused() block first")

    def __enter__(self) -> "LiveStream":
        """Start the stream unless it was started (or advanced) already; leaving the block stops it."""
        if not self._used:
            self.start()
            self._started_by_with = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - the with-body's own exception wins; ``error`` keeps this one
            if exc_type is None:
                raise

    # ------------------------------------------------------------------ readings
    @property
    def progress(self) -> LiveProgress:
        src = self._source
        with self._lock:
            return LiveProgress(self._video_s, self._frames, self._chunks, src.frames_dropped if src else 0,
                                src.frames_lost if src else 0, self._last_chunk_ms, self.running, self._ended,
                                self._error)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> Optional[BaseException]:
        """The exception that ended the stream (source disconnect, bad frame, engine error), or None."""
        return self._error

    @property
    def source(self) -> Optional[VideoSource]:
        """The open ``VideoSource`` (its counters, ``source_fps`` and ``problems``), None before it is opened."""
        return self._source

    # ------------------------------------------------------------------ the loop
    def _claim(self) -> None:
        """Mark this LiveStream used and open its source (in the caller's thread)."""
        if self._used:
            raise RuntimeError("a LiveStream runs once; create a new one to go on (the engine keeps its stream)")
        if self._open_args is not None:
            source, options = self._open_args
            self._source = open_video(source, sleep=self._sleep, **options)
        self._used = True

    def _sleep(self, seconds: float) -> None:
        """Real-time pacing that stop() cuts short."""
        self._stop.wait(seconds)

    def _run(self) -> None:
        try:
            self._pump(None, flush=None)
        finally:
            self._source.close()
            self._ended = True

    def _pump(self, until_s: Optional[float], flush: Optional[bool]) -> None:
        """Read and append chunks until the source ends, stop() is called or a frame is past ``until_s``.

        The frames read for an unfinished chunk are appended at the end when ``flush`` (None: at the
        end of the source or on a source error, and on stop() if it asked for it). Errors are kept.
        """
        batch: list = []
        stopped = False
        try:
            stopped = self._fill(batch, until_s)
        except Exception as e:  # noqa: BLE001 - kept for stop()/advance()/error, never lost
            self._error, self._ended = e, True
        if batch and (flush or (flush is None and (not stopped or self._flush_on_stop))):
            try:
                self._append(batch)
            except Exception as e:  # noqa: BLE001
                self._error = self._error or e

    def _fill(self, batch: list, until_s: Optional[float]) -> bool:
        """Append full chunks; ``batch`` is left with the unfinished one. True if stop() ended it."""
        while not self._stop.is_set():
            item = self._next()
            if item is None:
                return False
            if until_s is not None and item[0] > until_s + EPS:
                self._held = item
                return False
            batch.append(item)
            if len(batch) == self.chunk:
                self._append(batch)
        return True

    def _next(self):
        """The next (t, frame), the held one first; None (and ``ended``) at the end of the source."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        item = next(self._source, None)
        if item is None:
            self._ended = True
        return item

    def _append(self, batch: list) -> None:
        """Append ``batch`` as one chunk and empty it (a chunk that fails is not retried)."""
        frames, last_t = [frame for _, frame in batch], float(batch[-1][0])
        batch.clear()
        with self._appending:
            info = self.engine.append_frames(frames, fps=self.fps)
            self._count(len(frames), last_t, info.encode_s)

    def _count(self, frames: int, last_t: float, encode_s: float) -> None:
        with self._lock:
            self._frames += frames
            self._chunks += 1
            self._video_s = last_t
            self._last_chunk_ms = encode_s * 1000.0

    def __repr__(self) -> str:
        name = self._source.source if self._source is not None else self._open_args[0]
        name = masked_url(name) if isinstance(name, str) else name
        return f"LiveStream({name!r}, chunk={self.chunk}, fps={self.fps}, {self.progress})"
