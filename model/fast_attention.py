"""Attention functions for the fast path, registered with transformers' AttentionInterface.

- ``stream_sdpa`` (text model): for few query rows (decode, questions) two matmuls over the
  cache with the query heads of each K/V head folded into rows (K/V read once, never copied);
  for long appends SDPA with a bottom-right causal bias described by a ``CausalSpec`` instead
  of a dense (n, past+n) mask.
- ``stream_flash_varlen`` (vision tower): all windows of a layer in ONE batched SDPA call
  instead of transformers' per-window Python loop (51 ms -> a few ms for a 4-frame chunk).
  transformers hands ``cu_seqlens`` only to implementations whose name contains "flash",
  hence the name; no flash-attn package is involved.

Both compute the same function as transformers' ``sdpa`` path (tests compare them).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

TEXT_IMPL = "stream_sdpa"
VISION_IMPL = "stream_flash_varlen"
FOLD_MAX_ROWS = 1024  # query rows (heads x tokens) up to which the matmul path is used
ROWS_MAX_SCORES = 96 * 2**20  # ... and score elements per K/V head it may materialise (a 32-token question at 60 s)


@dataclass(frozen=True)
class CausalSpec:
    """The keys are exactly ``past`` cached tokens followed by the n new ones; causal among the new."""

    past: int


def causal_mask(past: int, n: int, dtype, device) -> torch.Tensor:
    """(1, 1, n, past+n) additive mask: every cached token visible, causal among the n new ones."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(past + n, device=device)[None, :]
    mask = torch.zeros(n, past + n, dtype=dtype, device=device)
    return mask.masked_fill_(j > past + i, torch.finfo(dtype).min)[None, None]


def _expand_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*g, L, D), query head h reading K/V head h // g (as transformers' repeat_kv)."""
    if g == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, g, length, d).reshape(b, h * g, length, d)


def _rows_attention(query, key, value, mask, scaling, n, g):
    """Few query rows against a long cache: two batched matmuls, K/V read once and never copied.

    Bandwidth-bound like decoding should be; SDPA kernels parallelise over query rows and
    leave most of the GPU idle here. Softmax in float32, as transformers' eager attention.
    """
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, g * n, d)  # the g query heads of one K/V head become rows
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # (B, Hkv, g*n, L)
    if mask is not None:
        scores = (scores.view(b, hkv, g, n, -1) + mask[:, :, None]).view(b, hkv, g * n, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, g*n, D)
    return out.reshape(b, hq, n, d).transpose(1, 2).contiguous()


def text_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, n, D), key/value (B, Hkv, L, D) -> ((B, n, Hq, D), None)."""
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    scaling = scaling if scaling is not None else d**-0.5
    mask = attention_mask
    if isinstance(mask, CausalSpec):
        if n * g > FOLD_MAX_ROWS:
            # Long appends (a video chunk): flash/efficient kernels with a bottom-right causal bias, no dense mask.
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(query, _expand_heads(key, g), _expand_heads(value, g),
                                                 attn_mask=causal_lower_right(n, key.shape[2]), scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        mask = None if n == 1 else causal_mask(mask.past, n, query.dtype, query.device)
    if n * g <= FOLD_MAX_ROWS:
        if g * n * key.shape[2] <= ROWS_MAX_SCORES:
            return _rows_attention(query, key, value, mask, scaling, n, g), None
        # Too many scores to materialise: SDPA on the folded rows, mask rows replicated per head, K/V not copied.
        q = query.reshape(b, key.shape[1], g * n, d)
        m = None if mask is None else mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=scaling)
        return out.reshape(b, hq, n, d).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, _expand_heads(key, g), _expand_heads(value, g), attn_mask=mask,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def vision_varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query/key/value (1, H, S, D) packed segments (cu_seq_lens_q) -> ((1, S, H, D), None).

    Equal segments (every window full, every frame the same size) reshape to a batch; otherwise
    segments are padded to the longest with a key mask. One SDPA call either way, no host sync.
    """
    _, h, s, d = query.shape
    n = cu_seq_lens_q.numel() - 1
    longest = int(max_length_q)
    if longest * n == s:
        q, k, v = (t[0].view(h, n, longest, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.transpose(1, 2).reshape(1, s, h, d), None
    cu = cu_seq_lens_q.to(torch.long)
    tok = torch.arange(s, device=query.device)
    seg = torch.searchsorted(cu[1:], tok, right=True)  # segment of each token
    pos = tok - cu[seg]  # position inside its segment
    padded = []
    for t in (query, key, value):
        p = t.new_zeros(n, longest, h, d)
        p[seg, pos] = t[0].transpose(0, 1)  # (S, H, D) scattered
        padded.append(p.transpose(1, 2))  # (n, H, L, D)
    lengths = cu[1:] - cu[:-1]
    valid = (torch.arange(longest, device=query.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(*padded, attn_mask=valid, scale=scaling)  # (n, H, L, D)
    return out.transpose(1, 2)[seg, pos][None], None


AttentionInterface.register(TEXT_IMPL, text_attention)
AttentionInterface.register(VISION_IMPL, vision_varlen_attention)


def vision_varlen_supported() -> bool:
    """True where the vision attention passes cu_seqlens to 'flash'-named implementations (5.x)."""
    return hasattr(modeling_qwen2_5_vl, "is_flash_attention_requested")


@contextmanager
def standard_attention(model):
    """Run ``model`` with its loaded attention implementation (the native path must not use ours)."""
    base = model.config._attn_implementation
    saved = (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation)
    model.config.vision_config._attn_implementation = base
    model.config.text_config._attn_implementation = base
    try:
        yield
    finally:
        model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation = saved


def configure(model, fast: bool, base: str) -> dict:
    """Select the attention implementations of ``model`` for this engine; returns what was chosen."""
    vision = VISION_IMPL if fast and base == "sdpa" and vision_varlen_supported() else base
    text = TEXT_IMPL if fast and base == "sdpa" else base
    model.config.vision_config._attn_implementation = vision
    model.config.text_config._attn_implementation = text
    return {"vision_attention": vision, "text_attention": text}
