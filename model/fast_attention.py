"""Attention functions registered with transformers' AttentionInterface, chosen per call.

The model's attention implementation is set once, when a ``StreamQwenModel`` is built on
``sdpa`` (``install``), to two dispatchers; after that nothing mutates ``model.config``. Each
call decides by what the stream hands it, so streams with different settings share one model:

- ``stream_text`` (text model): a ``paged_attention.PagedMask`` (a batched forward of pooled streams)
  runs each segment over its own stream's pages; a ``masks.StreamMask`` (fast streams) runs our kernels: on a
  GPU the live-length Triton kernel (``triton_attention.py``) for every causal segment; else for few
  query rows (decode, questions) two matmuls over the cache with the query heads of each K/V
  head folded into rows (K/V read once, never copied); for long appends SDPA with a
  bottom-right causal bias. Anything else (a dense mask from a ``fast=False`` stream, or the
  mask transformers builds for an ordinary ``model(...)`` call) goes to transformers' own
  ``sdpa_attention_forward``: the same function as the stock ``sdpa`` implementation (except
  maskless fp32 on CUDA with grouped K/V heads, where it would take SDPA's math kernel: there
  the heads are expanded first, ``sdpa_expanded``).
- ``stream_flash_varlen`` (vision tower): with ``stream_varlen=True`` in the call's kwargs (fast
  streams), all windows of a layer in ONE batched SDPA call; otherwise transformers' per-window
  loop over ``sdpa_attention_forward``, as its ``sdpa`` path does. transformers 5.x hands
  ``cu_seqlens`` only to implementations whose name contains "flash", hence the name; no
  flash-attn package is involved. On 4.57 the tower loops over windows itself.

Tests compare both modes with each other and with the offline path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import compat, paged_attention, triton_attention
from .masks import StreamMask, causal_mask

TEXT_IMPL = "stream_text"
VISION_IMPL = "stream_flash_varlen"


def _expand_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*g, L, D), query head h reading K/V head h // g (as transformers' repeat_kv)."""
    if g == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, g, length, d).reshape(b, h * g, length, d)


def _rows_attention(query, key, value, mask, scaling, n, g):
    """Few query rows against a long cache: two batched matmuls, K/V read once and never copied.

    Softmax in float32, as transformers' eager attention.
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


def _stream_kernels(query, key, value, spec: StreamMask, scaling):
    """query (B, Hq, n, D), key/value (B, Hkv, L, D) -> (B, n, Hq, D)."""
    if spec.start is not None and spec.dense is None:
        return triton_attention.attention(query, key, value, spec.start, scaling, branches=spec.branches,
                                          rank=spec.rank)
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    mask = spec.dense
    if mask is None:
        if n * g > spec.fold_max_rows:
            # Long appends (a video chunk): flash/efficient kernels with a bottom-right causal bias, no dense mask.
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(query, _expand_heads(key, g), _expand_heads(value, g),
                                                 attn_mask=causal_lower_right(n, key.shape[2]), scale=scaling)
            return out.transpose(1, 2).contiguous()
        mask = None if n == 1 else causal_mask(spec.past, n, query.dtype, query.device)
    if n * g <= spec.fold_max_rows:
        if g * n * key.shape[2] <= spec.rows_max_scores:
            return _rows_attention(query, key, value, mask, scaling, n, g)
        # Too many scores to materialise: SDPA on the folded rows, mask rows replicated per head, K/V not copied.
        q = query.reshape(b, key.shape[1], g * n, d)
        m = None if mask is None else mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=scaling)
        return out.reshape(b, hq, n, d).transpose(1, 2).contiguous()
    out = F.scaled_dot_product_attention(query, _expand_heads(key, g), _expand_heads(value, g), attn_mask=mask,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


def text_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, n, D), key/value (B, Hkv, L, D) -> ((B, n, Hq, D), None)."""
    if isinstance(attention_mask, paged_attention.PagedMask):  # a batched forward over a KV pool (scheduler.py)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return paged_attention.attention(module, query, key, value, attention_mask, scaling), None
    if isinstance(attention_mask, StreamMask):
        if attention_mask.on_query is not None:
            attention_mask.on_query(module.layer_idx, query)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _stream_kernels(query, key, value, attention_mask, scaling), None
    if attention_mask is None and query.is_cuda and query.dtype == torch.float32 and key.shape[1] != query.shape[1]:
        # Overridden: transformers hands SDPA grouped K/V with enable_gqa here, which no fused fp32 kernel
        # takes: the math kernel then materialises heads x T x T scores (59 GiB for the offline reference
        # at 31k tokens on the H200). Expanded K/V run the memory-efficient kernel, as with a mask.
        return sdpa_expanded(module, query, key, value, scaling, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def sdpa_expanded(module, query, key, value, scaling=None, **kwargs):
    """transformers' maskless sdpa attention (causal when n > 1) with K/V heads expanded -> (B, n, Hq, D)."""
    g, n = query.shape[1] // key.shape[1], query.shape[2]
    is_causal = n > 1 and (kwargs.get("is_causal") if kwargs.get("is_causal") is not None else
                           getattr(module, "is_causal", True))
    if is_causal and key.shape[2] > n:  # as transformers: only a prefill into an empty static cache gets here
        key, value = key[:, :, :n], value[:, :, :n]
    out = F.scaled_dot_product_attention(query, _expand_heads(key, g), _expand_heads(value, g), is_causal=is_causal,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


def _batched_windows(query, key, value, cu_seqlens, longest: int, scaling):
    """(1, H, S, D) packed windows -> (1, S, H, D) in one SDPA call, no host sync."""
    _, h, s, d = query.shape
    n = cu_seqlens.numel() - 1
    if longest * n == s:  # every window full, every frame the same size: a plain batch
        q, k, v = (t[0].view(h, n, longest, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.transpose(1, 2).reshape(1, s, h, d)
    cu = cu_seqlens.to(torch.long)
    tok = torch.arange(s, device=query.device)
    seg = torch.searchsorted(cu[1:], tok, right=True)  # window of each token
    pos = tok - cu[seg]  # position inside its window
    padded = []
    for t in (query, key, value):
        p = t.new_zeros(n, longest, h, d)
        p[seg, pos] = t[0].transpose(0, 1)  # (S, H, D) scattered
        padded.append(p.transpose(1, 2))  # (n, H, L, D)
    lengths = cu[1:] - cu[:-1]
    valid = (torch.arange(longest, device=query.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(*padded, attn_mask=valid, scale=scaling)  # (n, H, L, D)
    return out.transpose(1, 2)[seg, pos][None]


def vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, stream_varlen=False, **kwargs):
    """query/key/value (1, H, S, D), windows given by cu_seq_lens_q -> ((1, S, H, D), None)."""
    if cu_seq_lens_q is None:  # 4.57: the tower already split the windows
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if stream_varlen:
        return _batched_windows(query, key, value, cu_seq_lens_q, int(max_length_q), scaling), None
    # transformers' non-flash branch: one sdpa call per window, concatenated
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (query, key, value)]
    outs = [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, dropout=dropout, is_causal=False)[0]
            for q, k, v in zip(*splits)]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(TEXT_IMPL, text_attention)
AttentionInterface.register(VISION_IMPL, vision_attention)
compat.register_sdpa_mask(TEXT_IMPL)  # ordinary model(...) calls build the masks sdpa would


def install(config) -> bool:
    """Point a fresh model config's text and vision attention at the dispatchers (base ``sdpa`` only).

    Called once by ``StreamQwenModel.__init__``; returns whether the stream kernels are available.
    """
    if config._attn_implementation != "sdpa":
        return False
    config.text_config._attn_implementation = TEXT_IMPL
    config.vision_config._attn_implementation = VISION_IMPL
    return True


def live_length_kernel(choice: str, fast: bool, device) -> bool:
    """Whether a stream uses ``triton_attention`` (``StreamConfig.attention_kernel``: auto, triton, torch)."""
    if not fast or choice == "torch":
        return False
    if triton_attention.available(device):
        return True
    if choice == "triton":
        raise ValueError(f"StreamConfig.attention_kernel='triton' needs Triton and a CUDA device (got {device}); "
                         "use 'auto' to fall back to the torch kernels")
    return False


def backends(config, fast: bool, live_kernel: bool = False, varlen: bool = False) -> dict:
    """What a stream with ``fast`` runs on this model (reported by ``stats()``); ``varlen``: its vision tower
    hands the attention function its segments (``Family.varlen_supported``)."""
    installed = config.text_config._attn_implementation == TEXT_IMPL
    base = config._attn_implementation
    return {
        "text_attention": ("stream_triton" if live_kernel else "stream_sdpa") if fast and installed else base,
        "vision_attention": "stream_flash_varlen" if fast and installed and varlen else base,
    }
