"""VideoStreamInference: stream frames into Qwen2.5-VL and answer questions at any moment.

    engine = VideoStreamInference.from_pretrained(path)      # or VideoStreamInference(model, processor)
    engine.append_frames(chunk, fps=30)                      # encode once into the KV cache
    engine.ask("What just happened?")                        # isolated: the stream is untouched
    engine.ask_choice("Which shape came last?", ["circle", "square"])

Every public call either completes or leaves the stream exactly as it was (snapshot/restore).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch

from . import compat, fast_attention
from .decoding import Answer, ChoiceResult, decode, make_sampler
from .frames import pad_to_temporal_patch, patchify, resize_frames, target_size, to_frame_list
from .cuda_graphs import GraphRunner, VisionGraphs
from .kv_cache_manager import KVCacheManager
from .positions import text_positions
from .prompt import VISION_END, VISION_START, extract_vision_segment, prompt_pieces
from .stream_qwen_model import StreamQwenModel, tree_mask

DEFAULT_FPS = 2.0
TREE_ATTENTION = ("sdpa", "eager")  # backends that take an arbitrary additive 4-D mask


@dataclass
class ChunkInfo:
    """What one ``append_frames``/``append_image`` call encoded."""

    chunk: int  # index of this call in the stream
    frames: int  # frames passed in
    frames_encoded: int  # frames that went into the cache (a held odd frame waits for its pair)
    pending: bool  # an odd frame is held
    tokens_added: int
    cache_len: int
    encode_s: float

    def __str__(self) -> str:
        return f"Chunk {self.chunk} encoded ({self.frames} frame(s), cache_len={self.cache_len})"


class VideoStreamInference:
    """The streaming engine over one ``StreamQwenModel`` (one stream per model instance)."""

    def __init__(self, model: StreamQwenModel, processor: Any, fast: bool = True):
        if not isinstance(model, StreamQwenModel):
            raise TypeError(
                f"model must be a StreamQwenModel, got {type(model).__name__}; "
                "load it with StreamQwenModel.from_pretrained(path) or VideoStreamInference.from_pretrained(path)"
            )
        compat.check_version()
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pieces = prompt_pieces(processor)
        self.video_pixels = compat.pixel_config(compat.video_processor(processor))
        self.image_pixels = compat.pixel_config(processor.image_processor)
        self.kv = KVCacheManager(compat.text_config(model.config).num_hidden_layers, owner=model)
        ids = self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.stop_ids = set(ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.attn_implementation = model.config._attn_implementation
        self.fast = fast
        self.backends = fast_attention.configure(model, fast, self.attn_implementation)
        graphs = fast and model.device.type == "cuda" and self.backends["text_attention"] == fast_attention.TEXT_IMPL
        self._runner = GraphRunner(model) if graphs else None
        vision_graphs = graphs and self.backends["vision_attention"] == fast_attention.VISION_IMPL
        self._vision_graphs = VisionGraphs(model) if vision_graphs else None
        model.reset_stream()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Optional[str] = None, dtype=None,
                        attn_implementation: str = "sdpa") -> "VideoStreamInference":
        """Load a local Qwen2.5-VL checkpoint folder (weights, config, processor files)."""
        from transformers import AutoProcessor

        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise ValueError(f"Model not found: {path!r}; set QWEN_MODEL_PATH to a local Qwen2.5-VL checkpoint folder")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = StreamQwenModel.from_pretrained(
            path, attn_implementation=attn_implementation, **compat.dtype_kwarg(dtype)
        ).to(device)
        return cls(model, AutoProcessor.from_pretrained(path))

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def append_frames(self, frames: Any, fps: Optional[float] = None) -> ChunkInfo:
        """Encode a chunk of video frames (any count >= 1) into the open video block."""
        t0 = time.perf_counter()
        st = self.state
        fps = self._check_fps(fps if fps is not None else (st.fps or DEFAULT_FPS))  # None: the stream's last fps
        tp = self.video_pixels.temporal_patch_size
        spgt = tp / fps
        if st.block_start is not None and not math.isclose(spgt, st.second_per_grid_t, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"fps changed from {st.fps} to {fps} inside one video; call reset() or ask(..., update_state=True) first")
        raw = to_frame_list(frames)
        size = st.frame_size or target_size(raw[0].shape[1], raw[0].shape[2], self.video_pixels)
        new = resize_frames(raw, size, device=self.model.device)  # (n, 3, H, W)
        if st.pending_frame is not None:
            new = torch.cat([st.pending_frame[None], new])
        n_full = new.shape[0] - new.shape[0] % tp
        with self._transaction(commit=True):
            before = self.kv.get_seq_length()
            self._ensure_turn()
            if self.state.block_start is None:
                self._feed(VISION_START)
                self.model.open_vision_block(spgt)
            if n_full:
                self._feed_frames(new[:n_full], self.video_pixels)
            self.state = replace(
                self.state, frame_size=size, fps=fps, chunks=self.state.chunks + 1,
                pending_frame=new[n_full] if n_full < new.shape[0] else None,
                frames_seen=self.state.frames_seen + len(raw),
                video_seconds=self.state.video_seconds + len(raw) / fps,
            )
            self._sync()
        return ChunkInfo(self.state.chunks - 1, len(raw), n_full, self.state.pending_frame is not None,
                         self.kv.get_seq_length() - before, self.kv.get_seq_length(), time.perf_counter() - t0)

    @torch.no_grad()
    def append_image(self, image: Any) -> ChunkInfo:
        """Encode one still image as its own image block (closes an open video block first)."""
        t0 = time.perf_counter()
        raw = to_frame_list(image)
        if len(raw) != 1:
            raise ValueError(f"append_image takes one image, got {len(raw)}; use append_frames for video")
        size = target_size(raw[0].shape[1], raw[0].shape[2], self.image_pixels)
        frames = pad_to_temporal_patch(resize_frames(raw, size, device=self.model.device),
                                       self.image_pixels.temporal_patch_size)
        with self._transaction(commit=True):
            before = self.kv.get_seq_length()
            self._ensure_turn()
            self._close_block(VISION_START)
            self.model.open_vision_block(0.0)
            self._feed_frames(frames, self.image_pixels)
            self._close_block()
            self.state = replace(self.state, chunks=self.state.chunks + 1)
            self._sync()
        return ChunkInfo(self.state.chunks - 1, 1, 1, False, self.kv.get_seq_length() - before,
                         self.kv.get_seq_length(), time.perf_counter() - t0)

    @torch.no_grad()
    def ask(self, question: str, update_state: bool = False, max_new_tokens: int = 128, **generation) -> Answer:
        """Answer from everything streamed so far.

        update_state=False: the stream is left bit-identical. True: question and answer become a
        conversation turn, and frames appended later open a new turn. Greedy unless
        ``do_sample=True`` (options: temperature, top_k, top_p, min_p, repetition_penalty, seed).
        """
        t0 = time.perf_counter()
        self._check_question(question)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        sampler = make_sampler(self.model.device, **generation)
        with self._transaction(commit=update_state):
            first = self._open_question(question)[:, -1]  # (1, V)
            tokens, fed, ttft, reason = decode(
                first, lambda tok: self._feed_ids([tok], logits="last")[:, -1], sampler, self.stop_ids,
                max_new_tokens, self._sync, t0,
            )
            if update_state:
                self._feed_ids(tokens[fed:] + self._ids(self.pieces.answer_tail))
                self.state = replace(self.state, turn_open=False, turns=self.state.turns + 1)
            self._sync()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Answer(text, tokens, ttft, time.perf_counter() - t0, reason, first[0])

    @torch.no_grad()
    def ask_choice(self, question: str, choices: Sequence[str]) -> ChoiceResult:
        """Score each choice by log p(choice | video, question); isolated like ``ask``."""
        t0 = time.perf_counter()
        self._check_question(question)
        choice_ids = self._check_choices(choices)
        with self._transaction(commit=False):
            q_logp = torch.log_softmax(self._open_question(question)[0, -1], -1)  # (V,)
            branch_logits = self._score_branches(choice_ids)  # one (n_k, V) per choice
        scores = []
        for ids, logits in zip(choice_ids, branch_logits):
            logp = torch.cat([q_logp[None], torch.log_softmax(logits[:-1], -1)])  # (n_k, V)
            scores.append(float(logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).sum()))
        norm = [s / len(ids) for s, ids in zip(scores, choice_ids)]
        best = max(range(len(scores)), key=scores.__getitem__)
        return ChoiceResult(choices[best], best, scores, norm, list(choices), time.perf_counter() - t0)

    def reset(self) -> None:
        """Drop the stream (cache, state, snapshots) and start a new one."""
        self.kv.clear()
        self.model.reset_stream()

    def stats(self) -> dict:
        st = self.state
        return {
            "cache_tokens": self.kv.get_seq_length(), "cache_bytes": self.kv.nbytes(),
            "cache_reserved_bytes": self.kv.reserved_bytes(), "frames_seen": st.frames_seen,
            "pending_frames": int(st.pending_frame is not None), "video_seconds": st.video_seconds,
            "chunks": st.chunks, "turns": st.turns, "next_position": st.next_position,
            "rope_deltas": st.rope_deltas, "frame_size": st.frame_size, "fps": st.fps,
            "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation, **self.backends, "cache": "preallocated+length-counter",
            "cuda_graphs": _graph_status(self._runner), "vision_graphs": _graph_status(self._vision_graphs),
            "choice_scoring": "tree-batched" if self.attn_implementation in TREE_ATTENTION else "sequential",
            "transformers": str(compat.TRANSFORMERS_VERSION),
        }

    @property
    def state(self):
        return self.model.stream_state

    @state.setter
    def state(self, value) -> None:
        self.model.stream_state = value

    @staticmethod
    def _extract_vision_segment(prompt: str) -> tuple[str, str, str]:
        """(before, vision, after) of a chat-template rendering; see ``prompt.extract_vision_segment``."""
        return extract_vision_segment(prompt)

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _transaction(self, commit: bool):
        """Snapshot; on error always roll back; on success keep (commit) or roll back."""
        self.kv.snapshot()
        try:
            yield
        except BaseException:
            self.kv.restore()
            raise
        if commit:
            self.kv.discard_snapshot()
        else:
            self.kv.restore()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _feed_ids(self, ids: list[int], logits="none"):
        if not ids:
            return None
        return self.model.feed_text(self.kv.cache, torch.tensor(ids, dtype=torch.long), logits=logits, runner=self._runner)

    def _feed(self, text: str, logits="none"):
        return self._feed_ids(self._ids(text), logits=logits)

    def _feed_frames(self, frames: torch.Tensor, pixels) -> None:
        """(2k, 3, H, W) resized frames -> vision embeddings -> the open block."""
        patches, grid = patchify(frames, pixels)
        embeds = self._vision_graphs(patches, grid) if self._vision_graphs is not None else None
        if embeds is None:
            embeds = self.model.encode_vision(patches, grid)
        self.model.feed_vision(self.kv.cache, embeds, grid, runner=self._runner)

    def _ensure_turn(self) -> None:
        if not self.state.turn_open:
            first = self.kv.get_seq_length() == 0
            self._feed(self.pieces.first_turn_header if first else self.pieces.turn_header)
            self.state = replace(self.state, turn_open=True)

    def _close_block(self, then: str = "", logits="none"):
        """Close an open video block and feed ``then`` in the same segment (one forward, not two).

        A held odd frame is encoded padded first (the last frame repeated, as the processor pads).
        """
        if self.state.block_start is not None:
            if self.state.pending_frame is not None:
                pair = pad_to_temporal_patch(self.state.pending_frame[None], self.video_pixels.temporal_patch_size)
                self._feed_frames(pair, self.video_pixels)
                self.state = replace(self.state, pending_frame=None)
            self.model.close_vision_block()
            then = VISION_END + then
        return self._feed(then, logits=logits) if then else None

    def _open_question(self, question: str) -> torch.Tensor:
        """Close the block and feed the question + assistant header; returns (1, 1, V) logits."""
        self._ensure_turn()
        return self._close_block(self.pieces.question(question), logits="last")

    def _score_branches(self, choice_ids: list[list[int]]) -> list[torch.Tensor]:
        """Logits (n_k, V) of every choice's tokens after the shared prefix; one forward when possible."""
        cache, st = self.kv.cache, self.state
        if self.attn_implementation in TREE_ATTENTION:
            lengths = [len(ids) for ids in choice_ids]
            flat = torch.tensor([t for ids in choice_ids for t in ids], dtype=torch.long)
            pos = torch.cat([text_positions(st.next_position, n) for n in lengths], dim=1)  # (3, L)
            mask = tree_mask(cache.length, lengths, self.model.dtype, self.model.device)
            logits = self.model.forward_segment(cache, self.model.embed_ids(flat), pos, mask, logits="all")
            return list(logits[0].split(lengths))
        out = []
        for ids in choice_ids:  # backends without arbitrary masks (flash-attention): one branch at a time
            self.kv.snapshot()
            out.append(self._feed_ids(ids, logits="all")[0])
            self.kv.restore()
        return out

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @staticmethod
    def _check_fps(fps) -> float:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        return float(fps)

    @staticmethod
    def _check_question(question) -> None:
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if not question.strip():
            raise ValueError("question is empty")

    def _check_choices(self, choices) -> list[list[int]]:
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise TypeError(f"choices must be a list of strings, got {type(choices).__name__}")
        if len(choices) == 0:
            raise ValueError("choices is empty: pass at least one choice")
        bad = [c for c in choices if not isinstance(c, str)]
        if bad:
            raise TypeError(f"every choice must be a str, got {type(bad[0]).__name__}")
        if any(not c.strip() for c in choices):
            raise ValueError("a choice is empty")
        dupes = sorted({c for c in choices if list(choices).count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate choices: {dupes}")
        return [self._ids(c) for c in choices]


def _graph_status(graphs) -> str:
    if graphs is None:
        return "off"
    return graphs.disabled or f"on ({graphs.captures} captures)"
