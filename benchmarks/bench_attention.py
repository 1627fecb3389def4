"""Attention kernels over a long GQA cache, one layer of Qwen2.5-VL-3B's text model (16 q heads, 2 K/V heads, dim 128).

For 1 / 57 / 512 query rows (a decode step, a question, a 4-frame chunk) over 7.7k / 61k / 230k
cached tokens: the live-length Triton kernel (``model.triton_attention``) against SDPA's cuDNN and
flash backends with ``enable_gqa`` and the folded-GQA matmul path, with the error of each against
a float32 reference and the K/V read floor. GPU only.

    python benchmarks/bench_attention.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from model import triton_attention  # noqa: E402
from model.fast_attention import _rows_attention  # noqa: E402

H, KV, D = 16, 2, 128


def bench(fn, n=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for keys in (7680, 61440, 230400):
        cap = keys + 8192  # a reserved buffer larger than the live part, as in a stream
        k = torch.randn(1, KV, cap, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for n in (1, 57, 512):
            start = keys - n
            q = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # as transformers hands it
            kl, vl = k[:, :, :keys], v[:, :, :keys]
            bias = causal_lower_right(n, keys)
            ref = F.scaled_dot_product_attention(q.float(), kl.float().repeat_interleave(8, 1),
                                                 vl.float().repeat_interleave(8, 1), attn_mask=bias).transpose(1, 2)
            st = torch.tensor(start, device="cuda")
            row = {"keys": keys, "rows": n, "floor_ms": 2 * kl.numel() * 2 / 4.0e12 * 1e3}
            cands = {"triton_live": lambda: triton_attention.attention(q, k, v, st, D ** -0.5)}
            for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                def f(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, kl, vl, attn_mask=bias if n > 1 else None,
                                                              enable_gqa=True).transpose(1, 2)
                cands[name] = f
            if n * 8 <= 1024:
                mask = None if n == 1 else torch.zeros(1, 1, n, keys, device="cuda", dtype=torch.bfloat16).masked_fill_(
                    torch.ones(n, keys, device="cuda", dtype=torch.bool).triu_(keys - n + 1), float("-inf"))
                cands["matmul_rows"] = lambda: _rows_attention(q, kl, vl, mask, D ** -0.5, n, 8)
            for name, fn in cands.items():
                try:
                    out = fn()
                    row[name + "_ms"] = bench(fn)
                    row[name + "_relerr"] = float((out.float() - ref).norm() / ref.norm())
                except Exception as e:  # a backend that does not take this shape: recorded, the rest go on
                    row[name + "_ms"] = f"unavailable: {type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
            print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
