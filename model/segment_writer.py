"""How one stream writes a segment into its cache: graph or eager, contiguous or into slots, decided in one place.

``SegmentWriter`` owns a stream's cache (``KVCacheManager``), its mask builder, its CUDA graphs
and recall's probe builder. ``feed`` writes one ``transcript.Segment`` (text ids, or embeddings
with vision rows in place and, for Qwen3-VL, DeepStack rows) after a transaction's working head
at the positions ``transcript.positions`` gives, and advances the head. It knows nothing of
turns, blocks or questions (``stream.py``) and calls nothing above it.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .config import StreamConfig
from .cuda_graphs import GraphRunner, VisionGraphs
from .families import VisionOut
from .fast_attention import live_length_kernel
from .frames import patchify
from .batch_forward import LMWork, VisionWork
from .kv_cache_manager import KVCacheManager, Transaction
from .kv_pool import PooledKVCacheManager
from .paged_attention import segment as paged_segment
from .masks import Masks
from .recall import QueryProbe
from .transcript import Segment, Text, Vision, positions as piece_positions


class SegmentWriter:
    """The cache, graphs and segment forwards of one stream over a shared ``StreamQwenModel``.

    ``pool``: a ``kv_pool.KVPool``: the stream's tokens go to pages of the pool, and every forward (vision
    and language model) runs on the pool's scheduler, batched with other streams' (``_pooled_forward``).
    """

    def __init__(self, model, config: StreamConfig, initial_state, pool=None):
        self.model, self.config, self.pool = model, config, pool
        if pool is not None:
            self.kv = PooledKVCacheManager(pool, initial_state=initial_state, budget=config.budget())
        else:
            self.kv = KVCacheManager(*model.kv_shape(), dtype=model.dtype, device=model.device,
                                     initial_state=initial_state, grow_min=config.grow_min,
                                     initial_capacity=config.initial_capacity, budget=config.budget())
        self.fast = config.fast and model.stream_kernels
        live = live_length_kernel(config.attention_kernel, self.fast, model.device)  # the Triton kernel
        self.masks = Masks(self.fast, live, config.fold_max_rows, config.rows_max_scores, model.dtype, model.device)
        self.varlen = self.fast and model.family.varlen_supported()
        cuda = model.device.type == "cuda"
        # emulated: each replay re-runs its step eagerly; pooled streams run on the pool's scheduler instead
        graphs = self.fast and (cuda or config.emulate_graphs) and pool is None
        # the probe builder must not refer back to this writer: streams hold no reference cycles (close/del free them)
        self.query_probe = partial(QueryProbe.for_model, model, config.recall_probe_layers)
        self.runner = (GraphRunner(model, self.kv, config, capture=cuda, masks=self.masks, probe=self.query_probe)
                       if graphs and config.cuda_graphs else None)
        self.vision_graphs = VisionGraphs(model, capture=cuda) if graphs and config.vision_graphs and self.varlen else None

    def reset(self, keep_memory: bool = False) -> None:
        """A new stream; without ``keep_memory`` the cache, recall slab and graphs are freed (not only dropped:
        graphs captured over the buffers would keep them alive)."""
        self.kv.clear(keep_buffers=keep_memory)
        if not keep_memory:
            for graphs in (self.runner, self.vision_graphs):
                if graphs is not None:
                    graphs.release()

    # -- vision ------------------------------------------------------------------------
    def encode(self, frames: torch.Tensor, pixels) -> tuple[VisionOut, tuple[int, int, int]]:
        """(2k, 3, H, W) resized frames -> (their ``VisionOut``, grid (k, h, w) in patches)."""
        patches, grid = patchify(frames, pixels)
        if self.pool is not None:  # batched with other streams' grids
            return self.pool.scheduler.submit(VisionWork(patches, grid, self.varlen), self.kv), grid
        out = self.vision_graphs(patches, grid) if self.vision_graphs is not None else None
        return (out if out is not None else self.model.encode_vision(patches, grid, varlen=self.varlen)), grid

    # -- segments ----------------------------------------------------------------------
    def feed(self, txn: Transaction, segment: Segment, vision: Optional[VisionOut] = None, logits: str = "none",
             positions: Optional[torch.Tensor] = None, tree: Optional[list[int]] = None,
             probe: bool = False) -> Optional[torch.Tensor]:
        """Write ``segment`` after the working head of ``txn`` and advance it.

        ``vision``: the embeddings (and DeepStack features) of its vision pieces, in order.
        ``positions``: (3, n) instead of the transcript's (choice branches share theirs); ``tree``:
        the ids are choice branches of these lengths. ``probe``: recall's probe (first layers only,
        bounded streams, on a dropped fork) -> (P, H_kv, D) query means. Else (1, n|1, V) logits or None.
        """
        if positions is None:
            positions, next_position = piece_positions(segment.pieces, txn.state.next_position)
        else:
            next_position = max(txn.state.next_position, int(positions.max()) + 1)
        n = segment.n
        if n == 0:
            return None
        if segment.text_only:
            ids = torch.tensor(segment.ids(), dtype=torch.long, device=self.model.device)
            kind, inputs, deepstack = ("probe" if probe else "ids"), ids, None
        else:
            kind, (inputs, deepstack) = "embeds", self._embeds(segment, vision)
        return self._forward(txn, kind, inputs, positions, logits, tree, deepstack, segment.units, segment.seconds,
                             next_position)

    def feed_ids(self, txn: Transaction, ids: list[int], logits: str = "none", **kw) -> Optional[torch.Tensor]:
        """Append text token ids at the next free positions (``feed`` of one text piece)."""
        return self.feed(txn, Segment((Text(tuple(ids)),)), logits=logits, **kw)

    def _embeds(self, segment: Segment, vision: VisionOut) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A mixed segment's (1, n, D) input embeddings and (k, 1, n, D) DeepStack rows (zero at text rows)."""
        model, n = self.model, segment.n
        rows, ids, at = [], [], 0
        for p in segment.pieces:
            if isinstance(p, Vision):
                rows.append(torch.arange(at, at + p.n))
                ids += [0] * p.n
            else:
                ids += p.ids
            at += p.n
        rows = torch.cat(rows).to(model.device)  # (n_vision,)
        assert rows.numel() == vision.embeds.shape[0], f"{rows.numel()} vision rows for {vision.embeds.shape[0]} embeddings"
        embeds = vision.embeds.to(model.dtype)[None]
        if rows.numel() < n:  # text pieces too (Qwen3-VL's timestamps and markers)
            embeds = model.embed_ids(torch.tensor(ids, dtype=torch.long, device=model.device)).index_copy(1, rows, embeds)
        deepstack = None
        if vision.deepstack is not None:  # (k, n_vision, D) -> (k, 1, n, D)
            k, _, d = vision.deepstack.shape
            deepstack = vision.deepstack.new_zeros(k, 1, n, d, dtype=model.dtype)
            deepstack.index_copy_(2, rows, vision.deepstack.to(model.dtype)[:, None])
        return embeds, deepstack

    def _forward(self, txn: Transaction, kind: str, inputs: torch.Tensor, positions: torch.Tensor, logits: str,
                 tree: Optional[list[int]], deepstack: Optional[torch.Tensor], units: tuple[int, ...], seconds: float,
                 next_position: int) -> Optional[torch.Tensor]:
        """Write one segment after the working head and advance it; graph or eager is decided here.

        kind "ids": (n,) token ids; "embeds": (1, n, D) with ``deepstack`` (k, 1, n, D) or None;
        "probe": (n,) token ids through the first ``recall_probe_layers`` layers only. positions (3, n).
        """
        if self.pool is not None:
            return self._pooled_forward(txn, kind, inputs, positions, logits, tree, deepstack, units, seconds,
                                        next_position)
        n = inputs.shape[1] if kind == "embeds" else inputs.shape[0]
        slots, out, probe = None, None, None
        graph_fits = logits != "all" and (kind != "embeds" or logits == "none") and tree is None
        rows = self.runner.rows(kind, n) if self.runner is not None and graph_fits else None
        if self.kv.bounded:
            if rows is not None:  # a graph over the whole cache: rows slots, the first n are the segment's
                self.kv.check_call(txn, n)
                index = self.kv.allocate(txn, rows)  # (rows,) CPU
                visible = txn.state.layout.visible(self.kv.cache.capacity, self.model.device)
                out = self.runner.run(kind, txn.length, inputs, positions, index=index.to(self.model.device),
                                      visible=visible, deepstack=deepstack)
                slots = index[:n] if out is not None else None
            if out is None:
                view, slots = self.kv.slot_view(txn, n, trim=not self.masks.live)
                probe = self.query_probe(n, n) if kind == "probe" else None
                visible = txn.state.layout.visible(self.kv.cache.capacity, self.model.device)
                visible = visible if view.end is None else visible[:view.end]
                mask = self.masks.bounded(txn.length, visible, view.index, tree, probe)
        else:
            assert kind != "probe", "recall's probe runs on bounded streams only"
            if rows is not None:
                self.kv.ensure(txn, rows)
                out = self.runner.run(kind, txn.length, inputs, positions, deepstack=deepstack)  # None: no graph
            if out is None:
                view = self.kv.view(txn, n)
                mask = (self.masks.causal(txn.length, n, self.model.dtype) if tree is None
                        else self.masks.tree(txn.length, tree))
        if out is None:
            embeds = inputs if kind == "embeds" else self.model.embed_ids(inputs)
            if probe is not None:  # the attention of the first layers writes the query means into probe.out
                self.model.forward_segment(view, embeds, positions, mask, layers=probe.layers)
                out = probe.out
            else:
                out = self.model.forward_segment(view, embeds, positions, mask, logits=logits, deepstack=deepstack)
        txn.wrote(n, slots=slots, units=units, seconds=seconds, next_position=next_position)
        return out if logits != "none" or kind == "probe" else None

    def _pooled_forward(self, txn: Transaction, kind: str, inputs: torch.Tensor, positions: torch.Tensor, logits: str,
                        tree: Optional[list[int]], deepstack: Optional[torch.Tensor], units: tuple[int, ...],
                        seconds: float, next_position: int) -> Optional[torch.Tensor]:
        """``_forward`` of a pooled stream: slots from the transaction (pages of the pool), the forward run by the
        pool's scheduler in a batch with other streams' segments, each row seeing only this stream's slots."""
        n = inputs.shape[1] if kind == "embeds" else inputs.shape[0]
        if self.kv.bounded:
            self.kv.check_call(txn, n)
        slots = self.kv.allocate(txn, n)  # (n,) CPU local slots
        probe = self.query_probe(n, n) if kind == "probe" else None
        segment = paged_segment(self.kv.cache, txn.state.layout, slots, tree, probe, self.masks)
        work = LMWork(kind, inputs, positions, self.kv.cache.slot_index(slots), segment,
                      logits if kind != "probe" else "none", deepstack, probe)
        out = self.pool.scheduler.submit(work, self.kv)
        txn.wrote(n, slots=slots, units=units, seconds=seconds, next_position=next_position)
        return out if logits != "none" or kind == "probe" else None
