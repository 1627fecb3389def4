"""One stream over a shared model: its state record and what each of the engine's calls appends to it.

``StreamState`` is the stream's whole bookkeeping besides the K/V tensors, one immutable record
(the ``KVCacheManager``'s committed head). ``Stream`` turns what the engine asks for into
transcript pieces (``transcript.Grammar``: the family's layout) on a ``Transaction``: turns,
video frames (odd frames held and paired here), images, questions (with recall of evicted video
on bounded streams), answers and choice scoring. It is family-agnostic; ``SegmentWriter``
writes the pieces (graph or eager). Nothing here commits: the engine does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import recall, scoring
from .config import StreamConfig
from .fast_attention import backends
from .frames import check_sizes, pad_to_temporal_patch, resize_frames, target_size
from .kv_cache_manager import Transaction
from .segment_writer import SegmentWriter
from .slot_layout import SlotLayout, budget_stats
from .transcript import Grammar, Segment, pair_times


@dataclass(frozen=True)
class StreamState:
    """Everything that describes a stream besides the cache tensors. Immutable: update with ``replace``."""

    last_cache_position: int = 0  # tokens in the transcript so far: all in the cache unless bounded (moved only by the KVCacheManager)
    next_position: int = 0  # first free M-RoPE position (max so far + 1)
    block_start: Optional[int] = None  # a video is open: the M-RoPE start of its block (after its start marker)
    next_t_index: int = 0  # frame pairs of the open video so far (its next temporal-grid index g)
    second_per_grid_t: Optional[float] = None  # temporal_patch_size / fps of the open video
    video_start_s: float = 0.0  # stream time of the open video's first frame (frame k: + k / fps)
    turn_open: bool = False  # a user turn has been started and not yet answered
    frame_size: Optional[tuple[int, int]] = None  # (H, W) of the open video (fixed by its first frame)
    pending_frame: Optional[torch.Tensor] = None  # (3, H, W) odd frame held until its pair arrives
    pending_time: Optional[float] = None  # its time in seconds
    layout: Optional[SlotLayout] = None  # bounded streams: which slots hold which kept tokens (slot_layout.py)
    fps: Optional[float] = None  # of the open (or last) video
    frames_seen: int = 0
    video_seconds: float = 0.0  # stream time: seconds of video appended so far
    last_frame_s: Optional[float] = None  # the time of the last frame appended
    chunks: int = 0
    turns: int = 0

    @property
    def rope_deltas(self) -> int:
        """What transformers would cache: next M-RoPE position minus cache length."""
        return self.next_position - self.last_cache_position


class Stream:
    """What each call appends to one stream over a shared ``StreamQwenModel``, in its family's layout."""

    def __init__(self, model, tokenizer, pieces, video_pixels, image_pixels, config: StreamConfig, pool=None):
        self.model, self.tokenizer, self.pieces, self.config = model, tokenizer, pieces, config
        self.video_pixels, self.image_pixels = video_pixels, image_pixels
        self.grammar = Grammar(model.family, pieces, tokenizer, model.config.vision_config)
        self.writer = SegmentWriter(model, config, StreamState(), pool)
        self.kv = self.writer.kv

    def reset(self, keep_memory: bool = False) -> None:
        self.writer.reset(keep_memory)

    # -- turns and video -----------------------------------------------------------------
    def ensure_turn(self, txn: Transaction) -> None:
        if not txn.state.turn_open:
            self.writer.feed(txn, Segment((self.grammar.turn(first=txn.length == 0),)))
            txn.update(turn_open=True)

    def open_video(self, txn: Transaction, second_per_grid_t: float, start_s: float) -> None:
        """Start a video (its block's start marker where the layout has one); ``start_s``: its first frame's time."""
        self.writer.feed(txn, Segment(self.grammar.open_video()))
        txn.update(block_start=txn.state.next_position, next_t_index=0, second_per_grid_t=second_per_grid_t,
                   video_start_s=start_s)

    def feed_pairs(self, txn: Transaction, frames: torch.Tensor, times: Sequence[float]) -> None:
        """(2k, 3, H, W) resized frames of the open video (``times`` one per frame) -> one forward of k pairs."""
        st = txn.state
        vision, (k, h, w) = self.writer.encode(frames, self.video_pixels)
        segment = self.grammar.pairs((h, w), self.video_pixels.merge_size,
                                     pair_times(times, self.video_pixels.temporal_patch_size), st.block_start,
                                     st.next_t_index, st.second_per_grid_t)
        self.writer.feed(txn, segment, vision)
        txn.update(next_t_index=st.next_t_index + k)

    def add_video_frames(self, txn: Transaction, frames: torch.Tensor, times: list[float]) -> int:
        """(n, 3, H, W) resized frames (and their times) into the open video: pairs go in, an odd one is held.

        The one home of odd-frame pairing: a held frame joins the next call's first. Large calls
        are encoded ``StreamConfig.max_frames_per_forward`` frames at a time (bounded memory; the
        vision tower attends within a temporal patch, so the embeddings are the same), with a
        progress bar past a few seconds of work. Returns frames encoded.
        """
        tp = self.video_pixels.temporal_patch_size
        pending = txn.state.pending_frame
        if pending is not None:
            frames, times = torch.cat([pending[None], frames]), [txn.state.pending_time, *times]
        n_full = frames.shape[0] - frames.shape[0] % tp
        step = max(tp, self.config.max_frames_per_forward // tp * tp)
        starts = range(0, n_full, step)
        for i in tqdm(starts, desc="encoding frames", unit="forward", leave=False, disable=len(starts) <= 4):
            end = min(i + step, n_full)
            self.feed_pairs(txn, frames[i:end], times[i:end])
        held = n_full < frames.shape[0]
        txn.update(pending_frame=frames[n_full] if held else None, pending_time=times[n_full] if held else None)
        return n_full

    def close_video(self, txn: Transaction, then: tuple = (), logits: str = "none",
                    probe: bool = False) -> Optional[torch.Tensor]:
        """Close an open video and feed ``then`` (text pieces) in the same segment (one forward, not two).

        A held odd frame is encoded padded first (the last frame repeated, as the processor pads).
        ``probe``: recall's probe on a dropped fork: the held frame is left out and the text runs
        through the first layers only (-> (P, H_kv, D) query means).
        """
        pieces = tuple(then)
        st = txn.state
        if st.block_start is not None:
            if st.pending_frame is not None and not probe:
                tp = self.video_pixels.temporal_patch_size
                self.feed_pairs(txn, pad_to_temporal_patch(st.pending_frame[None], tp), [st.pending_time] * tp)
            txn.update(block_start=None, next_t_index=0, second_per_grid_t=None, pending_frame=None,
                       pending_time=None, frame_size=None)
            pieces = self.grammar.close_video() + pieces
        return self.writer.feed(txn, Segment(pieces), logits=logits, probe=probe) if pieces else None

    # -- what the engine appends ------------------------------------------------------
    def append_video(self, txn: Transaction, raw: list, fps: float, timestamps: Optional[list[float]] = None) -> int:
        """Validated frames (any size) into the open video, opening a turn and a video as needed.

        A new video is sized by its first frame; later frames are resized to it. ``timestamps``:
        each frame's time in seconds (default: the stream's time at ``fps``). Returns frames encoded.
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
            self.open_video(txn, spgt, timestamps[0] if timestamps is not None else st.video_seconds)
        if timestamps is None:  # frame k of the video at its start + k / fps (the processors' idx / fps)
            first = 2 * txn.state.next_t_index + (txn.state.pending_frame is not None)
            timestamps = [txn.state.video_start_s + (first + k) / fps for k in range(len(raw))]
            seconds = st.video_seconds + len(raw) / fps
        else:  # the stream's time is right after the last frame
            seconds = max(st.video_seconds, timestamps[-1] + 1 / fps)
        n_encoded = self.add_video_frames(txn, frames, list(timestamps))
        txn.update(frame_size=size, fps=fps, chunks=st.chunks + 1, frames_seen=st.frames_seen + len(raw),
                   video_seconds=seconds, last_frame_s=timestamps[-1])
        return n_encoded

    def append_image(self, txn: Transaction, raw: list) -> None:
        """One still image as its own image block (closing an open video first)."""
        check_sizes(raw, self.image_pixels)
        size = target_size(raw[0].shape[1], raw[0].shape[2], self.image_pixels)
        frames = pad_to_temporal_patch(resize_frames(raw, size, device=self.model.device),
                                       self.image_pixels.temporal_patch_size)
        self.ensure_turn(txn)
        self.close_video(txn)
        vision, (_, h, w) = self.writer.encode(frames, self.image_pixels)
        self.writer.feed(txn, self.grammar.image((h, w), self.image_pixels.merge_size), vision)
        txn.update(chunks=txn.state.chunks + 1)

    def open_question(self, txn: Transaction, question_ids: list[int]) -> torch.Tensor:
        """Close the video and feed the question (its literal ``question_ids``) + assistant header; returns (1, V)
        logits of the next token.

        A bounded stream with recall first brings back the evicted grids most relevant to the question.
        """
        if self.kv.recall is not None and txn.state.layout.stored:
            self.recall(txn, question_ids)
        self.ensure_turn(txn)
        return self.close_video(txn, (self.grammar.question(question_ids),), logits="last")[:, -1]

    def recall(self, txn: Transaction, question_ids: list[int]) -> None:
        """Score the stored grids with the question's own queries (read on a dropped fork of ``txn``) and load
        the best ``recall_grids`` into ``txn``: visible to this question and its answer only."""
        probe = txn.fork()
        self.ensure_turn(probe)
        queries = self.close_video(probe, (self.grammar.question(question_ids),), probe=True)  # (P, H_kv, D)
        stored = txn.state.layout.stored
        chosen = recall.best(self.kv.recall.scores(queries, stored), stored, self.config.recall_grids)
        self.kv.bring_back(txn, chosen)

    def feed_answer_token(self, txn: Transaction, token: int) -> torch.Tensor:
        """One decoded token into the answer -> (1, V) logits of the next."""
        return self.writer.feed_ids(txn, [token], logits="last")[:, -1]

    def commit_answer(self, txn: Transaction, unfed_ids: list[int]) -> None:
        """Feed the answer tokens decoding did not feed, and close the turn."""
        self.writer.feed(txn, Segment((self.grammar.answer(unfed_ids),)))
        txn.update(turn_open=False, turns=txn.state.turns + 1)

    def score_choices(self, txn: Transaction, question_logits: torch.Tensor, choice_ids: list[list[int]]) -> list[float]:
        """question_logits: (V,) after the question -> each choice's summed log-probability (``scoring``), on forks
        of ``txn`` (the transaction itself is left where it was)."""
        scores = scoring.first_scores(question_logits, choice_ids)
        tree = self.model.config._attn_implementation in scoring.TREE_ATTENTION
        plan = scoring.plan(choice_ids, self.config.choice_chunk_tokens, tree)
        for group in plan.trees:
            branches = [choice_ids[k] for k in group]
            flat, positions, lengths = scoring.tree_inputs(branches, txn.state.next_position)
            logits = self.writer.feed_ids(txn.fork(), flat, "all", positions=positions, tree=lengths)[0]  # (L, V)
            for k, s in zip(group, scoring.tree_scores(logits, branches)):
                scores[k] += s
        for k in plan.alone:
            fork = txn.fork()
            for fed, targets in scoring.pieces(choice_ids[k], plan.limit):
                logits = self.writer.feed_ids(fork, fed, logits="all")[0]  # (len(fed), V)
                scores[k] += float(scoring.gather(logits, targets).sum())
        return scores

    def warm(self, txn: Transaction, raw: list, fps: float) -> None:
        """Run every segment shape a stream of these frames uses once (graphs captured), on ``txn``."""
        self.append_video(txn, raw, fps)  # the chunk's vision and LM graphs
        if self.kv.recall is not None:  # recall's host slab, sized for units of these frames
            self.kv.recall.reserve(self.kv.cache, max(s.n for s in txn.state.layout.spans if s.grid >= 0))
        if self.model.family.pair_blocks:  # every length of timestamp text a stream writes (up to ~28 hours)
            for start in [0.0, *_timestamp_lengths(len(raw), fps)]:
                fork = txn.fork()
                self.append_video(fork, raw, fps, [start + k / fps for k in range(len(raw))])
                fork = txn.fork()
                self.append_video(fork, raw[:1], fps, [start])
                self.close_video(fork)  # a held frame flushed at a question, at this length
        self.append_video(txn, raw[:1], fps)  # a held frame ...
        self.close_video(txn)  # ... flushed padded: the one-pair graphs
        for b in self.config.graph_buckets:  # questions and decode steps of every bucket (and recall's probes)
            self.writer.feed_ids(txn.fork(), [0] * b, logits="last")
            if self.kv.recall is not None:
                self.writer.feed_ids(txn.fork(), [0] * b, probe=True)
        # ask_choice's eager forwards (a question, choice trees of a few rows and of many, a choice scored alone):
        # their attention kernels compile here, not in the first ask_choice (issue 21 measured 0.9-1.3 s there)
        fork = txn.fork()
        q_logits = self.open_question(fork, [0] * 4)[0]  # (V,)
        self.score_choices(fork, q_logits, [[0, 0], [0, 0]])  # 2 rows: the small row block of every model
        self.score_choices(fork, q_logits, [[0] * 12, [0] * 13, [0] * (self.config.choice_chunk_tokens + 2)])

    def stats(self, st: StreamState) -> dict:
        """Numbers of the committed state ``st`` (one immutable record: consistent without a lock) and backends."""
        kept, w = self.kv.kept(st), self.writer
        return {
            "family": self.model.family.name,
            "cache_tokens": kept, "cache_bytes": self.kv.cache.nbytes(kept),
            **budget_stats(st.layout if self.kv.bounded else None, self.config, st.last_cache_position,
                           st.video_seconds, self.kv.recall.nbytes() if self.kv.recall is not None else 0),
            "cache_reserved_bytes": self.kv.reserved_bytes(), "frames_seen": st.frames_seen,
            "pending_frames": int(st.pending_frame is not None), "video_seconds": st.video_seconds,
            "chunks": st.chunks, "turns": st.turns, "next_position": st.next_position,
            "rope_deltas": st.rope_deltas, "frame_size": st.frame_size, "fps": st.fps,
            "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", ""),
            **backends(self.model.config, w.fast, w.masks.live, w.varlen), "fast": self.config.fast,
            "cache": ("pool pages" + ("+budget" if self.kv.bounded else "") if w.pool is not None else
                      "slots+budget" if self.kv.bounded else "preallocated+length-counter"),
            "cache_allocations": self.kv.cache.allocations,
            **(pool_stats(w.pool, self.kv.cache) if w.pool is not None else {}),
            "cuda_graphs": w.runner.status() if w.runner is not None else "off",
            "vision_graphs": w.vision_graphs.status() if w.vision_graphs is not None else "off",
        }


def _timestamp_lengths(frames: int, fps: float) -> list[float]:
    """Start times of chunks whose frame pairs' timestamps take every number of integer digits from 1 to 5, and
    chunks that straddle each power of ten (pairs of two lengths): one of each chunk length Qwen3-VL writes."""
    span = frames / fps
    return [max(0.0, 10.0 ** d - back * span) for d in range(1, 6) for back in (1.0, 0.5)]


def pool_stats(pool, cache) -> dict:
    """A pooled stream's pages, and its pool's size, use and batching (``KVPool.stats``)."""
    return {"pool_pages_owned": cache.owned, **pool.stats()}
