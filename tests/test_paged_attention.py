"""Attention of a batched forward over a shared pool (``model/paged_attention.py``): each segment sees its own pages only.

Random batches of segments (each over its own stream's pages of one pool, some local pages
unmapped, kept slots scattered, new tokens at free slots, a tree of choice branches) must equal,
segment by segment, SDPA over that stream's keys gathered with the dense rank mask:
- the torch kernels (in this process);
- the Triton kernel with a block table (``triton_attention.paged_attention``), run by Triton's
  interpreter on CPU in a subprocess, in fp32; and pooled engines on the Triton kernel, driven
  from threads, equal to the same streams on their own engines with the torch kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Layer:
    layer_idx = 0


def random_batch(page: int, live: bool, seed: int):
    """-> (query (1, Hq, N, D), pool K, V (1, Hkv, cap, D), PagedMask, [(rows, gathered keys, dense mask)])."""
    from model.masks import rank_mask
    from model.paged_attention import PagedMask, PagedSegment

    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, pages = 4, 2, 16, 24
    k_pool, v_pool = torch.randn(1, hkv, pages * page, d, generator=g), torch.randn(1, hkv, pages * page, d, generator=g)
    free = torch.randperm(pages, generator=g).tolist()
    segments, refs, at = [], [], 0
    for n, local_pages, tree in [(1, 3, None), (5, 2, None), (8, 4, [3, 1, 4]), (3, 1, None), (2, 3, None)]:
        table = torch.tensor([free.pop() for _ in range(local_pages)])
        if local_pages > 2:
            table[1] = -1  # an unmapped local page (its stream gave it back): never read
        length = local_pages * page - int(torch.randint(0, page // 2, (1,), generator=g))
        slot_ok = (table.clamp(max=0) + 1).bool().repeat_interleave(page)[:length]  # slots of mapped pages
        usable = torch.nonzero(slot_ok)[:, 0]
        usable = usable[torch.randperm(usable.numel(), generator=g)]
        kept = usable[: max(0, usable.numel() - n) // 2]
        new = usable[kept.numel():kept.numel() + n]
        rank = torch.full((length,), -1, dtype=torch.int32)
        rank[kept] = 0
        rank[new] = torch.arange(1, n + 1, dtype=torch.int32)
        gather = (table.clamp(min=0)[:, None] * page + torch.arange(page)).flatten()[:length]
        segments.append(PagedSegment(n, rank, gather, table.clamp(min=0).to(torch.int32),
                                     tuple(tree) if tree else None, None, live))
        refs.append((at, n, gather, rank_mask(rank, n, tree, torch.float32)))
        at += n
    query = torch.randn(1, at, hq, d, generator=g).transpose(1, 2)  # strided, as transformers hands it
    return query, k_pool, v_pool, PagedMask(tuple(segments), page), refs


def check(live: bool) -> float:
    """The worst difference to the reference over a few random batches (asserts it is < 1e-5)."""
    from model.paged_attention import attention

    worst = 0.0
    for page, seed in [(16, 0), (16, 1), (64, 2)]:
        query, k_pool, v_pool, mask, refs = random_batch(page, live, seed)
        out = attention(_Layer(), query, k_pool, v_pool, mask, 0.25)  # (1, N, Hq, D)
        g = query.shape[1] // k_pool.shape[1]
        for r0, n, gather, dense in refs:
            k = k_pool.index_select(2, gather).repeat_interleave(g, 1)
            v = v_pool.index_select(2, gather).repeat_interleave(g, 1)
            want = F.scaled_dot_product_attention(query[:, :, r0:r0 + n], k, v, attn_mask=dense, scale=0.25)
            diff = out[:, r0:r0 + n] - want.transpose(1, 2)
            worst = max(worst, float("inf") if bool(diff.isnan().any()) else float(diff.abs().max()))  # NaN fails
    assert worst < 1e-5, worst
    return worst


def test_torch_kernels_see_only_each_segments_own_pages():
    check(live=False)


ENGINES = r"""
from model import KVPool, StreamConfig, VideoStreamInference
from model.testing import build_tiny_model
from tests.test_pool import CONFIGS, close, run, same_stream, script
from tests.test_paged_attention import check
from tests.test_scheduler import drive
check(live=True)
from model import triton_attention
own = triton_attention.splits_for
for many in (40, 70):  # more key ranges than the merge takes per step (16 at 16 rows), most of them empty
    triton_attention.splits_for = lambda *args, many=many: many
    check(live=True)
triton_attention.splits_for = own
model, proc = build_tiny_model()
pool = KVPool.for_model(model, tokens=2048, page=16, batch_window_ms=20.0, max_wait_ms=100.0)
configs = [StreamConfig(attention_kernel="triton", **CONFIGS[c]) for c in ("unbounded", "budget-recall", "window")]
engines = [VideoStreamInference(model, proc, config=cfg, pool=pool) for cfg in configs]
assert all(e.stats()["text_attention"] == "stream_triton" for e in engines)
ops = [script(300 + k)[:8] for k in range(3)]
results = drive([lambda k=k: [run(engines[k], op) for op in ops[k]] for k in range(3)])
assert pool.stats()["max_lm_segments"] > 1, pool.stats()
assert pool.stats()["graph_batches"] > 0, pool.stats()  # questions and decode steps replayed (the CPU stand-in)
for k, cfg in enumerate(configs):
    alone = VideoStreamInference(model, proc, config=cfg.replace(attention_kernel="torch"))
    for op, got in zip(ops[k], results[k]):
        want = run(alone, op)
        assert close(got, want), (k, op, got, want)
    same_stream(engines[k], alone)
print("ok")
"""


@pytest.mark.slow
def test_the_triton_kernel_in_the_interpreter_sees_only_each_segments_own_pages():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", ENGINES], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
