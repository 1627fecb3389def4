"""One stream over a shared model: its state record, its cache, its graphs, and the segment operations.

``StreamState`` is the stream's whole bookkeeping besides the K/V tensors, one immutable record
(the ``KVCacheManager``'s committed head). ``Stream`` turns what the engine asks for into
segments on a ``Transaction``: text ids, a chunk's frames (odd frames held and paired here),
opening and closing vision blocks and user turns. Whether a segment runs as a CUDA graph or
eagerly is decided in one place, ``_forward``. Nothing here commits: the engine does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from tqdm.auto import tqdm

from .config import StreamConfig
from .cuda_graphs import GraphRunner, VisionGraphs
from .fast_attention import backends, live_length_kernel, vision_varlen_supported
from .frames import check_sizes, pad_to_temporal_patch, patchify, resize_frames, target_size
from .kv_cache_manager import KVCacheManager, Transaction
from .masks import Masks
from .positions import next_start, text_positions, vision_positions
from .prompt import VISION_END, VISION_START, encode
from .recall import QueryProbe, bring_back
from .slot_layout import SlotLayout, budget_stats


@dataclass(frozen=True)
class StreamState:
    """Everything that describes a stream besides the cache tensors. Immutable: update with ``replace``."""

    last_cache_position: int = 0  # tokens in the transcript so far: all in the cache unless bounded (moved only by the KVCacheManager)
    next_position: int = 0  # first free M-RoPE position (max so far + 1)
    block_start: Optional[int] = None  # M-RoPE start of the open vision block, None if closed
    next_t_index: int = 0  # next temporal-grid index g inside the open block
    second_per_grid_t: Optional[float] = None  # temporal_patch_size / fps of the open block
    turn_open: bool = False  # a user turn has been started and not yet answered
    frame_size: Optional[tuple[int, int]] = None  # (H, W) of the open video block (fixed by its first frame)
    pending_frame: Optional[torch.Tensor] = None  # (3, H, W) odd frame held until its pair arrives
    layout: Optional[SlotLayout] = None  # bounded streams: which slots hold which kept tokens (slot_layout.py)
    fps: Optional[float] = None  # of the open (or last) video block
    frames_seen: int = 0
    video_seconds: float = 0.0
    chunks: int = 0
    turns: int = 0

    @property
    def rope_deltas(self) -> int:
        """What transformers would cache: next M-RoPE position minus cache length."""
        return self.next_position - self.last_cache_position


class Stream:
    """The cache, graphs and segment operations of one stream over a shared ``StreamQwenModel``."""

    def __init__(self, model, tokenizer, pieces, video_pixels, image_pixels, config: StreamConfig):
        self.model, self.tokenizer, self.pieces, self.config = model, tokenizer, pieces, config
        self.video_pixels, self.image_pixels = video_pixels, image_pixels
        self.kv = KVCacheManager(*model.kv_shape(), dtype=model.dtype, device=model.device,
                                 initial_state=StreamState(), grow_min=config.grow_min,
                                 initial_capacity=config.initial_capacity, budget=config.budget())
        self.fast = config.fast and model.stream_kernels
        live = live_length_kernel(config.attention_kernel, self.fast, model.device)  # the Triton kernel
        self.masks = Masks(self.fast, live, config.fold_max_rows, config.rows_max_scores, model.dtype, model.device)
        cuda = model.device.type == "cuda"
        graphs = self.fast and (cuda or config.emulate_graphs)  # emulated: each replay re-runs its step eagerly
        # the probe builder must not refer back to this stream: engines hold no reference cycles (close/del free them)
        self.query_probe = partial(QueryProbe.for_model, model, config.recall_probe_layers)
        self.runner = (GraphRunner(model, self.kv, config, capture=cuda, masks=self.masks, probe=self.query_probe)
                       if graphs and config.cuda_graphs else None)
        varlen_graphs = graphs and config.vision_graphs and self.varlen
        self.vision_graphs = VisionGraphs(model, capture=cuda) if varlen_graphs else None

    @property
    def varlen(self) -> bool:
        return self.fast and vision_varlen_supported()

    def reset(self, keep_memory: bool = False) -> None:
        """A new stream; without ``keep_memory`` the cache, recall slab and graphs are freed (not only dropped:
        graphs captured over the buffers would keep them alive)."""
        self.kv.clear(keep_buffers=keep_memory)
        if not keep_memory:
            for graphs in (self.runner, self.vision_graphs):
                if graphs is not None:
                    graphs.release()

    # -- segments ----------------------------------------------------------------------
    def _forward(self, txn: Transaction, kind: str, inputs: torch.Tensor, positions: torch.Tensor,
                 logits: str, tree: Optional[list[int]] = None, grids: int = 0) -> Optional[torch.Tensor]:
        """Write one segment after the working head and advance it; graph or eager is decided here.

        kind "ids": (n,) token ids; "embeds": (1, n, D); "probe": (n,) token ids through the first
        ``recall_probe_layers`` layers only (recall's probe, bounded streams, on a dropped fork).
        positions (3, n). ``tree``: the segment is choice branches of these lengths (``tree``), else
        causal after the cache. ``grids``: it is that many video grids (what a bounded stream may
        evict). Returns (1, n|1, V) logits, a probe's (P, H_kv, D) query means, or None.
        """
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
                                      visible=visible)
                slots = index[:n] if out is not None else None
            if out is None:
                view, slots = self.kv.slot_view(txn, n, trim=not self.masks.live)
                probe = self.query_probe(n, n) if kind == "probe" else None
                mask = self.bounded_mask(txn, view.index, tree, probe, view.end)
        else:
            assert kind != "probe", "recall's probe runs on bounded streams only"
            if rows is not None:
                self.kv.ensure(txn, rows)
                out = self.runner.run(kind, txn.length, inputs, positions)  # None: no graph could be captured
            if out is None:
                view = self.kv.view(txn, n)
                mask = self.masks.causal(txn.length, n, self.model.dtype) if tree is None else self.masks.tree(txn.length, tree)
        if out is None:
            embeds = inputs if kind == "embeds" else self.model.embed_ids(inputs)
            if probe is not None:  # the attention of the first layers writes the query means into probe.out
                self.model.run_first_layers(view, embeds, positions, mask, probe.layers)
                out = probe.out
            else:
                out = self.model.forward_segment(view, embeds, positions, mask, logits=logits)
        txn.wrote(n, slots=slots, grids=grids, seconds_per_grid=txn.state.second_per_grid_t or 0.0,
                  next_position=max(txn.state.next_position, next_start(positions)))
        return out if logits != "none" or kind == "probe" else None

    def bounded_mask(self, txn: Transaction, slots: torch.Tensor, tree: Optional[list[int]] = None, on_query=None,
                     end: Optional[int] = None):
        """``Masks.bounded`` for new tokens of ``txn`` at (n,) device ``slots``: its working head's kept slots
        (among the first ``end`` slots, when the view is trimmed to them)."""
        visible = txn.state.layout.visible(self.kv.cache.capacity, self.model.device)
        visible = visible if end is None else visible[:end]
        return self.masks.bounded(txn.length, visible, slots, tree, on_query)

    def feed_ids(self, txn: Transaction, ids: list[int], logits: str = "none", positions: Optional[torch.Tensor] = None,
                 tree: Optional[list[int]] = None, probe: bool = False) -> Optional[torch.Tensor]:
        """Append text token ids, at the next free positions unless (3, n) ``positions`` are given.

        ``tree``: the ids are choice branches of these lengths packed one after another. ``probe``:
        recall's probe (``_forward`` kind "probe").
        """
        if not ids:
            return None
        if positions is None:
            positions = text_positions(txn.state.next_position, len(ids))
        return self._forward(txn, "probe" if probe else "ids", torch.tensor(ids, dtype=torch.long, device=self.model.device),
                             positions, logits, tree)

    def feed_text(self, txn: Transaction, text: str, logits: str = "none") -> Optional[torch.Tensor]:
        """Append trusted template text (never user text: see ``prompt.encode_user_text``)."""
        return self.feed_ids(txn, encode(self.tokenizer, text), logits)

    def feed_frames(self, txn: Transaction, frames: torch.Tensor, pixels) -> None:
        """(2k, 3, H, W) resized frames -> vision embeddings -> the open block."""
        st = txn.state
        assert st.block_start is not None, "feed_frames() needs an open vision block"
        patches, grid = patchify(frames, pixels)
        embeds = self.vision_graphs(patches, grid) if self.vision_graphs is not None else None
        if embeds is None:
            embeds = self.model.encode_vision(patches, grid, varlen=self.varlen)
        m = pixels.merge_size
        pos = vision_positions(st.block_start, grid[0], grid[1] // m, grid[2] // m, t_offset=st.next_t_index,
                               second_per_grid_t=st.second_per_grid_t,
                               tokens_per_second=self.model.config.vision_config.tokens_per_second)
        assert pos.shape[1] == embeds.shape[0], f"{pos.shape[1]} positions for {embeds.shape[0]} embeddings"
        video = bool(st.second_per_grid_t)  # an image block has 0: never evicted
        self._forward(txn, "embeds", embeds[None].to(self.model.dtype), pos, "none", grids=grid[0] if video else 0)
        txn.update(next_t_index=st.next_t_index + grid[0])

    def add_video_frames(self, txn: Transaction, frames: torch.Tensor) -> int:
        """(n, 3, H, W) resized frames into the open video block: pairs go in, an odd one is held.

        The one home of odd-frame pairing: a held frame joins the next call's first. Large calls
        are encoded ``StreamConfig.max_frames_per_forward`` frames at a time (bounded memory; the
        vision tower attends within a temporal patch, so the embeddings are the same), with a
        progress bar past a few seconds of work. Returns frames encoded.
        """
        tp = self.video_pixels.temporal_patch_size
        pending = txn.state.pending_frame
        if pending is not None:
            frames = torch.cat([pending[None], frames])
        n_full = frames.shape[0] - frames.shape[0] % tp
        step = max(tp, self.config.max_frames_per_forward // tp * tp)
        starts = range(0, n_full, step)
        for i in tqdm(starts, desc="encoding frames", unit="forward", leave=False, disable=len(starts) <= 4):
            self.feed_frames(txn, frames[i:min(i + step, n_full)], self.video_pixels)
        txn.update(pending_frame=frames[n_full] if n_full < frames.shape[0] else None)
        return n_full

    # -- what the engine appends ------------------------------------------------------
    def append_video(self, txn: Transaction, raw: list, fps: float) -> int:
        """Validated frames (any size) into the open video block, opening a turn and a block as needed.

        A new block is sized by its first frame; later frames are resized to it. Returns frames encoded.
        """
        st = txn.state
        spgt = self.video_pixels.temporal_patch_size / fps
        if st.block_start is not None and not math.isclose(spgt, st.second_per_grid_t, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"fps changed from {st.fps} to {fps} inside one video; call reset() or "
                             "ask(..., update_state=True) first")
        check_sizes(raw, self.video_pixels)
        size = st.frame_size or target_size(raw[0].shape[1], raw[0].shape[2], self.video_pixels)
        frames = resize_frames(raw, size, device=self.model.device)  # (n, 3, H, W)
        self.ensure_turn(txn)
        if st.block_start is None:
            self.open_block(txn, spgt)
        n_encoded = self.add_video_frames(txn, frames)
        txn.update(frame_size=size, fps=fps, chunks=st.chunks + 1, frames_seen=st.frames_seen + len(raw),
                   video_seconds=st.video_seconds + len(raw) / fps)
        return n_encoded

    def append_image(self, txn: Transaction, raw: list) -> None:
        """One still image as its own image block (closing an open video block first)."""
        size = target_size(raw[0].shape[1], raw[0].shape[2], self.image_pixels)
        frames = pad_to_temporal_patch(resize_frames(raw, size, device=self.model.device),
                                       self.image_pixels.temporal_patch_size)
        self.ensure_turn(txn)
        self.open_block(txn, 0.0)
        self.feed_frames(txn, frames, self.image_pixels)
        self.close_block(txn)
        txn.update(chunks=txn.state.chunks + 1)

    def warm(self, txn: Transaction, raw: list, fps: float) -> None:
        """Run every segment shape a stream of these frames uses once (graphs captured), on ``txn``."""
        self.append_video(txn, raw, fps)  # the chunk's vision and LM graphs
        if self.kv.recall is not None:  # recall's host slab, sized for grids of these frames
            self.kv.recall.reserve(self.kv.cache, max(s.n for s in txn.state.layout.spans if s.grid >= 0))
        self.append_video(txn, raw[:1], fps)  # a held frame ...
        self.close_block(txn)  # ... flushed padded: the one-grid graphs
        for b in self.config.graph_buckets:  # questions and decode steps of every bucket (and recall's probes)
            self.feed_ids(txn.fork(), [0] * b, logits="last")
            if self.kv.recall is not None:
                self.feed_ids(txn.fork(), [0] * b, probe=True)

    # -- blocks and turns --------------------------------------------------------------
    def ensure_turn(self, txn: Transaction) -> None:
        if not txn.state.turn_open:
            first = txn.length == 0
            self.feed_text(txn, self.pieces.first_turn_header if first else self.pieces.turn_header)
            txn.update(turn_open=True)

    def open_block(self, txn: Transaction, second_per_grid_t: float) -> None:
        """Close any open block and feed ``<|vision_start|>`` (one segment); a new block starts after it.

        ``second_per_grid_t``: temporal_patch_size / fps for a video, 0 for an image.
        """
        self.close_block(txn, encode(self.tokenizer, VISION_START))
        txn.update(block_start=txn.state.next_position, next_t_index=0, second_per_grid_t=second_per_grid_t)

    def close_block(self, txn: Transaction, then_ids: list[int] = (), logits: str = "none",
                    probe: bool = False) -> Optional[torch.Tensor]:
        """Close an open video block and feed ``then_ids`` in the same segment (one forward, not two).

        A held odd frame is encoded padded first (the last frame repeated, as the processor pads).
        ``probe``: recall's probe on a dropped fork: the held frame is left out and the ids run as
        ``_forward`` kind "probe" (-> (P, H_kv, D) query means).
        """
        ids = list(then_ids)
        if txn.state.block_start is not None:
            pending = txn.state.pending_frame
            if pending is not None and not probe:
                self.feed_frames(txn, pad_to_temporal_patch(pending[None], self.video_pixels.temporal_patch_size),
                                 self.video_pixels)
            txn.update(block_start=None, next_t_index=0, second_per_grid_t=None, pending_frame=None, frame_size=None)
            ids = encode(self.tokenizer, VISION_END) + ids
        return self.feed_ids(txn, ids, logits=logits, probe=probe) if ids else None

    def open_question(self, txn: Transaction, question_ids: list[int]) -> torch.Tensor:
        """Close the block and feed the question (its literal ``question_ids``) + assistant header; returns (1, V)
        logits of the next token.

        A bounded stream with recall first brings back the evicted grids most relevant to the question.
        """
        if self.kv.recall is not None and txn.state.layout.stored:
            bring_back(self, txn, question_ids)
        self.ensure_turn(txn)
        return self.close_block(txn, self.pieces.question_ids(self.tokenizer, question_ids), logits="last")[:, -1]

    def commit_answer(self, txn: Transaction, unfed_ids: list[int]) -> None:
        """Feed the answer tokens decoding did not feed, and close the turn."""
        self.feed_ids(txn, list(unfed_ids) + encode(self.tokenizer, self.pieces.answer_tail))
        txn.update(turn_open=False, turns=txn.state.turns + 1)

    def stats(self, st: StreamState) -> dict:
        """Numbers of the committed state ``st`` (one immutable record: consistent without a lock) and backends."""
        kept = self.kv.kept(st)
        return {
            "cache_tokens": kept, "cache_bytes": self.kv.cache.nbytes(kept),
            **budget_stats(st.layout, self.config, st.last_cache_position, st.video_seconds,
                           self.kv.recall.nbytes() if self.kv.recall is not None else 0),
            "cache_reserved_bytes": self.kv.reserved_bytes(), "frames_seen": st.frames_seen,
            "pending_frames": int(st.pending_frame is not None), "video_seconds": st.video_seconds,
            "chunks": st.chunks, "turns": st.turns, "next_position": st.next_position,
            "rope_deltas": st.rope_deltas, "frame_size": st.frame_size, "fps": st.fps,
            "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", ""),
            **backends(self.model.config, self.fast, self.masks.live), "fast": self.config.fast,
            "cache": "slots+budget" if self.kv.bounded else "preallocated+length-counter",
            "cache_allocations": self.kv.cache.allocations,
            "cuda_graphs": self.runner.status() if self.runner is not None else "off",
            "vision_graphs": self.vision_graphs.status() if self.vision_graphs is not None else "off",
        }
