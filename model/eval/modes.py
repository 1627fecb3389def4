"""Modes: what the engine holds when a question is asked.

    stream   the full streaming cache: every frame up to the question, each encoded once, as
             it arrives (in chunks of ``chunk_frames``).
    window   the recent-window baseline (SimpleStream's method): at each question the engine
             is reset and re-prefilled with only the last ``window_frames`` frames.
    reprefill  the official pipelines' method: at each question the engine is reset and
             re-prefilled with every frame up to it (one full prefill per question).
    bounded  the streaming cache under a memory budget (``StreamConfig.cache_budget_tokens``,
             ``video_window_seconds``, ``sink_frames``, ``recall_grids``): stream mode on an engine
             of its own over the same model, old video evicted as the budget requires. No parity
             check (its reference is the masked offline forward, tested in tests/test_bounded.py).

Resets keep the engine's memory (``reset(keep_memory=True)``): cache buffers and CUDA graphs
serve every video, question and mode, so timings exclude graph captures after the first use.

A mode runs one video at a time on one engine: ``start_video``, then ``advance`` to each
question's frame count (non-decreasing), then the scorers ask. Modes never share an engine's
stream: the runner runs them one after another on each decoded video.
"""
from __future__ import annotations

import bisect
import time
from typing import Optional

from ..timing import sync
from ..video_stream_inference import VideoStreamInference

PLANNED: dict = {}  # modes named but not available yet: name -> why


class Mode:
    name = "?"
    reprefills = False  # True: every question waits for a re-prefill (its ``advance``), part of its latency

    def start_video(self, engine) -> None:
        engine.reset(keep_memory=True)

    def engine_for(self, engine):
        """The engine this mode runs on, given the runner's (the same one, unless the mode needs other settings)."""
        return engine

    def advance(self, engine, frames: list, n_seen: int, fps: float) -> dict:
        """Make the engine hold this mode's view of ``frames[:n_seen]``; returns ingest statistics."""
        raise NotImplementedError

    def view(self, frames: list, n_seen: int) -> list:
        """The frames the engine holds after ``advance(frames, n_seen)`` (the offline path's input)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"mode": self.name}


class StreamMode(Mode):
    """The full streaming cache; frames since the last question are appended in chunks."""

    name = "stream"

    def __init__(self, chunk_frames: int = 8):
        self.chunk_frames = _positive_int(chunk_frames, "chunk_frames")
        self.fed = 0

    def start_video(self, engine) -> None:
        engine.reset(keep_memory=True)
        self.fed = 0

    def advance(self, engine, frames: list, n_seen: int, fps: float) -> dict:
        if n_seen < self.fed:
            raise ValueError(f"stream mode cannot go back in time: {self.fed} frames fed, asked for {n_seen}")
        new = frames[self.fed:n_seen]
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(new), self.chunk_frames):
            engine.append_frames(new[i:i + self.chunk_frames], fps=fps)
        sync()
        self.fed = n_seen
        return {"ingest_frames": len(new), "ingest_s": time.perf_counter() - t0, "frames": n_seen}

    def view(self, frames: list, n_seen: int) -> list:
        return frames[:n_seen]

    def describe(self) -> dict:
        return {"mode": self.name, "chunk_frames": self.chunk_frames}


class WindowMode(Mode):
    """Reset and re-prefill the last ``window_frames`` frames (None: all) at every question."""

    name = "window"
    reprefills = True

    def __init__(self, window_frames: Optional[int] = 16):
        self.window_frames = None if window_frames is None else _positive_int(window_frames, "window_frames")

    def advance(self, engine, frames: list, n_seen: int, fps: float) -> dict:
        window = self.view(frames, n_seen)
        sync()
        t0 = time.perf_counter()
        engine.reset(keep_memory=True)
        if window:
            engine.append_frames(window, fps=fps)
        sync()
        return {"ingest_frames": len(window), "ingest_s": time.perf_counter() - t0, "frames": len(window)}

    def view(self, frames: list, n_seen: int) -> list:
        return frames[:n_seen] if self.window_frames is None else frames[max(0, n_seen - self.window_frames):n_seen]

    def describe(self) -> dict:
        return {"mode": self.name, "window_frames": self.window_frames}


class ReprefillMode(WindowMode):
    """Reset and re-prefill every frame up to the question: what a clip cut per question costs."""

    name = "reprefill"

    def __init__(self):
        super().__init__(None)


class BoundedMode(StreamMode):
    """The streaming cache under a memory budget, on an engine of its own over the runner's model."""

    name = "bounded"

    def __init__(self, chunk_frames: int = 8, budget: Optional[dict] = None):
        super().__init__(chunk_frames)
        if not budget or (budget.get("cache_budget_tokens") is None and budget.get("video_window_seconds") is None):
            raise ValueError("bounded mode needs a memory budget: --budget-tokens N and/or --window-seconds S")
        self.budget = dict(budget)

    def engine_for(self, engine):
        """A bounded engine over ``engine``'s model (weights shared; the runner makes it once per run and warms it)."""
        return VideoStreamInference(engine.model, engine.processor, config=engine.config.replace(**self.budget))

    def advance(self, engine, frames: list, n_seen: int, fps: float) -> dict:
        out = super().advance(engine, frames, n_seen, fps)
        stats = engine.stats()
        return {**out, "cache_tokens": stats["cache_tokens"], "kept_video_s": stats["kept_video_seconds"],
                "evicted_s": stats["evicted_seconds"]}

    def view(self, frames: list, n_seen: int) -> list:
        return frames[:n_seen]  # seen once; what is still attended to is reported per record (kept_video_s)

    def describe(self) -> dict:
        return {"mode": self.name, "chunk_frames": self.chunk_frames, **self.budget}


MODES = {"stream": StreamMode, "window": WindowMode, "reprefill": ReprefillMode, "bounded": BoundedMode}


def parse_modes(text: str) -> list[str]:
    """"stream,window" -> ["stream", "window"], checked against the known and planned modes."""
    names = [n.strip() for n in text.split(",") if n.strip()] if isinstance(text, str) else list(text)
    if not names:
        raise ValueError(f"no mode given; choose from {', '.join(MODES)}")
    for name in names:
        if name in PLANNED:
            raise ValueError(f"mode {name!r} is not available yet: {PLANNED[name]}")
        if name not in MODES:
            raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a mode is listed twice: {names}")
    return names


def make_mode(name: str, chunk_frames: int = 8, window_frames: int = 16, budget: Optional[dict] = None) -> Mode:
    parse_modes([name])
    if name == "stream":
        return StreamMode(chunk_frames)
    if name == "bounded":
        return BoundedMode(chunk_frames, budget)
    return WindowMode(window_frames) if name == "window" else ReprefillMode()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def frames_up_to(timestamps: list[float], t: float, eps: float = 1e-6) -> int:
    """How many decoded frames (sorted timestamps) have arrived by time ``t``."""
    return bisect.bisect_right(timestamps, t + eps)
