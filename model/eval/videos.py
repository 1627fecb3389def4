"""Finding a benchmark's video under --video-root, and decoding it once, by timestamps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np


def video_candidates(video: str, root: Optional[str | os.PathLike]) -> list[Path]:
    """Where ``video`` (as written in the annotations) may be: the path under the root, then its
    file name directly under the root (StreamingBench writes "./videos/sample_1_real.mp4")."""
    path = Path(video)
    if path.is_absolute() or root is None:
        return [path]
    root = Path(root)
    rel = Path(os.path.normpath(video.lstrip("/")))
    return list(dict.fromkeys([root / rel, root / path.name]))


def resolve_video(video: str, root: Optional[str | os.PathLike]) -> Optional[Path]:
    """The first candidate that is a file, or None."""
    return next((p for p in video_candidates(video, root) if p.is_file()), None)


def decode_video(path: str | os.PathLike, fps: float, until: float) -> tuple[list[float], list[np.ndarray]]:
    """Timestamps and RGB uint8 frames sampled at ``fps`` by timestamp, up to ``until`` seconds.

    A frame has arrived by time t when its timestamp is <= t (the official pipelines cut the clip
    [0, t]). Decoding stops after the last frame at or before ``until`` (the video's latest question).
    """
    from ..sources import open_video  # the project's one video source (sampling by timestamps)

    timestamps, frames = [], []
    with open_video(str(path), fps=fps, max_seconds=until + 1.0 / fps) as source:
        for t, frame in source:
            if t > until + 1e-6:
                break
            timestamps.append(float(t))
            frames.append(frame)
    return timestamps, frames
