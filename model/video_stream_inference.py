"""VideoStreamInference: one stream of frames into Qwen2.5-VL, and questions at any moment.

    engine = VideoStreamInference.from_pretrained(path)      # or VideoStreamInference(model, processor)
    engine.append_frames(chunk, fps=30)                      # encode once into the KV cache
    engine.ask("What just happened?")                        # isolated: the stream is untouched
    engine.ask_choice("Which shape came last?", ["circle", "square"])

Each engine is one stream; any number of engines share one model (the model is stateless).
Every public call is a transaction: it works on a copy of the stream's head and either
commits it in one assignment as its last step or raises having committed nothing, whatever
the exception (``KeyboardInterrupt`` and out-of-memory included). Calls on one engine are
serialised by its lock, so an appending thread and an asking thread see some sequential order.
"""
from __future__ import annotations

import asyncio
import gc
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Optional, Sequence

import torch

from . import compat
from .arguments import check_bool, check_choices, check_fps, check_max_new_tokens, check_timestamps, user_text_ids
from .config import StreamConfig, resolve_config
from .answer_stream import AnswerStream, finish_answer, start_answer, streamer_feed
from .chunk_info import ChunkInfo
from .decoding import Answer, ChoiceResult, make_sampler
from .recall import recalled
from .slot_layout import check_budget
from .frames import to_frame_list
from .kv_pool import KVPool
from .loading import load_checkpoint
from .prompt import encode, extract_vision_segment, prompt_pieces, token_ids
from .scoring import TREE_ATTENTION
from .stream import Stream, StreamState
from .stream_qwen_model import StreamQwenModel
from .transaction import Transactional


class VideoStreamInference(Transactional):
    """One stream over a shared ``StreamQwenModel``: append frames, ask, ask_choice.

    ``fast`` (default True) turns on the stream attention kernels and, on CUDA, graphs; it is
    shorthand for ``config=StreamConfig(fast=...)``. ``config`` holds every other setting.
    """

    def __init__(self, model: StreamQwenModel, processor: Any, fast: Optional[bool] = None,
                 config: Optional[StreamConfig] = None, pool: Optional[KVPool] = None):
        """A new, empty stream over ``model``.

        model: a ``StreamQwenModel`` (shared by any number of engines; never modified).
        processor: its ``AutoProcessor`` (tokenizer, chat template, image and video processors).
        fast: True/False turns the fast path (stream kernels, CUDA graphs) on or off; None keeps
        ``config``'s (default on). config: a ``StreamConfig`` with every other setting.
        pool: a ``KVPool`` of ``model``: the stream keeps its K/V in pages of the pool and its forwards
        run on the pool's scheduler, batched with the other pooled streams' (README "Many streams").
        """
        if not isinstance(model, StreamQwenModel):
            raise TypeError(
                f"model must be a StreamQwenModel, got {type(model).__name__}; "
                "load it with StreamQwenModel.from_pretrained(path) or VideoStreamInference.from_pretrained(path)"
            )
        compat.check_version()
        self.config = resolve_config(config, fast=check_bool("fast", fast) if fast is not None else None)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pieces = prompt_pieces(processor)
        self.video_pixels = model.family.video_pixels(processor)
        self.image_pixels = model.family.image_pixels(processor)
        ids = token_ids(self.tokenizer, ["<|im_end|>", "<|endoftext|>"])
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.stop_ids = set(ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_positions = compat.text_config(model.config).max_position_embeddings
        self._check_budget()
        self._check_pool(pool)
        self.pool = pool
        self._stream = Stream(model, self.tokenizer, self.pieces, self.video_pixels, self.image_pixels, self.config,
                              pool)
        Transactional.__init__(self)
        self._warned_fps = False
        self._worker: Optional[ThreadPoolExecutor] = None  # the thread of the *_async calls (made on first use)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Optional[str] = None, dtype=None,
                        attn_implementation: str = "sdpa", fast: Optional[bool] = None,
                        config: Optional[StreamConfig] = None) -> "VideoStreamInference":
        """Load a local Qwen2.5-VL checkpoint folder (weights, config, processor files).

        Defaults: CUDA if available (bf16) else CPU (fp32); sdpa attention; the fast path on.
        """
        return cls(*load_checkpoint(path, device, dtype, attn_implementation), fast=fast, config=config)

    # ------------------------------------------------------------------ public API
    def append_frames(self, frames: Any, fps: Optional[float] = None,
                      timestamps: Optional[Sequence[float]] = None) -> ChunkInfo:
        """Encode a chunk of video frames (any count >= 1) into the open video block.

        frames: one frame or a sequence (numpy HxWx3 uint8 RGB, PIL RGB images, torch (3,H,W) or
        (H,W,3) uint8 or float in [0, 1], or an (N,H,W,3) array). fps: of this video block
        (None: the stream's last fps). A new video block is sized by its first frame; later frames
        of another size are resized to it. ``timestamps``: each frame's time in seconds (what
        ``open_video`` yields), non-decreasing over the stream; Qwen3-VL writes them before each
        frame pair (default: the stream's time at ``fps``). Returns a ``ChunkInfo``.
        """
        t0 = time.perf_counter()
        raw = to_frame_list(frames)
        times = check_timestamps(timestamps, len(raw)) if timestamps is not None else None
        return self._transaction(self._append_frames, raw, fps, times, t0)

    def append_image(self, image: Any) -> ChunkInfo:
        """Encode one still image as its own image block (closes an open video block first)."""
        t0 = time.perf_counter()
        raw = to_frame_list(image)
        if len(raw) != 1:
            raise ValueError(f"append_image takes one image, got {len(raw)}; use append_frames for video")
        return self._transaction(self._append_image, raw, t0)

    def ask(self, question: str, update_state: bool = False, max_new_tokens: int = 128, streamer=None,
            **generation) -> Answer:
        """Answer from everything streamed so far; returns an ``Answer`` (text, token ids, ttft_s, ...).

        update_state=False: the stream is left bit-identical. True: question and answer become a
        conversation turn, and frames appended later open a new turn. Greedy unless
        ``do_sample=True`` (options: temperature, top_k, top_p, min_p, repetition_penalty, seed).
        ``streamer``: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) fed as
        ``generate(streamer=...)`` feeds it. Special-token text in the question is read as literal text.
        """
        t0 = time.perf_counter()
        question_ids, sampler = self._check_ask(question, update_state, max_new_tokens, generation)
        return self._transaction(self._ask, question_ids, update_state, max_new_tokens, sampler, streamer, t0)

    def ask_stream(self, question: str, update_state: bool = False, max_new_tokens: int = 128, streamer=None,
                   **generation) -> AnswerStream:
        """Like ``ask``, but an iterator of text pieces as they are decoded (``AnswerStream``).

        Its ``answer`` is the full ``Answer`` once exhausted. Breaking out early (or ``close()``)
        leaves the stream bit-identical; other threads' calls wait while it is open.
        """
        t0 = time.perf_counter()
        question_ids, sampler = self._check_ask(question, update_state, max_new_tokens, generation)
        return AnswerStream(self, question_ids, update_state, max_new_tokens, sampler, streamer, t0)

    def ask_choice(self, question: str, choices: Sequence[str]) -> ChoiceResult:
        """Score each choice by log p(choice | video, question); isolated like ``ask``.

        Returns a ``ChoiceResult``: the best choice by summed log-probability, every score, and
        the length-normalised scores. Choices are read as literal text.
        """
        t0 = time.perf_counter()
        limit = self.config.max_question_tokens
        question_ids = user_text_ids("question", question, self.tokenizer, limit)
        choices = check_choices(choices)
        choice_ids = [user_text_ids(f"choice {i}", c, self.tokenizer, limit) for i, c in enumerate(choices)]
        scores, seen_again = self._transaction(self._score, question_ids, choice_ids)
        norm = [s / len(ids) for s, ids in zip(scores, choice_ids)]
        best = max(range(len(scores)), key=scores.__getitem__)
        return ChoiceResult(choices[best], best, scores, norm, choices, time.perf_counter() - t0, seen_again)

    def reserve(self, tokens: int) -> None:
        """Allocate K/V room for ``tokens`` now, so the cache never grows (and graphs never re-capture) below it."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
        self._transaction(self._reserve, tokens)

    def warmup(self, frame_size: tuple[int, int], chunk_frames: int = 4, fps: float = 2.0,
               capacity: Optional[int] = None, freeze_gc: bool = True) -> dict:
        """Prepare a stream for real time: reserve ``capacity`` tokens and capture every CUDA graph now.

        Runs a dummy chunk of ``chunk_frames`` black frames of ``frame_size`` (H, W) (and a lone held
        frame), questions of every graph bucket and decode steps inside a transaction that is then
        dropped: the stream is left exactly as it was. ``freeze_gc``: afterwards move every object
        that exists (model, graphs) out of the garbage collector's full passes (``gc.freeze()``),
        which otherwise walk ~10^6 objects and stall a chunk every few seconds (45 ms on the H200
        host). Frozen objects are still freed when their last reference goes: an engine holds no
        reference cycles, so ``close()``, ``reset()`` or dropping it frees its memory all the same.
        Returns what was captured and how long it took.
        """
        check_bool("freeze_gc", freeze_gc)
        t0 = time.perf_counter()
        check_fps(fps)
        if capacity is not None:
            self.reserve(capacity)
        frames = [torch.zeros(3, *frame_size, dtype=torch.uint8)] * chunk_frames
        raw = to_frame_list(frames)
        info = self._transaction(self._warmup, raw, fps, t0)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        return info

    def reset(self, keep_memory: bool = False) -> None:
        """Drop the stream (state, snapshots, cached tokens) and start a new one on the same model.

        ``keep_memory=False``: the stream's memory is freed now (cache, recall slab and the CUDA
        graphs captured over them), and a reserved capacity goes with it (call ``warmup`` again
        before real-time use). ``keep_memory=True``: the cache buffers, the recall slab and the
        graphs stay for the next stream (nothing is re-allocated or re-captured); what they hold is
        never read again. The next stream equals one on a fresh engine either way.
        """
        check_bool("keep_memory", keep_memory)
        self._transaction(self._reset, keep_memory)

    def close(self) -> None:
        """Free the stream's memory now (cache, recall slab, graphs); the engine refuses calls afterwards.

        ``with VideoStreamInference(...) as engine:`` closes it at the end of the block. Closing
        twice is harmless; the model is shared and stays. Dropping the last reference to an engine
        frees the same memory (engines hold no reference cycles, so no garbage-collector pass is
        needed, also after ``warmup(freeze_gc=True)``).
        """
        if not self._closed:
            self._transaction(self._close)

    # ------------------------------------------------------------------ asyncio
    async def append_frames_async(self, frames: Any, fps: Optional[float] = None,
                                  timestamps: Optional[Sequence[float]] = None) -> ChunkInfo:
        """``append_frames`` for asyncio: awaits the call, run in this engine's own worker thread (so the calls of
        many engines over one ``KVPool`` are batched together by its scheduler)."""
        return await self._run_async(self.append_frames, frames, fps, timestamps)

    async def append_image_async(self, image: Any) -> ChunkInfo:
        """``append_image`` for asyncio (see ``append_frames_async``)."""
        return await self._run_async(self.append_image, image)

    async def ask_async(self, question: str, update_state: bool = False, max_new_tokens: int = 128,
                        **generation) -> Answer:
        """``ask`` for asyncio (see ``append_frames_async``)."""
        return await self._run_async(self.ask, question, update_state, max_new_tokens, **generation)

    async def ask_choice_async(self, question: str, choices: Sequence[str]) -> ChoiceResult:
        """``ask_choice`` for asyncio (see ``append_frames_async``)."""
        return await self._run_async(self.ask_choice, question, choices)

    async def _run_async(self, call, *args, **kwargs):
        """Run a blocking call in the engine's worker thread. Cancelling the awaiting task does not stop a call
        that has started (it completes or fails as a whole, as a transaction)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        return await asyncio.get_running_loop().run_in_executor(self._worker, partial(call, *args, **kwargs))

    def __enter__(self) -> "VideoStreamInference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The stream's numbers and the backends it runs on.

        cache_tokens / cache_bytes / cache_reserved_bytes / cache_allocations, frames_seen,
        pending_frames, video_seconds, chunks, turns, next_position, rope_deltas, frame_size, fps,
        device, dtype, fast, text_attention, vision_attention, cuda_graphs, vision_graphs (each
        "off" or "on (N captures)"), choice_scoring, attn_implementation, transformers; the memory
        budget: bounded, cache_budget_tokens, video_window_seconds, sink_frames, transcript_tokens
        (all tokens ever appended; cache_tokens are the kept ones), kept_video_seconds,
        evicted_seconds / evicted_grids / evicted_tokens.
        """
        return {**self._stream.stats(self.stream_state), "attn_implementation": self.attn_implementation,
                "choice_scoring": "tree-batched" if self.attn_implementation in TREE_ATTENTION else "sequential",
                "transformers": str(compat.TRANSFORMERS_VERSION)}

    @property
    def stream_state(self) -> StreamState:
        """The committed state of this stream (immutable; positions, open block, held frame, counters)."""
        return self.kv.state

    state = stream_state

    @property
    def kv(self):
        """The stream's ``KVCacheManager``."""
        return self._stream.kv

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    @staticmethod
    def _extract_vision_segment(prompt: str) -> tuple[str, str, str]:
        """(before, vision, after) of a chat-template rendering; see ``prompt.extract_vision_segment``."""
        return extract_vision_segment(prompt)

    # ------------------------------------------------------------------ the work of each call
    @torch.no_grad()
    def _append_frames(self, raw: list, fps, timestamps: Optional[list[float]], t0: float):
        txn = self.kv.begin()
        st = txn.state
        fps = check_fps(fps if fps is not None else st.fps if st.fps is not None else self._default_fps())
        if timestamps is not None and st.last_frame_s is not None and timestamps[0] < st.last_frame_s:
            raise ValueError(f"timestamps go back in time: the first is {timestamps[0]} s, the stream's last frame "
                             f"was at {st.last_frame_s} s")
        n_encoded = self._stream.append_video(txn, raw, fps, timestamps)
        self.kv.settle(txn)
        self._sync()  # encode_s is the time until the chunk is in the cache, not until its kernels are queued
        return txn, ChunkInfo(st.chunks, len(raw), n_encoded, txn.state.pending_frame is not None,
                              txn.length - st.last_cache_position, self.kv.kept(txn.state), time.perf_counter() - t0)

    @torch.no_grad()
    def _append_image(self, raw: list, t0: float):
        txn = self.kv.begin()
        st = txn.state
        self._stream.append_image(txn, raw)
        self.kv.settle(txn)
        self._sync()
        return txn, ChunkInfo(st.chunks, 1, 1, False, txn.length - st.last_cache_position, self.kv.kept(txn.state),
                              time.perf_counter() - t0)

    def _check_ask(self, question, update_state, max_new_tokens, generation: dict) -> tuple[list[int], Any]:
        """-> (the question's literal ids, a sampler): every argument checked before any work."""
        question_ids = user_text_ids("question", question, self.tokenizer, self.config.max_question_tokens)
        check_bool("update_state", update_state)
        check_max_new_tokens(max_new_tokens, self.max_positions - len(question_ids))
        return question_ids, make_sampler(self.model.device, **generation)

    def _ask(self, question_ids: list[int], update_state: bool, max_new_tokens: int, sampler, streamer, t0: float):
        txn, decoding, first_logits = start_answer(self, question_ids, update_state, max_new_tokens, sampler, t0)
        with streamer_feed(streamer, self.tokenizer) as put:
            for tok in decoding:
                put(tok)
        return (txn if update_state else None), finish_answer(self, txn, decoding, first_logits, update_state, t0)

    @torch.no_grad()
    def _score(self, question_ids: list[int], choice_ids: list[list[int]]):
        txn = self.kv.begin(commits=False)
        q_logits = self._stream.open_question(txn, question_ids)[0]  # (V,)
        return None, (self._stream.score_choices(txn, q_logits, choice_ids), recalled(txn.state.layout))

    def _reserve(self, tokens: int):
        self.kv.reserve(tokens)
        return None, None

    def _reset(self, keep_memory: bool):
        self._stream.reset(keep_memory)
        return None, None

    def _close(self):
        self._stream.reset(keep_memory=False)
        self._closed = True
        return None, None

    @torch.no_grad()
    def _warmup(self, raw: list, fps: float, t0: float):
        self._stream.warm(self.kv.begin(commits=False), raw, fps)  # the transaction is dropped: the stream is untouched
        self._sync()
        return None, {"seconds": time.perf_counter() - t0, **self._stream.stats(self.stream_state)}

    def _check_budget(self) -> None:
        """Refuse a budget this model and processor cannot work with (``slot_layout.check_budget``)."""
        budget = self.config.budget()
        if budget is not None and budget.recall_grids and not self.model.stream_kernels:
            raise ValueError("StreamConfig.recall_grids needs the model built on attn_implementation='sdpa' (recall "
                             "reads the question's queries in the stream attention dispatcher)")
        pix = self.video_pixels
        check_budget(budget, self.config.sink_frames, max(1, pix.min_pixels // pix.factor**2),
                     len(encode(self.tokenizer, self.pieces.first_turn_header)) + 2)  # + vision start/end

    def _check_pool(self, pool) -> None:
        """A pool must be a ``KVPool`` of this model, and pooled streams run the stream kernels."""
        if pool is None:
            return
        if not isinstance(pool, KVPool):
            raise TypeError(f"pool must be a KVPool (KVPool.for_model(model, tokens=...)), got {type(pool).__name__}")
        if pool.model is not self.model:
            raise ValueError("pool belongs to another model: build one with KVPool.for_model(model) for this model")
        if not self.config.fast:
            raise ValueError("a pooled stream runs the stream kernels: StreamConfig(fast=False) cannot take a pool")

    def _default_fps(self) -> float:
        if not self._warned_fps:
            self._warned_fps = True
            warnings.warn(f"append_frames() without fps on a new stream: assuming {self.config.default_fps} fps; "
                          "pass fps= (the frames' real rate) to get the right temporal positions", stacklevel=4)
        return self.config.default_fps

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
