"""What a benchmark question is once read: an ``Event`` (one question at one moment of one video).

Both benchmarks are normalised to events so that the runner, the scorers and the report never
look at a benchmark's file format. A forward-active OVO-Bench question asked at five probe
times is five events (``<id>#0`` .. ``<id>#4``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

OVO = "ovo"
STREAMINGBENCH = "streamingbench"
BENCHMARKS = (OVO, STREAMINGBENCH)

# OVO-Bench's three categories (its constant.py / paper, Table 1).
OVO_TASKS = {
    "real-time": ("OCR", "ACR", "ATR", "STU", "FPD", "OJR"),
    "backward": ("EPM", "ASI", "HLD"),
    "forward": ("REC", "SSR", "CRR"),
}
# StreamingBench's three categories (task_type strings as spelled in its question files).
STREAMINGBENCH_TASKS = {
    "real-time": ("Object Recognition", "Attribute Recognition", "Action Recognition", "Text-Rich Understanding",
                  "Spatial Understanding", "Event Understanding", "Counting", "Clips Summarize",
                  "Causal Reasoning", "Prospective Reasoning"),
    "omni-source": ("Emotion Recognition", "Scene Understanding", "Source Discrimination", "Multimodal Alignment"),
    "contextual": ("Misleading Context Understanding", "Anomaly Context Understanding",
                   "Sequential Question Answering", "Proactive Output"),
}
CATEGORIES = {OVO: tuple(OVO_TASKS), STREAMINGBENCH: tuple(STREAMINGBENCH_TASKS)}
_TASK_CATEGORY = {
    OVO: {task: cat for cat, tasks in OVO_TASKS.items() for task in tasks},
    STREAMINGBENCH: {task: cat for cat, tasks in STREAMINGBENCH_TASKS.items() for task in tasks},
}
UNKNOWN_CATEGORY = "other"


def category_of(benchmark: str, task: str) -> str:
    """The benchmark's category of ``task`` ("other" for a task the benchmark does not define)."""
    return _TASK_CATEGORY[benchmark].get(task, UNKNOWN_CATEGORY)


@dataclass(frozen=True)
class Event:
    """One multiple-choice question asked at ``t_seconds`` of ``video``."""

    benchmark: str
    event_id: str  # unique within the annotation file; the resume key (with the mode)
    video: str  # as written in the annotations (relative to --video-root unless absolute)
    t_seconds: float
    question: str  # the text asked (forward OVO tasks: the probe question built from the entry)
    options: tuple[str, ...]  # option texts, without letters
    answer_index: int
    task: str
    category: str
    entry_index: int  # index of the annotation entry this event came from
    probe: Optional[int] = None  # forward OVO tasks: index in test_info

    @property
    def answer(self) -> str:
        return self.options[self.answer_index]


@dataclass(frozen=True)
class Problem:
    """An annotation entry (or a video) that was skipped, and why."""

    index: Optional[int]  # annotation entry index (None for a video-level problem)
    reason: str
    video: Optional[str] = None

    def __str__(self) -> str:
        where = f"entry {self.index}" if self.index is not None else f"video {self.video}"
        return f"{where}: {self.reason}"


@dataclass
class Annotations:
    """What a reader returns: the events, and the entries it skipped."""

    benchmark: str
    events: list[Event] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    entries: int = 0  # entries in the file

    def videos(self) -> list[str]:
        """Distinct videos in first-appearance order."""
        return list(dict.fromkeys(e.video for e in self.events))


def parse_timestamp(text: str) -> float:
    """ "HH:MM:SS", "MM:SS" or "SS" (fractions allowed in the last field) -> seconds.

    Each field is plain digits (no sign, no "nan"/"inf", no exponent): anything else raises ValueError.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"time_stamp must be a string like '00:03:10', got {text!r}")
    shown = text if len(text) <= 40 else text[:37] + "..."
    parts = text.strip().split(":")
    if len(parts) > 3:
        raise ValueError(f"time_stamp {shown!r} has more than three fields; expected HH:MM:SS")
    if not all(_FIELD.fullmatch(p) for p in parts[:-1]) or not _LAST_FIELD.fullmatch(parts[-1]):
        raise ValueError(f"time_stamp {shown!r} is not HH:MM:SS (digits only, a fraction in the last field)")
    values = [float(p) for p in parts]
    if any(v >= 60 for v in values[1:]):
        raise ValueError(f"time_stamp {shown!r} is out of range; expected HH:MM:SS with MM, SS < 60")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    if not math.isfinite(seconds):
        raise ValueError(f"time_stamp {shown!r} is out of range")
    return seconds


_FIELD = re.compile(r"[0-9]+")
_LAST_FIELD = re.compile(r"[0-9]+(?:\.[0-9]+)?")
