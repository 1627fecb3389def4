"""StreamConfig: every setting of a stream, validated once when it is built.

One frozen dataclass, passed down explicitly: the engine, its stream, the cache, the graph
runner and the attention kernels read their settings from it, never from module globals, and
nothing here is written into the shared model. Two streams over one model may use different
configs (say ``fast=True`` and ``fast=False``); each runs as configured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class StreamConfig:
    """Settings of one stream. Invalid values raise ``ValueError``/``TypeError`` at construction."""

    fast: bool = True  # stream attention kernels (+ CUDA graphs on a GPU); False: transformers' sdpa, dense masks
    cuda_graphs: bool = True  # capture questions, decode steps and chunk appends (CUDA and fast only)
    vision_graphs: bool = True  # capture the vision tower per grid shape (CUDA and fast only)
    graph_buckets: tuple[int, ...] = (1, 16, 32, 64, 128)  # token-segment sizes a captured graph is padded to
    max_graph_embed_rows: int = 4096  # video-chunk segments up to this many tokens run as graphs
    fold_max_rows: int = 1024  # query rows (heads x tokens) up to which attention folds GQA heads into rows
    rows_max_scores: int = 96 * 2**20  # ... and score elements per K/V head the matmul path may materialise
    initial_capacity: int = 0  # tokens of K/V reserved when the first segment arrives (0: grow on demand)
    grow_min: int = 1024  # tokens added at least when the cache grows (it grows x1.5 otherwise)
    max_frames_per_forward: int = 16  # video frames per vision+LM forward within one append (rounded down to whole temporal patches)
    choice_chunk_tokens: int = 128  # ask_choice: choice tokens per forward and per log-softmax chunk
    default_fps: float = 2.0  # fps of a video block whose first append gives none (a warning says so)
    attention_kernel: str = "auto"  # "auto": the live-length Triton kernel on CUDA when Triton imports; "triton"; "torch"

    def __post_init__(self) -> None:
        for name in ("fast", "cuda_graphs", "vision_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"StreamConfig.{name} must be True or False, got {getattr(self, name)!r}")
        positive = ("max_graph_embed_rows", "fold_max_rows", "grow_min", "choice_chunk_tokens", "max_frames_per_forward")
        for name in positive + ("rows_max_scores", "initial_capacity"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"StreamConfig.{name} must be an int, got {value!r}")
            if value < (1 if name in positive else 0):
                raise ValueError(f"StreamConfig.{name} must be >= {1 if name in positive else 0}, got {value}")
        b = self.graph_buckets
        if not isinstance(b, tuple) or not b or not all(_is_int(x) and x >= 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"StreamConfig.graph_buckets must be a non-empty increasing tuple of ints >= 1, got {b!r}")
        if self.attention_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"StreamConfig.attention_kernel must be 'auto', 'triton' or 'torch', "
                             f"got {self.attention_kernel!r}")
        fps = self.default_fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"StreamConfig.default_fps must be a positive finite number, got {fps!r}")

    def replace(self, **changes) -> "StreamConfig":
        """A validated copy with ``changes`` (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown StreamConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return StreamConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def resolve_config(config: Optional[StreamConfig], **overrides) -> StreamConfig:
    """``config`` (or the defaults) with keyword overrides such as ``fast=False`` applied and validated."""
    if config is not None and not isinstance(config, StreamConfig):
        raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
    base = config or StreamConfig()
    return base.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else base
