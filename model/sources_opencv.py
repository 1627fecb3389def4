"""OpenCV file backend of ``open_video``: ``FileSource``, decoded as it goes in the consumer's
thread, damage and truncation detected and reported (cameras and URLs: ``sources_live.py``).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import cv2

from .sources import masked_url
from .video_source import VideoSource

MAX_RETRIES = 256  # grabs retried in a row after a decode failure (each skips one undecodable packet)


class FileSource(VideoSource):
    """A video file. ``grab()`` decodes every frame; pixels are converted only for frames the sampler may pick.

    Timestamps are the presentation time (``CAP_PROP_POS_MSEC``) while it increases, else
    frame_index / source_fps. ``frame_count`` is the container's promise (None if unknown): a
    decode failure before it is retried past the damage, and each loss is warned once.
    """

    def __init__(self, path: Union[str, os.PathLike], **common):
        path = os.fspath(path)
        name = masked_url(path)  # a URL of a scheme open_video does not stream (ftp://) is shown masked
        if not os.path.exists(path):
            raise ValueError(f"Cannot open video: {name}: no such file")
        if os.path.isdir(path):
            raise ValueError(f"Cannot open video: {name} is a directory, not a video file")
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            cap.release()
            raise ValueError(f"Cannot open video: {name}: OpenCV cannot read it (not a video, an unsupported "
                             "format, or a container whose index is missing, as in an mp4 cut short)")
        fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
        super().__init__(name, source_fps=fps if math.isfinite(fps) and 0 < fps <= 1000 else None, **common)
        self.frame_count: Optional[int] = int(count) if math.isfinite(count) and 0 < count < 1e9 else None
        self.timestamp_source = "pos_msec"
        if self.source_fps is None:
            self._problem("the container gives no frame rate; where timestamps fall back to the frame index, "
                          "30 fps is assumed", warn=False)
        self._cap, self._index, self._last_index, self._last_t = cap, -1, -1, None
        self._base, self._repeats = (0, 0.0), 0  # (index, t) that frame_index timestamps count from
        self._failed = self._skipped = 0  # frames skipped before the current one; all reported so far
        if not self._advance():  # fail here, not later: never an empty video
            cap.release()
            raise ValueError(f"Cannot read any frame from {name}: OpenCV opens it but decodes no frame")

    @property
    def _rate(self) -> float:
        return self.source_fps or 30.0

    def _grab(self) -> bool:
        """Decode the next frame (no pixels yet); False at the end or on a decode failure."""
        try:
            if not self._cap.grab():
                return False
        except cv2.error:
            return False
        pos = self._cap.get(cv2.CAP_PROP_POS_FRAMES)
        self._index = int(pos) - 1 if math.isfinite(pos) and int(pos) - 1 > self._index else self._index + 1
        return True

    def _advance(self) -> bool:
        """Grab the next decodable frame, past damage if need be; False at the end.

        OpenCV fails one grab per undecodable packet and goes on with the next, so a failure
        before the promised frame count is retried (at most MAX_RETRIES grabs in a row).
        """
        if self._grab():
            return True
        left = (self.frame_count or 0) - self._index - 1
        for failed in range(1, min(left, MAX_RETRIES)):
            if self._grab():
                self._failed = failed
                return True
        return False

    def _retrieve(self):
        try:
            ok, bgr = self._cap.retrieve()
        except cv2.error:
            ok, bgr = False, None
        if not ok or bgr is None:
            self._problem(f"frame {self._index} was decoded but its pixels could not be converted", lost=1)
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _timestamp(self) -> Optional[float]:
        """The grabbed frame's time: POS_MSEC while it increases, then frame_index / source_fps.

        None for a repeated output (its POS_MSEC equals the last one after POS_MSEC had been
        increasing, as a decoder flushing after damage does): the caller skips it. A third
        repeat in a row, or no increase from the start, switches to frame_index timestamps.
        """
        if self.timestamp_source == "pos_msec":
            t = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            usable = math.isfinite(t) and t >= 0
            if usable and (self._last_t is None or t > self._last_t):
                self._base, self._repeats = (self._index, t), 0
                return t
            if usable and self.frames_read >= 2 and self._repeats < 2:
                self._repeats += 1
                self._problem(f"a decoded frame repeated the timestamp t={t:.3f} s after frame {self._index - 1}: "
                              "skipped as a duplicate", warn=False)
                return None
            self.timestamp_source = "frame_index"
            self._problem(f"OpenCV's CAP_PROP_POS_MSEC gave {t:.3f} s at frame {self._index} after {self._last_t} s; "
                          f"timestamps continue from the frame index at {self._rate:g} fps", warn=False)
        index, t0 = self._base
        return t0 + (self._index - index) / self._rate

    def _report_skip(self, t: float) -> None:
        """Report the frames skipped before the frame at ``t`` (counted by timestamps when they are reliable)."""
        lost = self._failed
        if self._last_t is not None and self.timestamp_source == "pos_msec":
            lost = max(lost, round((t - self._last_t) * self._rate) - 1)
            self._index = max(self._index, self._last_index + lost + 1)  # OpenCV's count skips failed grabs
            self._base = (self._index, t)
        where = f"between t={self._last_t:.3f} s and t={t:.3f} s" if self._last_t is not None else f"before t={t:.3f} s"
        self._problem(f"{lost} frame{'s' if lost != 1 else ''} {where} could not be decoded (damaged stream); "
                      f"decoding resumed at frame {self._index}, and frames up to the next keyframe may show "
                      "artifacts", lost=lost)
        self._skipped += lost
        self._failed = 0

    def _raw(self):
        try:
            while True:
                t = self._timestamp()
                if t is not None:  # None: a repeated output, skipped
                    if self._failed:
                        self._report_skip(t)
                    self._last_t, self._last_index = t, self._index
                    self.frames_read += 1
                    yield t, self._retrieve
                if not self._advance():
                    break
            self._check_end()
        finally:
            self._cap.release()

    def _check_end(self) -> None:
        """At the end: frames promised by the container but neither decoded nor reported yet."""
        missing = (self.frame_count or 0) - self.frames_read - self._skipped
        if missing > 0:
            self._problem(f"{missing} of the {self.frame_count} frames the container promises could not be decoded "
                          f"(truncated or damaged file); decoding stopped after frame {self._index} "
                          f"(t={self._last_t:.3f} s)", lost=missing)

    def close(self) -> None:
        super().close()
        self._cap.release()
