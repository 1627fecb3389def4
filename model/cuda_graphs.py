"""CUDA graphs for short text segments: the question prefill and every decode step.

transformers runs the 36 decoder layers as ~500 small kernel launches from Python, which
costs ~30 ms per step while the weights can be read in ~2 ms. A graph replays them in one
launch. Graphs need static shapes and addresses, so a segment of n tokens runs in a bucket of
b >= n tokens against the WHOLE preallocated cache: the cache writes at device indices
(``StreamKVCache.static_index``) and a (1, 1, b, capacity) mask hides everything past each
row's own position. Pad rows write K/V past the committed length, which later appends
overwrite. A graph is re-captured when the cache's buffers are reallocated (capacity grows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache_manager import StreamKVCache

BUCKETS = (1, 16, 32, 64, 128)


class _EagerReplay:
    """Stands in for a CUDA graph where there is none (CPU tests): replay re-runs the same static step."""

    def __init__(self, step):
        self.step = step
        self.out = step()

    def replay(self) -> None:
        self.out.copy_(self.step())


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph | _EagerReplay"
    ids: torch.Tensor  # (b,) token ids
    positions: torch.Tensor  # (3, 1, b) M-RoPE positions
    length: torch.Tensor  # () committed cache length
    logits: torch.Tensor  # (1, b, V) float32
    keep: tuple  # every other tensor the graph reads: it must outlive the graph


class GraphRunner:
    """Replays captured forwards of ``model``'s language model for segments of <= 128 tokens."""

    def __init__(self, model, capture: bool = True):
        self.model = model
        self.capture = capture  # False: run the static-shape step eagerly at each replay (tests on CPU)
        self.graphs: dict[int, _Graph] = {}
        self.generation = None  # the cache buffers (StreamKVCache.generation) the graphs were captured for
        self.pool = None
        self.captures = 0
        self.disabled: str | None = None  # why graphs were turned off, if they were

    def accepts(self, cache: StreamKVCache, n: int, logits: str) -> bool:
        return self.disabled is None and logits == "last" and 1 <= n <= BUCKETS[-1] and cache.capacity > 0

    @torch.no_grad()
    def __call__(self, cache: StreamKVCache, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append n tokens (n,) at (3, n) positions; returns (1, 1, V) float32 logits of the last one.

        Returns None (nothing appended) if the graph could not be captured; the caller runs eagerly.
        """
        n = len(token_ids)
        b = next(x for x in BUCKETS if x >= n)
        cache.ensure(cache.length + b)
        if self.generation != cache.generation:  # unique per buffer allocation, across caches too
            self.graphs.clear()
            self.pool = None  # a pool dies with its graphs; capturing into it again trips the allocator
            self.generation = cache.generation
        g = self.graphs.get(b)
        if g is None:
            try:
                g = self.graphs[b] = self._capture(cache, b)
            except RuntimeError as e:  # e.g. an op that syncs during capture: run without graphs from now on
                self.disabled = f"off (capture failed: {str(e).splitlines()[0][:120]})"
                return None
        g.ids[:n].copy_(token_ids, non_blocking=True)
        g.positions[:, 0, :n].copy_(positions, non_blocking=True)
        g.positions[:, 0, n:] = g.positions[:, 0, n - 1 : n]
        g.length.fill_(cache.length)
        g.graph.replay()
        cache.pending = n
        cache.advance(n)
        return g.logits[:, n - 1 : n].clone()

    def _capture(self, cache: StreamKVCache, b: int) -> _Graph:
        model, device = self.model, self.model.device
        ids = torch.zeros(b, dtype=torch.long, device=device)
        positions = torch.zeros(3, 1, b, dtype=torch.long, device=device)
        length = torch.tensor(cache.length, dtype=torch.long, device=device)
        rows = torch.arange(b, device=device)
        cols = torch.arange(cache.capacity, device=device)
        hidden, neg = torch.zeros((), dtype=model.dtype, device=device), torch.finfo(model.dtype).min

        def step() -> torch.Tensor:
            index = length + rows  # (b,) where this segment's K/V go
            cache.static_index = index
            try:
                mask = torch.where(cols[None, :] <= index[:, None], hidden, neg)[None, None]  # (1, 1, b, capacity)
                out = model.run_language_model(cache, model.get_input_embeddings()(ids)[None], positions, mask)
                return model.lm_head(out).float()
            finally:
                cache.static_index = None

        self.captures += 1
        if not self.capture:
            replay = _EagerReplay(step)
            return _Graph(replay, ids, positions, length, replay.out, keep=(rows, cols, hidden))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, kernels)
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        self.pool = graph.pool()
        return _Graph(graph, ids, positions, length, logits, keep=(rows, cols, hidden))
