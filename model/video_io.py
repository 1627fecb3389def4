"""Reading frames from a video file (OpenCV), or the synthetic video when no file is given."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def read_video(path: str | os.PathLike, seconds: Optional[float] = None) -> tuple[list[np.ndarray], float]:
    """The first ``seconds`` (all if None) of a video as RGB uint8 frames, and its fps."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"Cannot open video: {path}; set VIDEO_PATH to a readable video file")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    limit = None if seconds is None else int(round(seconds * fps))
    frames = []
    try:
        while limit is None or len(frames) < limit:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"Cannot read any frame from {path}")
    return frames, float(fps)


def load_frames(path: Optional[str], seconds: float, fps: float = 30.0, size: int = 448) -> tuple[list[np.ndarray], float]:
    """Frames of ``path`` (up to ``seconds``), or ``seconds`` of the synthetic video at ``fps``."""
    from .testing import synthetic_frames

    if path:
        return read_video(path, seconds)
    return synthetic_frames(int(round(seconds * fps)), size, size), fps
