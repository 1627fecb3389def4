"""What every video source is: ``VideoSource``, the timestamp ``Sampler``, and iterables of frames.

A ``VideoSource`` is an iterator of ``(timestamp_s, frame)`` (RGB uint8 HxWx3) whose counters
and problems can be read while iterating; ``open_video`` (``sources.py``) makes one, the OpenCV
backends (``sources_opencv.py``, ``sources_live.py``) and ``IterableSource`` here are its kinds.
"""
from __future__ import annotations

import collections
import math
import numbers
import warnings
from typing import Callable, Iterator, Optional

import numpy as np

EPS = 1e-6  # seconds: timestamps this close to an instant count as on it


class VideoSourceWarning(UserWarning):
    """Frames were lost: undecodable or missing media, or a live source that disconnected."""


class VideoSource:
    """Iterator of ``(timestamp_s, frame)``, frame an RGB uint8 HxWx3 numpy array; use as a context manager.

    Readable while iterating:
      source            what was opened (a path, ``camera N``, a URL with its secrets masked by
                        ``sources.masked_url``, ``iterable``)
      fps               the requested sampling rate (None: every frame)
      source_fps        the source's frame rate (container's, given, or measured for live sources)
      frames_read       frames decoded or taken from the source, sampled or not
      frames_delivered  frames yielded to the caller
      frames_dropped    sampled frames never delivered because the consumer was too slow
      frames_lost       frames the media promised but could not be decoded
      problems          one line per problem seen; lost frames and disconnects were also warned
                        once each (``VideoSourceWarning``), saying where they happened
      timestamp_source  where timestamps come from: pos_msec, frame_index, wall_clock or given
    Subclasses provide ``_raw()``: ``(t, get)`` per source frame, ``get()`` returning its RGB
    pixels (or None if they cannot be had) until the next frame is read.
    """

    def __init__(self, name: str, *, fps: Optional[float], max_seconds: Optional[float], realtime: bool,
                 clock: Callable[[], float], sleep: Callable[[float], None], source_fps: Optional[float] = None):
        self.source, self.fps, self.max_seconds, self.source_fps = name, fps, max_seconds, source_fps
        self.frames_read = self.frames_delivered = self.frames_dropped = self.frames_lost = 0
        self.problems: list[str] = []
        self.timestamp_source = "frame_index"
        self.closed = False
        self._realtime, self._clock, self._sleep = realtime, clock, sleep
        self._unwarned: collections.deque[str] = collections.deque()
        self._stream: Optional[Iterator] = None
        self._pending = None
        self._start: Optional[float] = None

    def _raw(self) -> Iterator[tuple[float, Callable[[], Optional[np.ndarray]]]]:
        raise NotImplementedError

    def _problem(self, message: str, lost: int = 0, warn: bool = True) -> None:
        """Record a problem; one that costs frames is warned (once, from the consumer's thread)."""
        self.problems.append(message)
        self.frames_lost += lost
        if warn:
            self._unwarned.append(f"{self.source}: {message}")

    def _flush_warnings(self) -> None:
        while self._unwarned:
            warnings.warn(self._unwarned.popleft(), VideoSourceWarning, stacklevel=3)

    def _samples(self) -> Iterator[tuple[float, np.ndarray]]:
        """The sampled ``(t, frame)`` pairs of ``_raw()`` before ``max_seconds``."""
        interval = 1.0 / self.source_fps if self.source_fps else None
        sampler = Sampler(self.fps, interval)
        limit = math.inf if self.max_seconds is None else self.max_seconds - EPS
        raw = self._raw()
        try:
            for t, get in raw:
                if t >= limit:
                    break
                yield from sampler.offer(t, get)
            yield from sampler.finish(limit)
        finally:
            raw.close()

    def _next_sample(self):
        if self._stream is None:
            self._stream = self._samples()
        return next(self._stream)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[float, np.ndarray]:
        if self.closed:
            raise StopIteration
        try:
            item, self._pending = (self._pending or self._next_sample()), None
            if self._realtime:
                item = self._pace(item)
        finally:
            self._flush_warnings()
        self.frames_delivered += 1
        return item

    def _pace(self, item):
        """Hold ``item`` until its wall-clock time; when late, skip to the newest frame already due."""
        now = self._clock()
        if self._start is None:
            self._start = now - item[0]
        while self._start + item[0] <= now:
            try:
                nxt = self._next_sample()
            except StopIteration:
                return item
            if self._start + nxt[0] > now:
                self._pending = nxt
                return item
            self.frames_dropped += 1
            item = nxt
        self._sleep(self._start + item[0] - now)
        return item

    def close(self) -> None:
        """Stop reading and release the source; frames already yielded stay with the caller."""
        self.closed = True
        if self._stream is not None:
            self._stream.close()
        self._pending = None
        self._flush_warnings()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"{type(self).__name__}({self.source!r}, fps={self.fps}, source_fps={self.source_fps}, "
                f"delivered={self.frames_delivered}, dropped={self.frames_dropped}, lost={self.frames_lost})")


class Sampler:
    """Picks, for each instant k / fps, the frame with the nearest timestamp (ties to the later one).

    Frames are offered in timestamp order; each is delivered at most once and instants past half
    a frame interval after the last frame go unanswered. ``get()`` (the pixels) is called only for
    a frame that may be chosen: the first at or after an instant, or the last before it when the
    next frame is expected (``interval`` later, else after the last gap seen) beyond the instant;
    after a longer gap the later frame answers. ``fps=None`` delivers every frame.
    """

    def __init__(self, fps: Optional[float], interval: Optional[float] = None):
        self.fps, self.interval = fps, interval
        self.k = 0
        self.prev_t: Optional[float] = None
        self.prev_done = True  # the previous frame was delivered (or there is none)
        self.held = None  # (t, frame) of the previous frame when it may still answer the instant
        self.gap: Optional[float] = None

    def _instant(self) -> float:
        return self.k / self.fps

    def _skip_before(self, x: float) -> None:
        """Consume the instants before x (they belong to a frame already delivered)."""
        self.k = max(self.k, math.ceil(x * self.fps - EPS * self.fps))

    def offer(self, t: float, get: Callable[[], Optional[np.ndarray]]) -> list[tuple[float, np.ndarray]]:
        if self.fps is None:
            frame = get()
            return [] if frame is None else [(t, frame)]
        out = []
        if self.prev_t is not None:
            mid = (self.prev_t + t) / 2
            if not self.prev_done and self.held is not None and self._instant() < mid - EPS:
                out.append(self.held)
                self.prev_done = True
            if self.prev_done:
                self._skip_before(mid)
            self.gap = t - self.prev_t
        self.held, self.prev_t, self.prev_done = None, t, False
        if t + EPS >= self._instant():
            frame = get()
            if frame is not None:
                out.append((t, frame))
                self.prev_done = True
                self.k = max(self.k, math.floor((t + EPS) * self.fps) + 1)
        else:
            gap = self.interval or self.gap
            if gap is None or self._instant() < t + gap:
                frame = get()
                self.held = None if frame is None else (t, frame)
        return out

    def finish(self, limit: float = math.inf) -> list[tuple[float, np.ndarray]]:
        """At the end of the source: the last frame, if it is the nearest to the next instant."""
        if self.fps is None or self.held is None or self.prev_done:
            return []
        s, half = self._instant(), (self.interval or self.gap or 0.0) / 2
        return [self.held] if s < limit and s < self.prev_t + half - EPS else []


class IterableSource(VideoSource):
    """Frames from an iterable: bare frames at ``source_fps``, or ``(timestamp_s, frame)`` pairs.

    Pulled in the consumer's thread (nothing is dropped unless ``realtime`` pacing falls behind).
    """

    def __init__(self, items, *, source_fps: Optional[float], **common):
        pairs = source_fps is None
        super().__init__("iterable of (timestamp_s, frame) pairs" if pairs else "iterable of frames",
                         source_fps=source_fps, **common)
        self.timestamp_source = "given" if pairs else "frame_index"
        self._items = iter(items)

    def _raw(self):
        last = -math.inf
        for i, item in enumerate(self._items):
            looks_like_pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], numbers.Real)
            if self.timestamp_source == "given":
                if not looks_like_pair:
                    raise TypeError(f"item {i} of the iterable is not a (timestamp_s, frame) pair; "
                                    "for bare frames pass source_fps=<their rate>")
                t, frame = float(item[0]), item[1]
                if not t > last:
                    raise ValueError(f"timestamps must increase: item {i} has {t} s after {last} s")
                last = t
            elif looks_like_pair:
                raise TypeError(f"item {i} looks like a (timestamp_s, frame) pair; pass pairs without source_fps")
            else:
                t, frame = i / self.source_fps, item
            frame = rgb_frame(frame, f"item {i} of the iterable")
            self.frames_read += 1
            yield t, (lambda f=frame: f)


def rgb_frame(frame, where: str) -> np.ndarray:
    """``frame`` as an RGB uint8 HxWx3 array (PIL images and arrays accepted), else TypeError naming ``where``."""
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"{where}: expected an RGB uint8 HxWx3 frame, got dtype {arr.dtype} shape {arr.shape}")
    return arr


def check_rate(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number of frames per second or None, got {value!r}")
    return float(value)
