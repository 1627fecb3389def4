"""The synthetic video: coloured shapes that appear one after another and drift right.

Library code (``model.video_io`` falls back to it when no video file is given); the test
fixtures in ``model.testing`` re-export it.
"""
from __future__ import annotations

import os

import numpy as np

_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220)]
_SHAPES = ["circle", "square", "triangle"]


def synthetic_frames(n: int, height: int = 448, width: int = 448, seed: int = 0) -> list[np.ndarray]:
    """n RGB uint8 frames: a shape of a new colour appears every ~n/6 frames and drifts right."""
    import cv2

    rng = np.random.default_rng(seed)
    frames, shown = [], []
    every = max(1, n // 6)
    for i in range(n):
        if i % every == 0:
            k = len(shown)
            shown.append((_SHAPES[k % 3], _COLOURS[k % len(_COLOURS)],
                          int(rng.integers(width // 8, width // 2)), int(rng.integers(height // 6, 5 * height // 6))))
        img = np.full((height, width, 3), 30, np.uint8)
        for shape, colour, x0, y in shown:
            x, r = (x0 + 2 * i) % width, max(4, min(height, width) // 12)
            if shape == "circle":
                cv2.circle(img, (x, y), r, colour, -1)
            elif shape == "square":
                cv2.rectangle(img, (x - r, y - r), (x + r, y + r), colour, -1)
            else:
                pts = np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)
                cv2.fillPoly(img, [pts], colour)
        frames.append(img)
    return frames


def write_synthetic_video(path: str | os.PathLike, seconds: float = 3.0, fps: float = 30.0,
                          height: int = 448, width: int = 448) -> str:
    """Write synthetic_frames as an mp4 (OpenCV, mp4v) and return its path."""
    import cv2

    frames = synthetic_frames(int(round(seconds * fps)), height, width)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for f in frames:
        writer.write(f[:, :, ::-1].copy())  # RGB -> BGR
    writer.release()
    return str(path)
