"""Attention over a preallocated cache that reads only the live part, with the length on the device.

One Triton kernel serves every stream segment on a GPU (a decode step, a question, a video
chunk): n new query rows at positions [start, start+n) against K/V buffers of any capacity,
bottom-right causal (row t sees keys 0..start+t). ``start`` is a device tensor, so a CUDA
graph captured once over the whole capacity costs what the live length costs, and a stream
never needs a re-capture as it grows.

- grouped-query heads are folded into rows: the g query heads of one K/V head share every K/V
  load (K/V read once per split, never copied);
- a tree of choice branches (``ask_choice``) is a per-row lower bound on the new keys it sees;
- a bounded stream's scattered slots (``slot_layout.py``): a per-slot ``rank`` says what each
  key is (0 a kept token, k >= 1 the segment's k-th new token, -1 nothing) and ``start`` how
  many slots to scan;
- split-K ("flash-decoding"): the keys are cut into ``splits`` ranges handled by separate
  programs, so one query row still fills the GPU; a second kernel merges the partial results
  by their log-sum-exp, a tile of splits per step and its programs spread over the head dims;
- softmax in float32 (online), P @ V in the input dtype as flash kernels do; float32 inputs use
  exact (IEEE) dots, never TF32.
Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``), which is how CI tests it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the torch kernels are used
    triton = None

BLOCK_N = 64  # keys per step


def available(device: torch.device) -> bool:
    """True where the kernel can run: Triton importable and a CUDA device (or the interpreter on CPU)."""
    import os

    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


# Triton compiles a variant per value class of each integer argument (== 1, divisible by 16, other) unless told not
# to: the row count, the key range and the split count change with every eager call's length (a question, a choice
# tree, a recall probe), so they are not specialized, and a call of a new length never compiles (issue 21 measured
# 0.9-1.1 s for the first ask_choice of a new length on the 8B; strides and head counts are fixed per model).
RUNTIME_INTS = ("n", "M", "MT", "SPLITS")


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[a for a in RUNTIME_INTS if a in names])(fn)


if triton is not None:

    @_jit
    def _split_kernel(Q, K, V, Start, Branch, Rank, Acc, Lse,
                      sqh, sqt, sqd, skh, skt, skd, svh, svt, svd,
                      n, G, M, scale,
                      # SPLITS is a run-time argument (not constexpr): a new row count (an eager question, a
                      # choice tree, a recall probe) picks another split count but never compiles a new variant
                      SPLITS, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                      FP32: tl.constexpr, TREE: tl.constexpr, RANK: tl.constexpr):
        mb, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(Start).to(tl.int32)
        if RANK:  # scattered slots: scan [0, start), the rank of each slot says who sees it
            kv_len = start
        else:
            kv_len = start + n
        rows = mb * BM + tl.arange(0, BM)  # folded rows: (head in group, token)
        row_ok = rows < M
        qh = h * G + rows // n
        t = rows % n
        d = tl.arange(0, D)
        q = tl.load(Q + qh[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        if TREE:  # row t also skips the new tokens before its branch: keys [start, start + branch[t])
            first = tl.load(Branch + t, mask=row_ok, other=0)
            if not RANK:
                first = first + start
        per = tl.cdiv(tl.cdiv(kv_len, BN), SPLITS) * BN
        lo = s * per
        hi = tl.minimum(lo + per, kv_len)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for j0 in range(lo, hi, BN):
            j = j0 + tl.arange(0, BN)
            key_ok = j < hi
            k = tl.load(K + h * skh + j[:, None] * skt + d[None, :] * skd, mask=key_ok[:, None], other=0.0)
            if FP32:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * scale
            if RANK:
                rk = tl.load(Rank + j, mask=key_ok, other=-1)  # 0 kept, k >= 1 the k-th new token, -1 none
                new = rk[None, :] - 1  # index of a new key in the segment
                visible = key_ok[None, :] & ((rk[None, :] == 0) | ((rk[None, :] >= 1) & (new <= t[:, None])))
                if TREE:
                    visible = visible & ((rk[None, :] == 0) | (new >= first[:, None]))
            else:
                visible = key_ok[None, :] & (j[None, :] <= start + t[:, None])
                if TREE:
                    visible = visible & ((j[None, :] < start) | (j[None, :] >= first[:, None]))
            sc = tl.where(visible, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + h * svh + j[:, None] * svt + d[None, :] * svd, mask=key_ok[:, None], other=0.0)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        base = (s * tl.num_programs(1) + h) * M + rows
        tl.store(Acc + base[:, None] * D + d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + base, lse, mask=row_ok)

    @triton.jit
    def _combine(Acc, Lse, base, row_ok, dd, SPLITS, STRIDE, BM: tl.constexpr, SC: tl.constexpr,
                 MD: tl.constexpr, D: tl.constexpr):
        """Merge the SPLITS partial results of BM rows in head dims ``dd`` (MD of them) by their log-sum-exp.

        ``base`` (BM,): the rows' offsets in split 0; split s adds s * STRIDE. SC splits per step, with an
        online rescale, so the serial chain is SPLITS / SC loads long (one split per step was the whole
        cost of a decode step's merge: ~58 us of 2 programs walking 128 splits, H100 run 23)."""
        m = tl.full([BM], float("-inf"), tl.float32)
        total = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, MD], tl.float32)
        sc = tl.arange(0, SC)
        for s0 in range(0, SPLITS, SC):
            s = s0 + sc
            ok = row_ok[:, None] & (s < SPLITS)[None, :]  # (BM, SC)
            at = base[:, None] + s[None, :].to(tl.int64) * STRIDE  # (BM, SC)
            lse = tl.load(Lse + at, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(lse, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row none of whose splits so far saw a key
            w = tl.exp(lse - m_safe[:, None])  # (BM, SC)
            alpha = tl.exp(m - m_safe)
            part = tl.load(Acc + at[:, :, None] * D + dd[None, None, :], mask=ok[:, :, None], other=0.0)  # (BM, SC, MD)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, 1)
            total = total * alpha + tl.sum(w, 1)
            m = m_new
        return acc / tl.where(total > 0, total, 1.0)[:, None]

    @_jit
    def _merge_kernel(Acc, Lse, Out, sot, soh, sod, n, G, M, HKV,
                      SPLITS, BM: tl.constexpr, SC: tl.constexpr, MD: tl.constexpr, D: tl.constexpr):
        # one program: BM rows of one K/V head, MD of the head dims (SPLITS at run time, as above)
        mb, h, dc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = mb * BM + tl.arange(0, BM)
        row_ok = rows < M
        dd = dc * MD + tl.arange(0, MD)
        out = _combine(Acc, Lse, h * M + rows.to(tl.int64), row_ok, dd, SPLITS, HKV * M, BM, SC, MD, D)
        qh = h * G + rows // n
        t = rows % n
        tl.store(Out + t[:, None] * sot + qh[:, None] * soh + dd[None, :] * sod, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


if triton is not None:

    @_jit
    def _paged_split_kernel(Q, K, V, BlockSeg, BlockM, SegRow, SegN, SegLen, Table, Rank, Branch, Acc, Lse,
                            sqh, sqt, sqd, skh, skt, skd, svh, svt, svd, stab, srank,
                            G, MT, scale, SPLITS, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                            FP32: tl.constexpr, TREE: tl.constexpr):
        # one program: a row block of one segment, one K/V head, one key range; the segment's keys are its
        # stream's local slots [0, SegLen), local page p at pool page Table[seg, p] (BN = the page size)
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg = tl.load(BlockSeg + b)
        mb = tl.load(BlockM + b)
        row0 = tl.load(SegRow + seg)
        n = tl.load(SegN + seg)
        kv_len = tl.load(SegLen + seg)
        rows = mb * BM + tl.arange(0, BM)  # folded rows of the segment: (head in group, token)
        row_ok = rows < G * n
        n1 = tl.maximum(n, 1)  # a captured batch's padding segments have no rows (n = 0)
        qh = h * G + rows // n1
        t = rows % n1
        d = tl.arange(0, D)
        q = tl.load(Q + qh[:, None].to(tl.int64) * sqh + (row0 + t)[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)
        if TREE:
            first = tl.load(Branch + row0 + t, mask=row_ok, other=0)
        per = tl.cdiv(tl.cdiv(kv_len, BN), SPLITS) * BN
        lo = s * per
        hi = tl.minimum(lo + per, kv_len)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for j0 in range(lo, hi, BN):
            j = j0 + tl.arange(0, BN)
            key_ok = j < hi
            rk = tl.load(Rank + seg * srank + j, mask=key_ok, other=-1)  # 0 kept, k >= 1 the k-th new token, -1 none
            used = key_ok & (rk >= 0)
            page = tl.load(Table + seg * stab + j0 // BN).to(tl.int64)
            slot = page * BN + tl.arange(0, BN)
            k = tl.load(K + h.to(tl.int64) * skh + slot[:, None] * skt + d[None, :] * skd, mask=used[:, None],
                        other=0.0)
            if FP32:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * scale
            new = rk[None, :] - 1  # index of a new key in the segment
            visible = used[None, :] & ((rk[None, :] == 0) | ((rk[None, :] >= 1) & (new <= t[:, None])))
            if TREE:
                visible = visible & ((rk[None, :] == 0) | (new >= first[:, None]))
            sc = tl.where(visible, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + h.to(tl.int64) * svh + slot[:, None] * svt + d[None, :] * svd, mask=used[:, None],
                        other=0.0)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        base = (s * tl.num_programs(1) + h).to(tl.int64) * MT + G * row0 + rows
        tl.store(Acc + base[:, None] * D + d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + base, lse, mask=row_ok)

    @_jit
    def _paged_merge_kernel(Acc, Lse, Out, BlockSeg, BlockM, SegRow, SegN, sot, soh, sod, G, MT, HKV,
                            SPLITS, BM: tl.constexpr, SC: tl.constexpr, MD: tl.constexpr, D: tl.constexpr):
        b, h, dc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seg = tl.load(BlockSeg + b)
        mb = tl.load(BlockM + b)
        row0 = tl.load(SegRow + seg)
        n = tl.load(SegN + seg)
        rows = mb * BM + tl.arange(0, BM)
        row_ok = rows < G * n
        dd = dc * MD + tl.arange(0, MD)
        out = _combine(Acc, Lse, h.to(tl.int64) * MT + G * row0 + rows, row_ok, dd, SPLITS, HKV * MT, BM, SC, MD, D)
        n1 = tl.maximum(n, 1)
        qh = h * G + rows // n1
        t = row0 + rows % n1
        tl.store(Out + t[:, None].to(tl.int64) * sot + qh[:, None] * soh + dd[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tables: dict, scale: float,
                    page: int, out: torch.Tensor, splits: Optional[int] = None) -> None:
    """Attention of several segments' rows, each over its own stream's pages of a shared pool, in one launch.

    query (1, Hq, N, D): every segment's rows; key/value (1, Hkv, pool, D): the pool's buffers; ``tables``
    (``PagedMask.tables``): per segment its first row ``rows``, rows ``n``, local slots to scan ``length``, its
    block table ``table`` (S, pages) int32 (local page -> pool page) and ``rank`` (S, pages * page) int32 over its
    local slots (0 kept, k >= 1 its k-th new token, -1 nothing); ``branch`` (N,) int32 choice-branch starts or
    None. ``page`` must be the key block (keys of one step lie in one page). Writes the segments' rows of
    ``out`` (1, N, Hq, D). A captured batch (``batch_graphs``) also gives ``bm``, ``splits`` and ``blocks`` (each
    program's segment and row block, padded with programs of a segment with no rows).
    """
    _, hq, total, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    assert d & (d - 1) == 0 and d >= 16, f"head dim {d} must be a power of two >= 16"
    counts = tables["n_list"]  # host copies: no sync
    bm = tables.get("bm") or launch_config(g * max(counts))[0]  # (a captured batch fixes bm, blocks and splits)
    if "blocks" not in tables:  # (segment, row block) of each program; the same in every layer
        per_seg = [-(-g * n // bm) for n in counts]
        seg_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(per_seg))
        block_m = torch.cat([torch.arange(k) for k in per_seg])
        tables["blocks"] = (seg_of.to(torch.int32).to(query.device), block_m.to(torch.int32).to(query.device))
    seg_of, block_m = tables["blocks"]
    blocks = seg_of.numel()
    splits = splits or tables.get("splits") or splits_for(g * sum(counts), hkv, tables["max_length"], query.device, bm)
    mt = g * total
    acc = torch.empty(splits, hkv, mt, d, dtype=torch.float32, device=query.device)
    lse = torch.full((splits, hkv, mt), float("-inf"), dtype=torch.float32, device=query.device)
    q, k, v = query[0], key[0], value[0]
    table, rank = tables["table"], tables["rank"]
    branch = tables["branch"]
    _paged_split_kernel[(blocks, hkv, splits)](
        q, k, v, seg_of, block_m, tables["rows"], tables["n"], tables["length"], table, rank,
        branch if branch is not None else tables["rows"], acc, lse,
        *q.stride(), *k.stride(), *v.stride(), table.stride(0), rank.stride(0), g, mt, scale,
        SPLITS=splits, BM=bm, BN=page, D=d, FP32=query.dtype == torch.float32, TREE=branch is not None)
    sc, md = merge_config(bm, d)
    _paged_merge_kernel[(blocks, hkv, d // md)](acc, lse, out, seg_of, block_m, tables["rows"], tables["n"],
                                                out.stride(1), out.stride(2), out.stride(3), g, mt, hkv,
                                                SPLITS=splits, BM=bm, SC=sc, MD=md, D=d)


def splits_for(rows: int, kv_heads: int, keys: int, device: torch.device, block_m: Optional[int] = None) -> int:
    """Key ranges per (row block, K/V head): enough programs to fill the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = math.ceil(rows / (block_m or launch_config(rows)[0])) * kv_heads
    return max(1, min(128, (4 * sms) // programs, math.ceil(keys / (4 * BLOCK_N))))


def merge_config(block_m: int, d: int) -> tuple[int, int]:
    """(splits per step, head dims per program) of the merge: a (rows, splits, dims) tile of 4,096 floats, and
    d / dims programs per row block and head (the merge's work is spread over the head dims too)."""
    md = min(16, d)
    return max(1, 4096 // (block_m * md)), md


def launch_config(rows: int) -> tuple[int, int, int]:
    """(query rows per program, warps, pipeline stages) for ``rows`` folded rows (K/V heads' query heads x tokens)."""
    return (16 if rows <= 16 else 64), 4, 3


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor, scale: float,
              splits: Optional[int] = None, branches: Optional[torch.Tensor] = None,
              rank: Optional[torch.Tensor] = None, launch: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
    """query (1, Hq, n, D) at positions [start, start+n); key/value (1, Hkv, >= start+n, D) buffers.

    ``start``: a 0-d integer tensor on the query's device. ``branches``: None (causal), or an (n,)
    int32 tensor giving, per new token, the offset where its branch starts (a tree of choices:
    token t sees the cache and new tokens branches[t]..t). Returns (1, n, Hq, D): what
    transformers' attention functions return. Only keys [0, start+n) are read.

    ``rank`` (capacity,) int32 (a bounded stream's scattered slots): keys [0, start) are scanned
    and slot j is seen by row t if rank[j] == 0 (kept) or 1 <= rank[j] <= t + 1 (a new token
    written at or before t; with ``branches``, also rank[j] - 1 >= branches[t]).

    ``launch``: (rows per block, warps, pipeline stages) instead of ``launch_config``'s (a tuning sweep).
    """
    _, hq, n, d = query.shape
    hkv = key.shape[1]
    g, m = hq // hkv, (hq // hkv) * n
    assert d & (d - 1) == 0 and d >= 16, f"head dim {d} must be a power of two >= 16"
    bm, warps, stages = launch or launch_config(m)
    splits = splits or splits_for(m, hkv, key.shape[2], query.device, bm)
    acc = torch.empty(splits, hkv, m, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, hkv, m, dtype=torch.float32, device=query.device)
    out = torch.empty(1, n, hq, d, dtype=query.dtype, device=query.device)
    q, k, v = query[0], key[0], value[0]
    fp32 = query.dtype == torch.float32
    _split_kernel[(triton.cdiv(m, bm), hkv, splits)](
        q, k, v, start, branches if branches is not None else start, rank if rank is not None else start, acc, lse,
        *q.stride(), *k.stride(), *v.stride(), n, g, m, scale, SPLITS=splits, BM=bm, BN=BLOCK_N, D=d, FP32=fp32,
        TREE=branches is not None, RANK=rank is not None, num_warps=warps, num_stages=stages)
    sc, md = merge_config(bm, d)
    _merge_kernel[(triton.cdiv(m, bm), hkv, d // md)](acc, lse, out, out.stride(1), out.stride(2), out.stride(3), n, g,
                                                      m, hkv, SPLITS=splits, BM=bm, SC=sc, MD=md, D=d)
    return out
