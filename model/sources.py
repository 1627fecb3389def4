"""Video sources: a file, a camera, a stream URL or an iterable of frames, sampled by timestamp.

``open_video`` returns a ``VideoSource``: an iterator of ``(timestamp_s, frame)`` with ``frame``
an RGB uint8 HxWx3 numpy array, decoded as it goes (memory does not grow with the video's
length). Its counters and problems can be read while iterating. This file holds the entry point;
``model/video_source.py`` the source base, the timestamp sampler, pacing and iterables; the
OpenCV backends (file decoding with loss detection, the live capture thread with its bounded
buffer) are in ``model/sources_opencv.py`` and ``model/sources_live.py``.
"""
from __future__ import annotations

import numbers
import os
import re
import time
from typing import Callable, Optional
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from .arguments import MAX_FPS, MIN_FPS, check_fps
# EPS, VideoSource and VideoSourceWarning are part of this module's API (re-exported)
from .video_source import EPS, IterableSource, VideoSource, VideoSourceWarning, check_rate  # noqa: F401

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
# query (or fragment) parameters whose values are masked: password, passwd, pwd, token, api_key, secret, auth,
# signature (sig), credential, in any case and as part of a longer name (access_token, X-Amz-Signature)
SECRET_PARAMETER = re.compile(r"pass|pwd|^pw$|token|key|secret|auth|sig|credential", re.IGNORECASE)


def masked_url(text: str) -> str:
    """``text`` fit for messages and logs: a URL's password (``user:***@host``) and the values of its
    query and fragment parameters whose names look secret (``?password=***``, ``api_key``, ``access_token``)
    masked. Text without ``://`` (a path) is returned as it is; a URL that cannot be parsed is hidden
    after its scheme."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if parts.password is not None:
            user = netloc.rsplit("@", 1)[0].split(":", 1)[0]
            netloc = f"{user}:***@{netloc.rsplit('@', 1)[1]}"
    except ValueError:
        return text.split("://", 1)[0] + "://*** (a URL that cannot be parsed)"
    masked = parts._replace(netloc=netloc, query=_masked_parameters(parts.query),
                            fragment=_masked_parameters(parts.fragment))
    return text if masked == parts else urlunsplit(masked)


def _masked_parameters(query: str) -> str:
    def one(pair: str) -> str:
        name, eq, _ = pair.partition("=")
        return f"{name}=***" if eq and SECRET_PARAMETER.search(unquote_plus(name)) else pair
    return "&".join(one(pair) for pair in query.split("&")) if query else query


def open_video(source, fps: Optional[float] = 2.0, realtime: bool = False, max_seconds: Optional[float] = None, *,
               source_fps: Optional[float] = None, buffer_frames: int = 1, reconnect: int = 0,
               reconnect_delay_s: float = 1.0, timeout_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> "VideoSource":
    """Open ``source`` and return a ``VideoSource`` yielding ``(timestamp_s, frame)``: RGB uint8 HxWx3 frames.

    source: a file path (str or PathLike); a camera index (int); an ``rtsp://``/``http(s)://``
        (or rtmp, udp, tcp, srt) URL; or an iterable. An iterable holds either bare frames, when
        ``source_fps`` is given (frame i is at i / source_fps), or ``(timestamp_s, frame)`` pairs
        with increasing timestamps, when it is not. Its frames must be RGB uint8 HxWx3.
    fps: the sampling rate, in [0.01, 1000] frames per second (the engine's range). For each instant k / fps the frame whose timestamp is nearest is
        delivered (ties to the later frame; each frame at most once), so a 29.97 fps file gives
        timestamps within half a source frame of 0, 0.5, 1.0, ... at fps=2. None: every frame.
    realtime: a file or iterable is released at wall-clock speed (frame t is yielded ``t`` seconds
        after the first); a consumer that falls behind gets the newest due frame and the ones it
        skipped are counted in ``frames_dropped``. Live sources are real time already.
    max_seconds: stop before timestamp ``max_seconds`` (for live sources, since the first frame).
    buffer_frames, reconnect, reconnect_delay_s, timeout_s: live sources only; see
        ``LiveSource``. A live source keeps the newest ``buffer_frames`` sampled frames.
    clock, sleep: the time functions (injected by tests).

    The returned iterator's counters (frames read, delivered, dropped, lost), ``source_fps`` and
    ``problems`` can be read while iterating (see ``VideoSource``). Close it (or use ``with``).

    Raises ValueError for a missing or unreadable file ("Cannot open video: ..."), ConnectionError
    for a camera or URL that cannot be opened, TypeError for a source of another type.
    """
    fps = check_sampling_fps(fps)
    if max_seconds is not None and not (isinstance(max_seconds, numbers.Real) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    common = dict(fps=fps, max_seconds=max_seconds, realtime=bool(realtime), clock=clock, sleep=sleep)
    if source_fps is not None and (isinstance(source, (str, os.PathLike, numbers.Integral, bytes))
                                   or not hasattr(source, "__iter__")):
        raise ValueError("source_fps is only for an iterable of bare frames; a file, camera or URL reports its own rate")
    if isinstance(source, bool) or isinstance(source, bytes):
        raise TypeError(f"source must be a path, camera index, URL or iterable of frames, got {type(source).__name__}")
    if isinstance(source, numbers.Integral) or (isinstance(source, str) and source.lower().startswith(URL_SCHEMES)):
        from .sources_live import LiveSource

        return LiveSource(source if isinstance(source, str) else int(source), buffer_frames=buffer_frames, reconnect=reconnect,
                          reconnect_delay_s=reconnect_delay_s, timeout_s=timeout_s, **common)
    if isinstance(source, (str, os.PathLike)):
        from .sources_opencv import FileSource

        return FileSource(source, **common)
    if hasattr(source, "__iter__"):
        return IterableSource(source, source_fps=check_rate("source_fps", source_fps), **common)
    raise TypeError(f"source must be a path, camera index, URL or iterable of frames, got {type(source).__name__}")


def check_sampling_fps(fps) -> Optional[float]:
    """None (every frame) or a rate in the library's range [MIN_FPS, MAX_FPS]; else ValueError naming both."""
    if fps is None:
        return None
    try:
        return check_fps(fps)
    except ValueError:
        raise ValueError(f"fps must be a number of frames per second between {MIN_FPS:g} and {MAX_FPS:g} "
                         f"(or None for every frame), got {fps!r}") from None
