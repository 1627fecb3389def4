"""CUDA graphs: questions, decode steps, video-chunk appends and the vision tower.

transformers runs a forward as hundreds of small kernels launched from Python; on the GPU
machine that launch work (~30-50 ms per forward) dwarfs the math (~2 ms to read the weights
for a decode step, ~5 ms of matrix work for a chunk). A graph replays them in one launch.

Graphs need static shapes and addresses:
- language model: a segment of n tokens runs in a bucket of b >= n rows (token segments) or
  exactly n rows (embedding segments, i.e. video chunks, whose sizes repeat) against the WHOLE
  preallocated cache: the cache writes at device indices (``StreamKVCache.static_index``) and a
  (1, 1, b, capacity) mask hides everything past each row's position. Pad rows write K/V past
  the committed length, which later appends overwrite. Graphs are re-captured when the cache's
  buffers are reallocated (its capacity grows geometrically, so rarely).
- vision tower: one graph per grid shape, with the window layout precomputed
  (``compat.vision_static_kwargs``) so nothing syncs with the host inside.
A capture that fails turns that kind of graph off (``disabled`` says why); the caller then
runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import compat
from .kv_cache_manager import StreamKVCache

BUCKETS = (1, 16, 32, 64, 128)  # token segments (questions, decode steps)
MAX_EMBED_ROWS = 4096  # embedding segments (video chunks) up to this many tokens


class _EagerReplay:
    """Stands in for a CUDA graph where there is none (CPU tests): replay re-runs the same static step."""

    def __init__(self, step: Callable[[], torch.Tensor]):
        self.step = step
        self.out = step()

    def replay(self) -> None:
        self.out.copy_(self.step())


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph | _EagerReplay"
    inputs: torch.Tensor  # (b,) token ids, (1, b, D) embeddings, or vision patches
    out: torch.Tensor  # logits (1, b, V), a dummy, or vision embeddings
    positions: Optional[torch.Tensor] = None  # (3, 1, b) M-RoPE positions
    length: Optional[torch.Tensor] = None  # () committed cache length
    keep: tuple = field(default=())  # every other tensor the graph reads: it must outlive the graph


class _Recorder:
    """Captures a static step into a CUDA graph (or an eager stand-in), sharing one memory pool."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.pool = None
        self.captures = 0
        self.disabled: Optional[str] = None

    def record(self, step: Callable[[], torch.Tensor]):
        self.captures += 1
        if not self.capture:
            replay = _EagerReplay(step)
            return replay, replay.out
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, kernels)
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()
        return graph, out

    def fail(self, e: Exception) -> None:
        self.disabled = f"off (capture failed: {str(e).splitlines()[0][:120]})"


class GraphRunner(_Recorder):
    """Captured language-model forwards of token segments (<= 128) and embedding segments (chunks)."""

    def __init__(self, model, capture: bool = True):
        super().__init__(capture)
        self.model = model
        self.graphs: dict[tuple, _Graph] = {}
        self.generation = None  # the cache buffers (StreamKVCache.generation) the graphs were captured for

    def accepts(self, cache: StreamKVCache, n: int, logits: str) -> bool:
        return self.disabled is None and logits == "last" and 1 <= n <= BUCKETS[-1] and cache.capacity > 0

    def accepts_embeds(self, cache: StreamKVCache, n: int) -> bool:
        return self.disabled is None and 1 <= n <= MAX_EMBED_ROWS and cache.capacity > 0

    @torch.no_grad()
    def __call__(self, cache: StreamKVCache, token_ids: torch.Tensor, positions: torch.Tensor):
        """Append n token ids at (3, n) positions -> (1, 1, V) float32 logits of the last one, or None."""
        n = len(token_ids)
        g = self._graph(cache, ("ids", next(x for x in BUCKETS if x >= n)))
        if g is None:
            return None
        g.inputs[:n].copy_(token_ids, non_blocking=True)
        self._replay(cache, g, n, positions)
        return g.out[:, n - 1 : n].clone()

    @torch.no_grad()
    def run_embeds(self, cache: StreamKVCache, embeds: torch.Tensor, positions: torch.Tensor) -> bool:
        """Append (1, n, D) embeddings at (3, n) positions; False if no graph could be captured."""
        g = self._graph(cache, ("embeds", embeds.shape[1]))
        if g is None:
            return False
        g.inputs.copy_(embeds)
        self._replay(cache, g, embeds.shape[1], positions)
        return True

    def _replay(self, cache: StreamKVCache, g: _Graph, n: int, positions: torch.Tensor) -> None:
        g.positions[:, 0, :n].copy_(positions, non_blocking=True)
        g.positions[:, 0, n:] = g.positions[:, 0, n - 1 : n]
        g.length.fill_(cache.length)
        g.graph.replay()
        cache.pending = n
        cache.advance(n)

    def _graph(self, cache: StreamKVCache, key: tuple) -> Optional[_Graph]:
        cache.ensure(cache.length + key[1])
        if self.generation != cache.generation:  # unique per buffer allocation, across caches too
            self.graphs.clear()
            self.pool = None  # a pool dies with its graphs; capturing into it again trips the allocator
            self.generation = cache.generation
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(cache, *key)
            except RuntimeError as e:  # e.g. an op that syncs with the host during capture
                self.fail(e)
                return None
        return self.graphs[key]

    def _capture(self, cache: StreamKVCache, kind: str, b: int) -> _Graph:
        model, device = self.model, self.model.device
        if kind == "ids":
            inputs = torch.zeros(b, dtype=torch.long, device=device)
        else:
            inputs = torch.zeros(1, b, model.config.text_config.hidden_size, dtype=model.dtype, device=device)
        positions = torch.zeros(3, 1, b, dtype=torch.long, device=device)
        length = torch.tensor(cache.length, dtype=torch.long, device=device)
        rows = torch.arange(b, device=device)
        cols = torch.arange(cache.capacity, device=device)
        zero, neg = torch.zeros((), dtype=model.dtype, device=device), torch.finfo(model.dtype).min

        def step() -> torch.Tensor:
            index = length + rows  # (b,) where this segment's K/V go
            cache.static_index = index
            try:
                mask = torch.where(cols[None, :] <= index[:, None], zero, neg)[None, None]  # (1, 1, b, capacity)
                embeds = model.get_input_embeddings()(inputs)[None] if kind == "ids" else inputs
                hidden = model.run_language_model(cache, embeds, positions, mask)
                return model.lm_head(hidden).float() if kind == "ids" else hidden[:, :1, :1]
            finally:
                cache.static_index = None

        graph, out = self.record(step)
        return _Graph(graph, inputs, out, positions, length, keep=(rows, cols, zero))


class VisionGraphs(_Recorder):
    """One captured vision-tower forward per grid shape (t, h, w)."""

    def __init__(self, model, capture: bool = True):
        super().__init__(capture)
        self.model = model
        self.graphs: dict[tuple, _Graph] = {}

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: tuple) -> Optional[torch.Tensor]:
        """(P, C*T*p*p) patches -> (P / merge^2, D) embeddings, or None (then encode eagerly)."""
        if self.disabled is not None:
            return None
        g = self.graphs.get(grid_thw)
        if g is None:
            try:
                g = self.graphs[grid_thw] = self._capture(pixel_values, grid_thw)
            except (RuntimeError, ValueError) as e:
                self.fail(e)
                return None
        g.inputs.copy_(pixel_values)
        g.graph.replay()
        return g.out.clone()

    def _capture(self, pixel_values: torch.Tensor, grid_thw: tuple) -> _Graph:
        model = self.model
        grid = torch.tensor([grid_thw], dtype=torch.long, device=pixel_values.device)
        static = compat.vision_static_kwargs(model, grid)
        if static is None:
            raise ValueError("this transformers version cannot take a precomputed vision window layout")
        inputs = pixel_values.to(compat.vision_tower(model).dtype).clone()

        def step() -> torch.Tensor:
            return compat.encode_vision(model, inputs, grid, **dict(static))  # the forward pops what it uses

        graph, out = self.record(step)
        return _Graph(graph, inputs, out, keep=(grid, tuple(static.values())))
