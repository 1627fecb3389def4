"""A miniature streaming benchmark for the runner's tests: synthetic videos and annotations.

Three videos with known events (shapes appearing at known times); annotations in both formats
(OVO-Bench with forward probes and several realtime entries, several questions at one
timestamp, a malformed entry, a missing video; StreamingBench with a malformed answer and a
non-object entry).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

H, W, VIDEO_FPS = 84, 112, 4
# video -> (seconds, [(appears_at_s, shape, BGR colour)])
VIDEOS = {
    "ovo/v0.mp4": (4.0, [(1.0, "square", (0, 0, 255)), (2.5, "circle", (255, 0, 0))]),
    "ovo/v1.mp4": (3.0, [(0.5, "circle", (0, 200, 0)), (2.0, "square", (0, 220, 220))]),
    "videos/sb0.mp4": (3.0, [(1.0, "square", (0, 0, 255)), (2.0, "circle", (255, 0, 0))]),
}
COLOURS = ["red", "blue", "green", "yellow"]

OVO_ANNOTATIONS = [
    {"id": 0, "task": "EPM", "video": "ovo/v0.mp4", "realtime": 2.0, "question": "Which colour appeared first?",
     "options": COLOURS, "gt": 0},
    {"id": 1, "task": "STU", "video": "ovo/v0.mp4", "realtime": 2.0, "question": "Where is the square?",
     "options": ["left", "right", "top"], "gt": 0},  # same timestamp as id 0
    {"id": 2, "task": "OCR", "video": "ovo/v1.mp4", "realtime": 1.5, "question": "What colour is the circle?",
     "options": COLOURS, "gt": 2},
    {"id": 3, "task": "REC", "video": "ovo/v0.mp4", "activity": "show a new shape",
     "test_info": [{"realtime": 1.0, "count": 1}, {"realtime": 2.5, "count": 2}, {"realtime": 3.5, "count": 2}]},
    {"id": 4, "task": "SSR", "video": "ovo/v1.mp4",
     "test_info": [{"realtime": 0.5, "step": "draw a yellow square", "type": 0},
                   {"realtime": 2.0, "step": "draw a yellow square", "type": 1}]},
    {"id": 5, "task": "CRR", "video": "ovo/v0.mp4", "question": "What colour is the circle?",
     "test_info": [{"realtime": 1.0, "type": 0}, {"realtime": 3.0, "type": 1}]},
    {"id": 8, "task": "CRR", "video": "ovo/v1.mp4", "question": "Which shape came second?",  # one question, 2 probes
     "options": ["circle", "square"], "gt": 1, "test_info": [{"realtime": 1.0}, {"realtime": 2.5}]},
    {"id": 6, "task": "EPM", "video": "ovo/v1.mp4", "realtime": 1.0, "question": "Which shape?",
     "options": ["circle", "square"], "gt": 5},  # malformed: gt out of range
    {"id": 7, "task": "ATR", "video": "ovo/missing.mp4", "realtime": 1.0, "question": "What colour?",
     "options": COLOURS, "gt": 1},  # its video does not exist
]
OVO_EVENTS = 13  # 3 single questions + 3 REC + 2 SSR + 2 + 2 CRR probes + the missing video's question

SB_ANNOTATIONS = [
    {"video_path": "./videos/sb0.mp4", "questions": [
        {"task_type": "Object Recognition", "question": "What shape is on screen right now?", "time_stamp": "00:00:02",
         "options": ["A. A square.", "B. A circle.", "C. A triangle.", "D. Nothing."], "answer": "B"},
        {"task_type": "Counting", "question": "How many shapes are visible?", "time_stamp": "00:00:02",
         "options": ["A. 0", "B. 1", "C. 2", "D. 3"], "answer": "C"},
        {"task_type": "Counting", "question": "How many shapes?", "time_stamp": "00:00:01",
         "options": ["A. 0", "B. 1"], "answer": "Q"},  # malformed: answer is no option letter
    ]},
    {"video_path": "./videos/sb0.mp4", "questions": [
        {"task_type": "Emotion Recognition", "question": "How does the scene feel?", "time_stamp": "00:01",
         "options": ["A. Calm", "B. Tense"], "answer": "A"},
        {"task_type": "Misleading Context Understanding", "question": "Was there a triangle?", "time_stamp": "00:00:03",
         "options": ["A. Yes", "B. No"], "answer": "B"}]},
    "not an entry",  # malformed: not an object
]


def _write_video(path: Path, seconds: float, shapes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (W, H))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(int(seconds * VIDEO_FPS)):
        img = np.full((H, W, 3), 40, np.uint8)
        for k, (at, shape, colour) in enumerate(shapes):
            if i / VIDEO_FPS >= at:
                x, y = 25 + 50 * k, 42
                if shape == "square":
                    cv2.rectangle(img, (x - 12, y - 12), (x + 12, y + 12), colour, -1)
                else:
                    cv2.circle(img, (x, y), 12, colour, -1)
        writer.write(img)
    writer.release()


def write_minibench(root: Path) -> Path:
    """The videos under ``root/videos_root`` and ``root/ovo.json``, ``root/sb.json``; returns ``root``."""
    for rel, (seconds, shapes) in VIDEOS.items():
        _write_video(root / "videos_root" / rel, seconds, shapes)
    (root / "ovo.json").write_text(json.dumps(OVO_ANNOTATIONS))
    (root / "sb.json").write_text(json.dumps(SB_ANNOTATIONS))
    return root
