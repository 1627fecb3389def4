"""StreamQwenModel: Qwen2.5-VL that runs one segment at a time into a stream KV cache.

A segment is either text token ids or the merged vision embeddings of a chunk. Its M-RoPE
positions come from ``positions.py`` (the reference formula) and are passed explicitly, so
transformers' cached ``rope_deltas`` and its own ``get_rope_index`` are never used. All
stream bookkeeping lives in one frozen dataclass, ``stream_state``, which the cache manager
snapshots and restores as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from . import compat
from .fast_attention import TEXT_IMPL, CausalSpec, causal_mask
from .kv_cache_manager import StreamKVCache
from .positions import next_start, text_positions, vision_positions


@dataclass(frozen=True)
class StreamState:
    """Everything that describes the stream besides the cache tensors. Immutable: update with ``replace``."""

    last_cache_position: int = 0  # tokens in the cache
    next_position: int = 0  # first free M-RoPE position (max so far + 1)
    block_start: Optional[int] = None  # M-RoPE start of the open vision block, None if closed
    next_t_index: int = 0  # next temporal-grid index g inside the open block
    second_per_grid_t: Optional[float] = None  # temporal_patch_size / fps of the open block
    turn_open: bool = False  # a user turn has been started and not yet answered
    frame_size: Optional[tuple[int, int]] = None  # (H, W) every frame of this stream is resized to
    pending_frame: Optional[torch.Tensor] = None  # (3, H, W) odd frame held until its pair arrives
    fps: Optional[float] = None
    frames_seen: int = 0
    video_seconds: float = 0.0
    chunks: int = 0
    turns: int = 0

    @property
    def rope_deltas(self) -> int:
        """What transformers would cache: next M-RoPE position minus cache length."""
        return self.next_position - self.last_cache_position


class StreamQwenModel(Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` plus ``stream_state`` and segment-wise forwards."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.stream_state = StreamState()

    # -- vision ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """(P, C*T*p*p) patches of one grid -> (P / merge^2, D_text) embeddings in (t, row, col) order."""
        grid = torch.tensor([grid_thw], dtype=torch.long, device=pixel_values.device)
        return compat.encode_vision(self, pixel_values, grid)

    # -- segments --------------------------------------------------------------------
    @torch.no_grad()
    def forward_segment(
        self,
        cache: StreamKVCache,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        logits: Literal["none", "last", "all"] = "last",
    ) -> Optional[torch.Tensor]:
        """Append one segment to ``cache``.

        inputs_embeds: (1, n, D); positions: (3, n) M-RoPE positions; attention_mask: an
        additive (1, 1, n, length+n) mask or None for plain causal. Returns logits (1, n|1, V)
        in float32, or None. Does not touch ``stream_state``.
        """
        n = inputs_embeds.shape[1]
        if attention_mask is None and self.config.text_config._attn_implementation != TEXT_IMPL:
            attention_mask = causal_mask(cache.length, n, inputs_embeds.dtype, inputs_embeds.device)
        hidden = self.run_language_model(cache, inputs_embeds, positions.to(inputs_embeds.device)[:, None, :], attention_mask)
        cache.advance(n)
        if logits == "none":
            return None
        return self.lm_head(hidden if logits == "all" else hidden[:, -1:]).float()

    def run_language_model(self, cache, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention_mask):
        """(1, n, D) embeddings at (3, 1, n) positions through the decoder -> (1, n, D) hidden states.

        ``attention_mask``: an additive (1, 1, n, keys) tensor, a ``CausalSpec``, or None (causal
        after the cache); the stream attention function takes it as is, inside a per-layer-type dict
        so that transformers builds no mask of its own.
        """
        if self.config.text_config._attn_implementation == TEXT_IMPL:
            spec = attention_mask if attention_mask is not None else CausalSpec(cache.length)
            attention_mask = {"full_attention": spec, "sliding_attention": spec}
        lm = compat.language_model(self)
        out = lm(inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=attention_mask,
                 **compat.cache_kwargs(lm, cache, cache.length, inputs_embeds.shape[1], inputs_embeds.device))
        return out.last_hidden_state

    def embed_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (1, n, D) embeddings."""
        return self.get_input_embeddings()(token_ids.to(self.device)[None])

    def feed_text(self, cache: StreamKVCache, token_ids: torch.Tensor, logits="last", runner=None) -> Optional[torch.Tensor]:
        """Append text tokens at the next free positions; updates ``stream_state``.

        ``runner`` (a cuda_graphs.GraphRunner) replays a captured forward when it accepts the segment.
        """
        st = self.stream_state
        assert cache.length == st.last_cache_position, (cache.length, st.last_cache_position)
        pos = text_positions(st.next_position, len(token_ids))
        out = runner(cache, token_ids, pos) if runner is not None and runner.accepts(cache, len(token_ids), logits) else None
        if out is None:
            out = self.forward_segment(cache, self.embed_ids(token_ids), pos, logits=logits)
        self.stream_state = replace(
            st, last_cache_position=cache.length, next_position=st.next_position + len(token_ids)
        )
        return out

    def open_vision_block(self, second_per_grid_t: float) -> None:
        """Start a vision block at the next free position (the <|vision_start|> token is already fed)."""
        st = self.stream_state
        assert st.block_start is None, f"a vision block is already open at {st.block_start}"
        self.stream_state = replace(
            st, block_start=st.next_position, next_t_index=0, second_per_grid_t=second_per_grid_t
        )

    def close_vision_block(self) -> None:
        self.stream_state = replace(self.stream_state, block_start=None, next_t_index=0, second_per_grid_t=None)

    def feed_vision(self, cache: StreamKVCache, embeds: torch.Tensor, grid_thw: tuple[int, int, int], runner=None) -> None:
        """Append a chunk's (n, D) vision embeddings to the open block; updates ``stream_state``."""
        st = self.stream_state
        assert st.block_start is not None, "feed_vision() needs an open vision block"
        assert cache.length == st.last_cache_position, (cache.length, st.last_cache_position)
        m = self.config.vision_config.spatial_merge_size
        gt, gh, gw = grid_thw
        pos = vision_positions(
            st.block_start, gt, gh // m, gw // m,
            t_offset=st.next_t_index,
            second_per_grid_t=st.second_per_grid_t,
            tokens_per_second=self.config.vision_config.tokens_per_second,
        )
        assert pos.shape[1] == embeds.shape[0], f"{pos.shape[1]} positions for {embeds.shape[0]} embeddings"
        embeds = embeds[None].to(self.dtype)  # (1, n, D)
        if not (runner is not None and runner.accepts_embeds(cache, embeds.shape[1]) and runner.run_embeds(cache, embeds, pos)):
            self.forward_segment(cache, embeds, pos, logits="none")
        self.stream_state = replace(
            st,
            last_cache_position=cache.length,
            next_position=max(st.next_position, next_start(pos)),
            next_t_index=st.next_t_index + gt,
        )

    def reset_stream(self) -> None:
        self.stream_state = StreamState()


def tree_mask(past: int, lengths: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, L, past+L) additive mask for several branches packed after a shared prefix.

    Each branch (of ``lengths[k]`` tokens) sees the whole cache and its own earlier tokens only.
    """
    total = sum(lengths)
    branch = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    idx = torch.arange(total, device=device)
    visible = (branch[:, None] == branch[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros(total, past + total, dtype=dtype, device=device)
    mask[:, past:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]
