"""The native (offline) path: the whole transcript in one standard transformers forward.

This is what a user would write without streaming: placeholder tokens expanded in the
prompt, ``pixel_values_videos`` for all frames at once, and ``model(...)`` with transformers'
own embedding merge, mask and ``DynamicCache``. It runs transformers' stock sdpa
attention (``StreamQwenModel``'s dispatchers delegate ordinary calls to it). The only thing it
takes from this project is the position function (``positions.transcript_positions``) and the frame preprocessing,
so streamed and offline results are comparable on every transformers version (DESIGN.md sections 3, 9).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import compat
from .frames import pad_to_temporal_patch, patchify, resize_frames, target_size, to_frame_list
from .positions import transcript_positions
from .prompt import (QUESTION_MARK, VISION_END, VISION_START, encode, encode_user_text, extract_vision_segment, render,
                     token_ids)
from .timing import sync

# A transcript is a list of segments:
#   ("text", str)   trusted template text (special-token strings become special tokens)
#   ("user", str)   untrusted user text (kept literal: prompt.encode_user_text)
#   ("ids", list[int]) | ("video", frames, fps) | ("image", image)
Segment = tuple


@dataclass
class NativeInputs:
    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (3, T) M-RoPE positions
    pixel_values_videos: Optional[torch.Tensor] = None  # (P_v, C*T*p*p)
    video_grid_thw: Optional[torch.Tensor] = None  # (n_videos, 3)
    second_per_grid_ts: list[float] = field(default_factory=list)
    pixel_values: Optional[torch.Tensor] = None  # (P_i, C*T*p*p)
    image_grid_thw: Optional[torch.Tensor] = None  # (n_images, 3)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def build_inputs(model, processor, segments: Sequence[Segment]) -> NativeInputs:
    """Segments -> one tokenised transcript with every frame preprocessed at once, on the model's device."""
    device = model.device
    tok = getattr(processor, "tokenizer", processor)
    vpix = compat.pixel_config(compat.video_processor(processor))
    ipix = compat.pixel_config(processor.image_processor)
    image_id, video_id = token_ids(tok, ["<|image_pad|>", "<|video_pad|>"])
    ids: list[int] = []
    vids, vgrids, spgts, imgs, igrids = [], [], [], [], []
    for seg in segments:
        kind = seg[0]
        if kind == "text":
            ids += encode(tok, seg[1])
        elif kind == "user":
            ids += encode_user_text(tok, seg[1])
        elif kind == "ids":
            ids += list(seg[1])
        elif kind in ("video", "image"):
            pix = vpix if kind == "video" else ipix
            raw = to_frame_list(seg[1])
            size = target_size(raw[0].shape[1], raw[0].shape[2], pix)
            frames = pad_to_temporal_patch(resize_frames(raw, size, device=device), pix.temporal_patch_size)
            patches, grid = patchify(frames, pix)
            n_tokens = grid[0] * grid[1] * grid[2] // pix.merge_size**2
            ids += [video_id if kind == "video" else image_id] * n_tokens
            if kind == "video":
                vids.append(patches)
                vgrids.append(grid)
                spgts.append(pix.temporal_patch_size / float(seg[2]))
            else:
                imgs.append(patches)
                igrids.append(grid)
        else:
            raise ValueError(f"unknown transcript segment {kind!r}")
    positions = transcript_positions(
        ids, image_token_id=image_id, video_token_id=video_id, image_grids=igrids, video_grids=vgrids,
        second_per_grid_ts=spgts, merge_size=model.config.vision_config.spatial_merge_size,
        tokens_per_second=model.config.vision_config.tokens_per_second,
    )
    return NativeInputs(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device), positions=positions,
        pixel_values_videos=torch.cat(vids) if vids else None, video_grid_thw=_grids(vgrids, device),
        second_per_grid_ts=spgts, pixel_values=torch.cat(imgs) if imgs else None, image_grid_thw=_grids(igrids, device),
    )


def _grids(grids: list, device) -> Optional[torch.Tensor]:
    return torch.tensor(grids, dtype=torch.long, device=device) if grids else None


def chat_segments(processor, question: str, video: Any = None, fps: float = 2.0,
                  add_generation_prompt: bool = True) -> list[Segment]:
    """The standard single-turn prompt: system + user(video, question) + assistant header."""
    content = ([{"type": "video"}] if video is not None else []) + [{"type": "text", "text": QUESTION_MARK}]
    text = render(processor, [{"role": "user", "content": content}], add_generation_prompt)
    head, tail = text.split(QUESTION_MARK)  # the question goes in as literal user text
    if video is None:
        return [("text", head), ("user", question), ("text", tail)]
    before, _, after = extract_vision_segment(head)
    return [("text", before + VISION_START), ("video", video, fps), ("text", VISION_END + after), ("user", question),
            ("text", tail)]


def _forward(model, inputs: NativeInputs, cache, logits_to_keep: int, attention_mask=None):
    kw = dict(input_ids=inputs.input_ids, logits_to_keep=logits_to_keep,
              position_ids=inputs.positions.to(model.device)[:, None])  # (3, 1, T)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask  # (1, 1, T, T) additive: used as given
    if inputs.pixel_values_videos is not None:
        kw.update(pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw,
                  second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts, device=model.device))
    if inputs.pixel_values is not None:
        kw.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    kw.update(compat.cache_kwargs(model, cache, cache.get_seq_length(), inputs.num_tokens, model.device))
    return model(**kw).logits.float()


@torch.no_grad()
def native_logits(model, inputs: NativeInputs, all_tokens: bool = False, last: int = 1) -> torch.Tensor:
    """(1, T|last, V) float32 logits of a one-shot offline prefill: every token's, or the ``last`` ones'."""
    return _forward(model, inputs, compat.new_dynamic_cache(model.config), 0 if all_tokens else last)


def bounded_visibility(num_tokens: int, calls: Sequence[tuple[int, int, Sequence[tuple[int, int]]]]) -> torch.Tensor:
    """(T, T) bool: what each transcript token of a bounded stream attended to.

    ``calls``: per call that wrote tokens, (start, end, kept): its transcript tokens [start, end)
    and the (index, length) ranges the cache kept when the call began (``SlotLayout.kept_ranges``).
    Token i of a call sees token j <= i if j was kept when the call began or j is the call's own.
    Tokens in no call see every earlier token (plain causal).
    """
    visible = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    for start, end, kept in calls:
        row = torch.zeros(num_tokens, dtype=torch.bool)
        for s, n in kept:
            row[s:s + n] = True
        row[start:] = True
        visible[start:end] &= row[None, :]
    return visible


@torch.no_grad()
def masked_logits(model, inputs: NativeInputs, visible: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
    """(1, T|1, V) float32 logits of one offline prefill in which token i attends to j iff ``visible[i, j]``.

    The exact reference of a bounded stream (with ``bounded_visibility``): the same transcript and
    positions as ``native_logits``, only the attention mask restricted.
    """
    dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return _forward(model, inputs, compat.new_dynamic_cache(model.config), 0 if all_tokens else 1,
                    attention_mask=mask[None, None].to(model.device))


@dataclass
class NativeAnswer:
    token_ids: list[int]
    ttft_s: float  # prefill (vision encoder included) -> first token
    total_s: float
    first_logits: torch.Tensor  # (V,)
    cache_bytes: int = 0


@torch.no_grad()
def native_generate(model, inputs: NativeInputs, max_new_tokens: int, stop_ids: set[int]) -> NativeAnswer:
    """Greedy prefill + decode with transformers' forward and DynamicCache, positions from us."""
    sync()
    t0 = time.perf_counter()
    cache = compat.new_dynamic_cache(model.config)
    logits = _forward(model, inputs, cache, 1)[:, -1]
    first = logits[0].clone()
    next_pos = int(inputs.positions.max()) + 1
    tokens, ttft = [], None
    while True:
        tok = int(logits.argmax(-1))
        if ttft is None:
            sync()
            ttft = time.perf_counter() - t0
        if tok in stop_ids:
            break
        tokens.append(tok)
        if len(tokens) >= max_new_tokens:
            break
        step = NativeInputs(input_ids=torch.tensor([[tok]], device=model.device),
                            positions=torch.full((3, 1), next_pos, dtype=torch.long))
        logits = _forward(model, step, cache, 1)[:, -1]
        next_pos += 1
    sync()
    return NativeAnswer(tokens, ttft, time.perf_counter() - t0, first, compat.dynamic_cache_bytes(cache))

