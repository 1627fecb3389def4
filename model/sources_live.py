"""OpenCV live backend of ``open_video``: ``LiveSource``, a camera or URL read by a background
thread into a bounded buffer that keeps the newest frames (files: ``sources_opencv.py``).
"""
from __future__ import annotations

import collections
import math
import numbers
import threading
from typing import Optional, Union

import cv2

from .sources import masked_url
from .video_source import VideoSource

MAX_TIMEOUT_S = (2 ** 31 - 1) // 1000  # OpenCV's open/read timeouts are int milliseconds
MAX_BAD_READS = 16  # failed reads in a row (within timeout_s) taken as undecodable frames; more: a disconnect


class LiveSource(VideoSource):
    """A camera index or stream URL, read by a background thread into a bounded buffer.

    Drop policy: the sampled frames wait in a buffer of ``buffer_frames`` (default 1); when it is
    full the oldest is dropped (``frames_dropped``), so a slow consumer always gets the newest.
    Timestamps are wall-clock seconds since the first frame; ``source_fps`` is the measured rate.
    A frame that fails to decode while the connection goes on (OpenCV fails one read per damaged
    frame) is counted in ``frames_lost`` and warned, and reading goes on; more than
    ``MAX_BAD_READS`` failed reads in a row, or none succeeding for ``timeout_s``, is a disconnect.
    A source that stops delivering raises ConnectionError (naming it) once the buffered frames are
    taken; with ``reconnect=N`` it is reopened up to N times in a row (``reconnect_delay_s``
    apart) first, each disconnect warned once. ``timeout_s`` bounds opening and each read of a URL.
    """

    def __init__(self, source: Union[int, str], *, buffer_frames: int, reconnect: int, reconnect_delay_s: float,
                 timeout_s: float, realtime: bool, **common):
        for key, value, low in (("buffer_frames", buffer_frames, 1), ("reconnect", reconnect, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        if not (isinstance(timeout_s, numbers.Real) and 0 < timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S}] (OpenCV takes "
                             f"milliseconds as a 32-bit int), got {timeout_s!r}")
        if not (isinstance(reconnect_delay_s, numbers.Real) and 0 <= reconnect_delay_s < math.inf):
            raise ValueError(f"reconnect_delay_s must be a finite number of seconds >= 0, got {reconnect_delay_s!r}")
        super().__init__(f"camera {source}" if isinstance(source, int) else masked_url(source),
                         realtime=False, **common)
        self.timestamp_source = "wall_clock"
        self.reconnects = 0
        self._target, self._timeout_ms = source, int(timeout_s * 1000)
        self._reconnect, self._reconnect_delay_s = reconnect, reconnect_delay_s
        self._buffer, self._buffer_frames = collections.deque(), buffer_frames
        self._cond, self._stop = threading.Condition(), threading.Event()
        self._ended, self._error = False, None
        self._arrivals: collections.deque = collections.deque(maxlen=30)
        self._cap = self._open()
        if self._cap is None:
            hint = " (is the camera connected and free?)" if isinstance(source, int) else ""
            raise ConnectionError(f"Cannot open video stream {self.source}{hint}")
        self._thread = threading.Thread(target=self._run, name=f"video-source {self.source}", daemon=True)
        self._thread.start()

    def _open(self):
        if isinstance(self._target, int):
            cap = cv2.VideoCapture(self._target)
        else:
            cap = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self._timeout_ms,
                                                                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._timeout_ms])
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _raw(self):
        t0, last_t, failures = None, None, 0
        bad, last_ok = 0, self._clock()  # failed reads since the last frame (or the opening), and when that was
        try:
            while not self._stop.is_set():
                try:
                    ok, bgr = self._cap.read()
                except cv2.error:
                    ok, bgr = False, None
                if not ok or bgr is None:
                    bad += 1  # a frame that does not decode, or the end of the connection: the next reads tell
                    if bad <= MAX_BAD_READS and self._clock() - last_ok < self._timeout_ms / 1000:
                        continue
                    failures, bad = self._reopen(failures, t0), 0
                    last_ok = self._clock()
                    continue
                failures, now = 0, self._clock()
                t0 = now if t0 is None else t0
                if bad:
                    self._damaged(bad, last_t, now - t0)
                bad, last_ok, last_t = 0, now, now - t0
                self._arrivals.append(now)
                if len(self._arrivals) > 1 and self._arrivals[-1] > self._arrivals[0]:
                    self.source_fps = (len(self._arrivals) - 1) / (self._arrivals[-1] - self._arrivals[0])
                self.frames_read += 1
                yield now - t0, (lambda b=bgr: cv2.cvtColor(b, cv2.COLOR_BGR2RGB))
        finally:
            if self._cap is not None:
                self._cap.release()

    def _damaged(self, frames: int, before: Optional[float], after: float) -> None:
        """Frames that failed to decode while the connection went on: lost, warned, not a disconnect."""
        where = f"between t={before:.2f} s and t={after:.2f} s" if before is not None else f"before t={after:.2f} s"
        self._problem(f"{frames} frame{'s' if frames != 1 else ''} {where} could not be decoded (damaged data); "
                      "reading went on", lost=frames)

    def _reopen(self, failures: int, t0: Optional[float]) -> int:
        """After a failed read: reopen (if attempts are left) or raise ConnectionError; the new failure count."""
        self._cap.release()
        self._cap = None
        at = f"t={self._clock() - t0:.2f} s" if t0 is not None else "the start"
        if failures == 0:
            self._problem(f"disconnected at {at} after {self.frames_read} frames")
        while failures < self._reconnect and not self._stop.is_set():
            failures += 1
            self._sleep(self._reconnect_delay_s)
            self._cap = self._open()
            if self._cap is not None:
                self.reconnects += 1
                self._problem(f"reconnected (attempt {failures} of {self._reconnect})", warn=False)
                return failures
        if self._stop.is_set():
            return failures
        tried = f"; {self._reconnect} reconnect attempts failed" if self._reconnect else "; pass reconnect=N to retry"
        raise ConnectionError(f"Video stream {self.source} disconnected at {at} after {self.frames_read} frames{tried}")

    def _run(self) -> None:
        try:
            for item in self._samples():
                with self._cond:
                    if len(self._buffer) >= self._buffer_frames:
                        self._buffer.popleft()
                        self.frames_dropped += 1
                    self._buffer.append(item)
                    self._cond.notify_all()
                if self._stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - handed to the consumer's thread, raised by __next__
            self._error = e
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def __next__(self):
        item = error = None
        with self._cond:
            while not self._buffer and not self._ended and not self.closed:
                self._cond.wait(0.2)
            if self._buffer:
                item = self._buffer.popleft()
            else:
                error, self._error = self._error, None
        self._flush_warnings()
        if item is not None:
            self.frames_delivered += 1
            return item
        if error is not None:
            raise error
        raise StopIteration

    def close(self) -> None:
        """Stop the reader thread (within one read timeout) and release the source."""
        self.closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self._timeout_ms / 1000 + self._reconnect_delay_s + 1)
        with self._cond:
            self._buffer.clear()
            self._cond.notify_all()
        self._flush_warnings()

