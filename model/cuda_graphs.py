"""CUDA graphs of one stream: questions, decode steps, video-chunk appends and the vision tower.

transformers runs a forward as hundreds of small kernels launched from Python; on the GPU
machine that launch work (~30-50 ms per forward) dwarfs the math (~2 ms to read the weights
for a decode step, ~5 ms of matrix work for a chunk). A graph replays them in one launch.

Graphs need static shapes and addresses, so each stream owns its graphs, captured against its
own cache buffers:
- language model: a segment of n tokens runs in a bucket of b >= n rows (token segments) or
  exactly n rows (embedding segments, i.e. video chunks, whose sizes repeat) against the WHOLE
  preallocated cache: K/V are written at device indices (a static ``CacheView``) and a
  (1, 1, b, capacity) mask hides everything past each row's position. Pad rows write K/V past
  the working length, which later segments overwrite. Graphs are re-captured when the cache's
  buffers are replaced (growth; ``reserve``/``warmup`` or ``StreamConfig.initial_capacity`` avoid it).
  Only the last real row's logits leave the graph. A bounded stream (``slot_layout.py``) passes
  the rows' free slots and its kept-slot map as static inputs instead; its rows see what their
  rank (``masks.rank_of``) allows, so pad rows write slots no head uses.
- vision tower: one graph per grid shape, with the window layout precomputed
  (``compat.vision_static_kwargs``) so nothing syncs with the host inside.
A capture that fails turns that kind of graph off (``disabled`` says why); the caller then
runs eagerly. Captures hold a process-wide lock, and all graphs on a device share one memory
pool (``_shared_pool``) and one side stream for warm-ups and captures (``_capture_stream``), so
N streams cost N caches, not N sets of activations or cuBLAS workspaces.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import compat
from .config import StreamConfig
from .kv_cache import CacheView, StreamKVCache
from .kv_cache_manager import KVCacheManager
from .families import VisionOut
from .masks import Masks, StreamMask, static_causal_mask
from .recall import QueryProbe

_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process (not a setting)
_POOLS: dict = {}  # device -> the memory pool every graph on it shares (not a setting)
_STREAMS: dict = {}  # device -> the side stream every warm-up and capture on it runs on (not a setting)


def _shared_pool(device: torch.device):
    """One private memory pool per device for the graphs of every stream.

    Sharing is safe because replays never overlap (they run in order on the device's stream,
    each stream's under its lock) and every tensor a graph reads or returns outside its replay
    (static inputs and outputs) stays alive with the graph, so no other capture takes its memory.
    Without sharing, each stream would hold its own pool of activations (~0.3 GiB for the 3B).
    """
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every graph's warm-up and capture.

    cuBLAS keeps a workspace (32 MiB on the H200) per stream it has run on, for the life of the
    process; a new stream per capture cost 32 MiB each (1 GiB over 8 streams' warm-ups, measured).
    """
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


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
    start: Optional[torch.Tensor] = None  # () where the segment's first token goes
    last: Optional[torch.Tensor] = None  # (1,) the row whose logits are returned (the segment's last token)
    index: Optional[torch.Tensor] = None  # (b,) a bounded stream's slots for the rows
    visible: Optional[torch.Tensor] = None  # (capacity,) bool, a bounded stream's kept slots
    deepstack: Optional[torch.Tensor] = None  # (k, 1, b, D) DeepStack rows of a chunk (Qwen3-VL), zero at text rows
    weights: Optional[torch.Tensor] = None  # (b,) float32 row weights of recall's probe (``QueryProbe``)
    keep: tuple = field(default=())  # every other tensor the graph reads: it must outlive the graph


class _Recorder:
    """Captures a static step into a CUDA graph (or an eager stand-in), sharing one memory pool."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.captures = 0
        self.disabled: Optional[str] = None

    def record(self, step: Callable[[], torch.Tensor]):
        self.captures += 1
        if not self.capture:
            replay = _EagerReplay(step)
            return replay, replay.out
        with _CAPTURE_LOCK:
            device = torch.device("cuda", torch.cuda.current_device())
            stream = _capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (allocator, kernels)
                    step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_shared_pool(device), stream=stream, capture_error_mode="thread_local"):
                out = step()
            torch.cuda.current_stream().wait_stream(stream)
        return graph, out

    def release(self) -> None:
        """Drop every captured graph (and what it keeps alive: the buffers it was captured over)."""
        self.graphs = {}

    def fail(self, e: Exception) -> None:
        self.disabled = f"off (capture failed: {str(e).splitlines()[0][:120]})"

    def status(self) -> str:
        return self.disabled or f"on ({self.captures} captures)"


class GraphRunner(_Recorder):
    """Captured language-model forwards of token segments (questions, decode steps), video chunks and
    recall's probes (a question through the first layers, reading its queries)."""

    def __init__(self, model, kv: KVCacheManager, config: StreamConfig, capture: bool = True,
                 masks: Optional[Masks] = None, probe=None):
        super().__init__(capture)
        self.model, self.kv, self.config = model, kv, config
        # the stream's mask builder (``masks.live``: attention reads the length on the device); default: the torch kernels
        self.masks = masks or Masks(True, False, config.fold_max_rows, config.rows_max_scores, model.dtype, model.device)
        self.probe = probe  # a (rows, n) -> QueryProbe builder (bounded streams with recall)
        self.graphs: dict[tuple, _Graph] = {}
        self.buffers = None  # the cache buffers the graphs were captured against

    def release(self) -> None:
        super().release()
        self.buffers = None

    @property
    def cache(self) -> StreamKVCache:
        return self.kv.cache  # read each time: reset() replaces the cache object

    def rows(self, kind: str, n: int) -> Optional[int]:
        """Rows a captured segment of n tokens occupies (its bucket), or None if graphs do not take it."""
        if self.disabled is not None or n < 1:
            return None
        if kind == "probe" and self.probe is None:
            return None
        if kind in ("ids", "probe"):
            return next((b for b in self.config.graph_buckets if b >= n), None)
        return n if n <= self.config.max_graph_embed_rows else None

    @torch.no_grad()
    def run(self, kind: str, start: int, inputs: torch.Tensor, positions: torch.Tensor,
            index: Optional[torch.Tensor] = None, visible: Optional[torch.Tensor] = None,
            deepstack: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Write a segment at ``start``; capacity for ``rows(kind, n)`` tokens must be there.

        kind "ids": (n,) token ids -> (1, 1, V) float32 logits of the last one; kind "embeds":
        (1, n, D) embeddings -> an empty tensor; kind "probe": (n,) token ids -> (P, H_kv, D) query
        means (``QueryProbe``). None if no graph could be captured. A bounded stream passes
        ``index``: (rows,) free slots, the segment's first, and ``visible``: its kept slots.
        ``deepstack``: (k, 1, n, D) DeepStack rows of an embeddings segment (its graph was captured with them).
        """
        n = inputs.shape[1] if kind == "embeds" else inputs.shape[0]
        key = "embeds+deepstack" if deepstack is not None else kind
        g = self._graph(key, self.rows(kind, n), start, index)
        if g is None:
            return None
        if index is not None:
            g.index.copy_(index)
            g.visible.copy_(visible)
        if kind == "embeds":
            g.inputs.copy_(inputs)
            if deepstack is not None:
                g.deepstack.copy_(deepstack)
        else:
            g.inputs[:n].copy_(inputs, non_blocking=True)
        if kind == "probe":
            g.weights.copy_(QueryProbe.uniform(g.weights.numel(), n, g.weights.device))
        g.positions[:, 0, :n].copy_(positions, non_blocking=True)
        g.positions[:, 0, n:] = g.positions[:, 0, n - 1:n]
        g.start.fill_(start)
        g.last.fill_(n - 1)
        g.graph.replay()
        return g.out if kind == "embeds" else g.out.clone()  # a chunk: a dummy (not None: the graph ran)

    def _graph(self, kind: str, b: int, start: int, index: Optional[torch.Tensor] = None) -> Optional[_Graph]:
        if self.buffers is not self.cache.buffers:  # new buffers (growth): every graph points at the old ones
            self.graphs = {}
            self.buffers = self.cache.buffers
        key = (kind, b)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(kind, b, start, index)
            except RuntimeError as e:  # e.g. an op that syncs with the host during capture
                self.fail(e)
                return None
        return self.graphs[key]

    def _capture(self, key: str, b: int, at: int, slots: Optional[torch.Tensor] = None) -> _Graph:
        """Record the step; warm-up and capture write K/V at [at, at+b), past the working head (a bounded
        stream: at ``slots``, free in every reachable head), never where a committed token is.
        ``key``: "ids", "probe", "embeds", or "embeds+deepstack" (with static DeepStack rows)."""
        model, device, cfg = self.model, self.model.device, self.config
        kind = "embeds" if key.startswith("embeds") else key
        hidden_size = compat.text_config(model.config).hidden_size
        if kind == "embeds":
            inputs = torch.zeros(1, b, hidden_size, dtype=model.dtype, device=device)
        else:
            inputs = torch.zeros(b, dtype=torch.long, device=device)
        layers = model.family.deepstack_layers(model.config) if key == "embeds+deepstack" else 0
        deepstack = torch.zeros(layers, 1, b, hidden_size, dtype=model.dtype, device=device) if layers else None
        probe = self.probe(b, b) if kind == "probe" else None  # its weights and output are static buffers
        assert probe is None or slots is not None, "recall's probe runs on bounded streams only"
        positions = torch.zeros(3, 1, b, dtype=torch.long, device=device)
        start = torch.tensor(at, dtype=torch.long, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        rows = torch.arange(b, device=device)
        cols = torch.arange(self.cache.capacity, device=device)
        zero = torch.zeros((), dtype=model.dtype, device=device)
        buffers = self.cache.buffers
        bounded = slots is not None
        slot_index = slots.clone() if bounded else None  # (b,) static: where a bounded stream's rows go
        visible = torch.zeros(self.cache.capacity, dtype=torch.bool, device=device) if bounded else None
        masks = self.masks  # the step refers to no graph runner: an emulated replay keeps its step, and a cycle
        # through it would keep the whole stream alive after its engine is gone

        def step() -> torch.Tensor:
            index = slot_index if bounded else start + rows  # (b,) where this segment's K/V go
            if bounded:  # scattered slots: each slot's rank says which rows see it
                mask = masks.bounded(0, visible, index, on_query=probe)
            elif masks.live:  # attention reads [0, start+b) only: cost follows the live length
                mask = masks.causal(at, b, model.dtype, start)
            else:  # the whole capacity, masked per row
                mask = StreamMask(0, static_causal_mask(index, cols, zero), cfg.fold_max_rows, cfg.rows_max_scores)
            embeds = inputs if kind == "embeds" else model.get_input_embeddings()(inputs)[None]
            view = CacheView(buffers, 0, index)
            if probe is not None:  # the first layers' attention writes the query means into probe.out
                model.forward_segment(view, embeds, positions[:, 0], mask, layers=probe.layers)
                return probe.out
            if kind == "ids":  # the logits of the segment's last real row
                return model.forward_segment(view, embeds, positions[:, 0], mask, logits=last)
            model.forward_segment(view, embeds, positions[:, 0], mask, logits="none", deepstack=deepstack)
            return last * 0  # a chunk returns nothing; a graph needs an output

        graph, out = self.record(step)
        return _Graph(graph, inputs, out, positions, start, last, slot_index, visible, deepstack=deepstack,
                      weights=probe.weights if probe is not None else None, keep=(rows, cols, zero, buffers))


class VisionGraphs(_Recorder):
    """One captured vision-tower forward per grid shape (t, h, w)."""

    def __init__(self, model, capture: bool = True):
        super().__init__(capture)
        self.model = model
        self.graphs: dict[tuple, _Graph] = {}

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: tuple) -> Optional[VisionOut]:
        """(P, C*T*p*p) patches -> ``VisionOut`` ((P / merge^2, D) embeddings, DeepStack features), or None
        (then encode eagerly)."""
        if self.disabled is not None:
            return None
        g = self.graphs.get(grid_thw)
        if g is None:
            try:
                g = self._capture(pixel_values, grid_thw)
            except (RuntimeError, ValueError) as e:
                self.fail(e)
                return None
            self.graphs[grid_thw] = g
        g.inputs.copy_(pixel_values)
        g.graph.replay()
        out = g.out.clone()  # (1 + k, n, D): the embeddings, then k DeepStack feature sets
        return VisionOut(out[0], out[1:] if out.shape[0] > 1 else None)

    def _capture(self, pixel_values: torch.Tensor, grid_thw: tuple) -> _Graph:
        model, family = self.model, self.model.family
        grid = torch.tensor([grid_thw], dtype=torch.long, device=pixel_values.device)
        static = family.vision_static_kwargs(model, grid)
        if static is None:
            raise ValueError("this transformers version cannot take a precomputed vision layout")
        inputs = pixel_values.to(compat.vision_tower(model).dtype).clone()

        def step() -> torch.Tensor:  # the forward pops what it uses from its copy of the layout
            out = family.encode_vision(model, inputs, grid, varlen=True, **dict(static))
            return torch.cat([out.embeds[None], out.deepstack]) if out.deepstack is not None else out.embeds[None]

        graph, out = self.record(step)
        return _Graph(graph, inputs, out, keep=(grid, tuple(static.values())))
