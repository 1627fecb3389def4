"""The offline reference's attention on a GPU in fp32: expanded K/V instead of SDPA's enable_gqa.

transformers' sdpa path passes grouped K/V with ``enable_gqa=True`` when there is no mask; in fp32
no fused kernel takes that and SDPA falls back to the math kernel (heads x T x T scores: 59 GiB
at 31k tokens). ``fast_attention.text_attention`` then expands the heads itself
(``sdpa_expanded``). It must compute what transformers' function computes: checked here on the
CPU, where both run, for prefill (causal) and decode rows.
"""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model.fast_attention import sdpa_expanded


class Attn(torch.nn.Module):
    num_key_value_groups, is_causal = 4, True


@pytest.mark.parametrize("n, length", [(37, 37), (1, 50)])
def test_expanded_heads_equal_transformers_sdpa_with_grouped_heads(n, length):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, 8, n, 16, generator=g)
    k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(2))
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, None, scaling=0.25)
    got = sdpa_expanded(Attn(), q, k, v, scaling=0.25)
    assert got.shape == ref.shape == (1, n, 8, 16)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if n > 1:  # and causal: the first row sees only the first key
        only_first = sdpa_expanded(Attn(), q[:, :, :1], k[:, :, :1], v[:, :, :1], scaling=0.25)
        torch.testing.assert_close(got[:, :1], only_first, rtol=1e-6, atol=1e-6)
