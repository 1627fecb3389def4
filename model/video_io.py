"""Reading frames from a video file (through ``open_video``), or the synthetic video when no file is given."""
from __future__ import annotations

import itertools
import os
from typing import Optional

import numpy as np

from .sources import open_video
from .synthetic import synthetic_frames


def read_video(path: str | os.PathLike, seconds: Optional[float] = None) -> tuple[list[np.ndarray], float]:
    """The first ``seconds`` (all if None) of a video as RGB uint8 frames at the file's own rate, and that rate.

    ``seconds`` keeps ``round(seconds * fps)`` frames. A missing or unreadable file raises
    ValueError ("Cannot open video: ..."); frames lost to damage are warned (``VideoSourceWarning``).
    """
    try:
        source = open_video(path, fps=None)
    except ValueError as e:
        raise ValueError(f"{e}; set VIDEO_PATH to a readable video file") from e
    with source:
        fps = source.source_fps or 30.0
        limit = None if seconds is None else int(round(seconds * fps))
        frames = [frame for _, frame in itertools.islice(source, limit)]
    if not frames:
        raise ValueError(f"Cannot read any frame from {path} in its first {seconds} s")
    return frames, float(fps)


def load_frames(path: Optional[str], seconds: float, fps: float = 30.0, size: int = 448) -> tuple[list[np.ndarray], float]:
    """Frames of ``path`` (up to ``seconds``), or ``seconds`` of the synthetic video at ``fps``."""
    if path:
        return read_video(path, seconds)
    return synthetic_frames(int(round(seconds * fps)), size, size), fps
