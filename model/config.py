"""StreamConfig: every setting of a stream, validated once when it is built.

One frozen dataclass, passed down explicitly: the engine, its stream, the cache, the graph
runner and the attention kernels read their settings from it, never from module globals, and
nothing here is written into the shared model. Two streams over one model may use different
configs (say ``fast=True`` and ``fast=False``); each runs as configured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # slot_layout imports torch; the CLI builds its parser from this file before torch loads
    from .slot_layout import Budget


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class StreamConfig:
    """Settings of one stream. Invalid values raise ``ValueError``/``TypeError`` at construction."""

    fast: bool = True  # stream attention kernels (+ CUDA graphs on a GPU); False: transformers' sdpa, dense masks
    cuda_graphs: bool = True  # capture questions, decode steps and chunk appends (CUDA and fast only)
    vision_graphs: bool = True  # capture the vision tower per grid shape (CUDA and fast only)
    emulate_graphs: bool = False  # no CUDA: run the graph paths (static shapes, buckets, pad rows) eagerly, for tests
    graph_buckets: tuple[int, ...] = (1, 16, 32, 64, 128)  # token-segment sizes a captured graph is padded to
    max_graph_embed_rows: int = 4096  # video-chunk segments up to this many tokens run as graphs
    fold_max_rows: int = 1024  # query rows (heads x tokens) up to which attention folds GQA heads into rows
    rows_max_scores: int = 96 * 2**20  # ... and score elements per K/V head the matmul path may materialise
    initial_capacity: int = 0  # tokens of K/V reserved when the first segment arrives (0: grow on demand)
    grow_min: int = 1024  # tokens added at least when the cache grows (it grows x1.5 otherwise)
    max_frames_per_forward: int = 16  # video frames per vision+LM forward within one append (rounded down to whole temporal patches)
    choice_chunk_tokens: int = 128  # ask_choice: choice tokens per forward and per log-softmax chunk
    max_question_tokens: int = 8192  # the longest question (and each choice), refused before any forward beyond
    default_fps: float = 2.0  # fps of a video block whose first append gives none (a warning says so)
    attention_kernel: str = "auto"  # "auto": the live-length Triton kernel on CUDA when Triton imports; "triton"; "torch"
    # Bounded memory (slot_layout.py): either limit (or both) turns it on; None: the cache grows with the stream.
    cache_budget_tokens: Optional[int] = None  # kept tokens at most (text included); the oldest video goes first
    video_window_seconds: Optional[float] = None  # kept video outside the sink at most, in seconds
    sink_frames: int = 2  # the stream's first video frames, never evicted (rounded up to whole 2-frame grids)
    recall_grids: int = 0  # evicted 2-frame grids a question may bring back from host memory (0: no recall)
    recall_host_tokens: int = 262_144  # evicted tokens kept in host memory for recall (the oldest dropped beyond)
    recall_probe_layers: int = 8  # decoder layers whose queries score the evicted grids (fewer: faster, coarser)

    def __post_init__(self) -> None:
        for name in ("fast", "cuda_graphs", "vision_graphs", "emulate_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"StreamConfig.{name} must be True or False, got {getattr(self, name)!r}")
        positive = ("max_graph_embed_rows", "fold_max_rows", "grow_min", "choice_chunk_tokens", "max_frames_per_forward",
                    "max_question_tokens")
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
        budget = self.cache_budget_tokens
        if budget is not None and (not _is_int(budget) or budget < 1):
            raise ValueError(f"StreamConfig.cache_budget_tokens must be None or an int >= 1, got {budget!r}")
        window = self.video_window_seconds
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, float))
                                   or not math.isfinite(window) or window <= 0):
            raise ValueError(f"StreamConfig.video_window_seconds must be None or a positive number, got {window!r}")
        if not _is_int(self.sink_frames) or self.sink_frames < 0:
            raise ValueError(f"StreamConfig.sink_frames must be an int >= 0, got {self.sink_frames!r}")
        for name in ("recall_grids", "recall_host_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"StreamConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not _is_int(self.recall_probe_layers) or self.recall_probe_layers < 1:
            raise ValueError(f"StreamConfig.recall_probe_layers must be an int >= 1 (more than the model has: all), "
                             f"got {self.recall_probe_layers!r}")
        if self.recall_grids and budget is None and window is None:
            raise ValueError("StreamConfig.recall_grids recalls evicted video: it needs cache_budget_tokens or "
                             "video_window_seconds")

    def budget(self) -> Optional[Budget]:
        """The memory budget of a bounded stream, or None (unbounded)."""
        if self.cache_budget_tokens is None and self.video_window_seconds is None:
            return None
        from .slot_layout import Budget

        return Budget(self.cache_budget_tokens, self.video_window_seconds, -(-self.sink_frames // 2),
                      self.recall_grids, self.recall_host_tokens)

    def replace(self, **changes) -> "StreamConfig":
        """A validated copy with ``changes`` (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown StreamConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return StreamConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


@dataclass(frozen=True)
class PoolConfig:
    """Settings of one ``KVPool`` (``kv_pool.py``) and its ``Scheduler`` (``scheduler.py``), shared by its streams.

    Invalid values raise ``ValueError``/``TypeError`` at construction.
    """

    tokens: int = 65_536  # K/V slots of the pool, allocated once when it is built (its memory)
    page: int = 64  # slots per page (a stream owns whole pages); a power of two >= 16 (the Triton kernel's key block)
    batch_window_ms: float = 0.5  # after a request, wait this long for more (reset by each arrival) ...
    max_wait_ms: float = 4.0  # ... but at most this long after the first one
    max_batch_tokens: int = 8192  # language-model rows per batched forward (one segment always goes, however long)
    max_batch_segments: int = 128  # segments per batched forward
    max_vision_patches: int = 65_536  # vision patches per batched vision forward (one request always goes)
    batch_graphs: bool = True  # CUDA graphs of batches of token segments (questions, decode steps): ``batch_graphs.py``
    max_graph_rows: int = 256  # ... of at most this many rows
    max_graph_segments: int = 32  # ... and segments
    max_graphs: int = 64  # buckets captured at most (a batch of a bucket beyond them runs eagerly)
    graph_question_rows: int = 64  # a batch with questions is padded to this many rows a segment (a power of two), so
    # one graph per segment count serves every question up to it, and warm_graphs captures it ahead

    def __post_init__(self) -> None:
        if not isinstance(self.batch_graphs, bool):
            raise TypeError(f"PoolConfig.batch_graphs must be a bool, got {self.batch_graphs!r}")
        for name in ("tokens", "page", "max_batch_tokens", "max_batch_segments", "max_vision_patches", "max_graph_rows",
                     "max_graph_segments", "max_graphs", "graph_question_rows"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"PoolConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"PoolConfig.{name} must be >= 1, got {value}")
        if self.page < 16 or self.page & (self.page - 1):
            raise ValueError(f"PoolConfig.page must be a power of two >= 16, got {self.page}")
        if self.graph_question_rows & (self.graph_question_rows - 1):
            raise ValueError(f"PoolConfig.graph_question_rows must be a power of two, got {self.graph_question_rows}")
        if self.tokens < self.page:
            raise ValueError(f"PoolConfig.tokens={self.tokens} must hold at least one page of {self.page}")
        for name in ("batch_window_ms", "max_wait_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PoolConfig.{name} must be a finite number >= 0, got {value!r}")

    @property
    def pages(self) -> int:
        return self.tokens // self.page

    @property
    def scratch_tokens(self) -> int:
        """Slots past the pages where captured batches' padding rows write (``batch_graphs``), whole pages."""
        return -(-self.max_graph_rows // self.page) * self.page if self.batch_graphs else 0


def resolve_config(config: Optional[StreamConfig], **overrides) -> StreamConfig:
    """``config`` (or the defaults) with keyword overrides such as ``fast=False`` applied and validated."""
    if config is not None and not isinstance(config, StreamConfig):
        raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
    base = config or StreamConfig()
    return base.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else base


# What stats() reports about a memory budget (the CLI and step 6 show these when one is set).
BUDGET_STATS = ("cache_budget_tokens", "video_window_seconds", "sink_frames", "transcript_tokens",
                "kept_video_seconds", "evicted_seconds", "evicted_grids", "evicted_tokens", "recall_grids",
                "stored_seconds", "recall_host_bytes")


def add_budget_arguments(parser) -> None:
    """The memory-budget flags of the command-line tools (``python -m model``, step 6)."""
    g = parser.add_argument_group("memory budget (a bounded stream; see README 'Bounded memory')")
    g.add_argument("--budget-tokens", type=int, default=None, metavar="N",
                   help="keep at most N cached tokens: the oldest video (outside the sink) is evicted")
    g.add_argument("--window-seconds", type=float, default=None, metavar="S",
                   help="keep at most S seconds of video outside the sink")
    g.add_argument("--sink-frames", type=int, default=2, metavar="F",
                   help="the first F frames are never evicted (default 2)")
    g.add_argument("--recall-grids", type=int, default=0, metavar="K",
                   help="each question brings back the K most relevant evicted 2-frame grids (default 0: off)")


def budget_config(args) -> Optional[StreamConfig]:
    """The ``StreamConfig`` the budget flags ask for (validated), or None when no budget is set."""
    if args.budget_tokens is None and args.window_seconds is None:
        return None
    return StreamConfig(cache_budget_tokens=args.budget_tokens, video_window_seconds=args.window_seconds,
                        sink_frames=args.sink_frames, recall_grids=args.recall_grids)
