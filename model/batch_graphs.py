"""CUDA graphs of a pool's batched forwards of token segments: questions and decode steps of many streams.

Run eagerly, a batched forward of a few tokens is launch-bound: a question alone took ~31 ms through
the scheduler against ~8-10 ms replayed from a stream's own graph (H200, 3B; ``BENCHMARKS.md``), and
a decode step of B streams costs as much. ``BatchGraphs`` captures such forwards once per bucket
and replays them with the batch's data copied into static buffers.

A bucket is (R rows, S segments, P pages per segment, the kernel's row block): a batch of N <= R
rows in S' <= S segments, each over at most P pages of its stream, fits it. A batch with questions
is padded to ``PoolConfig.graph_question_rows`` rows a segment, so a question of any length up to
it replays the bucket the warm-up captured (padding rows cost little in a launch-bound forward).
Padding rows write their K/V into scratch slots past the pool's pages (``KVPool.scratch``), which no stream owns and no
block table names; padding segments have no rows and no keys, and padding programs of the kernel
belong to a padding segment. Only the Triton kernel takes static tables, so only batches whose
segments all run it (``PagedSegment.live``) and that need the last row's logits (questions, decode
steps; not choices' trees, probes or chunks' embeddings) are captured; the rest run eagerly
(``batch_forward.run_lm``). Captures happen when a bucket is first met, on the scheduler's language-model thread,
with padding only (nothing any stream owns is written); a failed capture turns the graphs off.
Replays equal the eager batch to rounding (the split-K ranges differ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import compat
from .cuda_graphs import _Recorder
from .kv_cache import CacheView
from .paged_attention import PagedMask
from .triton_attention import launch_config, splits_for


def _pow2(x: int, least: int = 1) -> int:
    return max(least, 1 << max(0, x - 1).bit_length())


def _pages(x: int) -> int:
    """The pages bucket: 16, 64, 256, ... (a wider table costs only its buffer; the kernel scans each segment's own
    length)."""
    p = 16
    while p < x:
        p *= 4
    return p


@dataclass
class _Static:
    """One bucket's graph and the buffers it reads and writes."""

    graph: object
    out: torch.Tensor  # (1, S, V) float32: the logits of each segment's last row
    ids: torch.Tensor  # (R,) token ids
    positions: torch.Tensor  # (3, R) M-RoPE positions
    index: torch.Tensor  # (R,) pool slots the rows' K/V go to
    last: torch.Tensor  # (S,) each segment's last row
    segs: torch.Tensor  # (3, S + 1) int32: first row, rows, local slots to scan, per segment (+ one padding segment)
    blocks: torch.Tensor  # (2, programs) int32: each kernel program's segment and row block
    table: torch.Tensor  # (S + 1, P) int32 block tables
    rank: torch.Tensor  # (S + 1, P * page) int32 ranks of local slots
    programs: int
    block: int  # the kernel's row block
    keep: tuple


class BatchGraphs(_Recorder):
    """The captured batched forwards of one ``KVPool`` (its scheduler runs them)."""

    def __init__(self, model, buffers, page: int, scratch: torch.Tensor, config, capture: bool):
        super().__init__(capture)
        self.model, self.buffers, self.page, self.scratch, self.config = model, buffers, page, scratch, config
        self.kv_heads = model.kv_shape()[1]
        self.group = compat.text_config(model.config).num_attention_heads // self.kv_heads  # query heads per K/V head
        self.graphs: dict[tuple, _Static] = {}
        self.replays = 0
        if not config.batch_graphs:
            self.disabled = "off (PoolConfig.batch_graphs=False)"

    def release(self) -> None:
        """Drop every graph and the pool's buffers (the pool is closed)."""
        super().release()
        self.buffers = self.scratch = None
        self.disabled = "off (the pool is closed)"

    def bucket(self, works: list) -> Optional[tuple]:
        """The bucket (R, S, P, row block) of a batch, or None if it runs eagerly."""
        cfg = self.config
        if self.disabled is not None or not works:
            return None
        for w in works:
            s = w.segment
            if w.kind != "ids" or w.logits != "last" or w.deepstack is not None or s.tree or s.on_query or not s.live:
                return None
        rows, longest, segments = sum(w.n for w in works), max(w.n for w in works), _pow2(len(works))
        if rows > cfg.max_graph_rows or len(works) > cfg.max_graph_segments or _pow2(rows) > self.scratch.numel():
            return None
        pages = _pages(max(w.segment.table.numel() for w in works))
        if 1 < longest <= cfg.graph_question_rows:
            # questions: padded, so that questions of every length share the bucket warm_graphs captured (run 23:
            # the server's questions were longer than the 32 rows then warmed, and each bucket was captured when met)
            padded = self._question_bucket(segments, pages)
            if padded is not None:
                return padded
        return _pow2(rows), segments, pages, launch_config(self.group * longest)[0]

    def _question_bucket(self, segments: int, pages: int) -> Optional[tuple]:
        """The bucket of ``segments`` questions padded to ``graph_question_rows`` rows each, or None if too many rows."""
        q = self.config.graph_question_rows
        if q * segments > min(self.config.max_graph_rows, self.scratch.numel()):
            return None
        return q * segments, segments, pages, launch_config(self.group * q)[0]

    def keys(self, streams: int, tokens: int) -> list[tuple]:
        """The buckets of decode steps of 1, 2, 4, ... up to ``streams`` streams and of 1, 2, 4 questions (of up to
        ``graph_question_rows`` rows each), for streams of up to ``tokens`` slots (every pages bucket up to theirs)."""
        cfg, out = self.config, []
        most = min(streams, cfg.max_graph_segments)
        pages, p = [], 16
        while True:
            pages.append(p)
            if p >= -(-tokens // self.page):
                break
            p *= 4
        for p in pages:
            s = 1
            while s <= _pow2(most):
                out.append((s, s, p, launch_config(self.group)[0]))
                question = self._question_bucket(s, p) if s <= 4 else None
                if question is not None:
                    out.append(question)
                s *= 2
        return out

    @torch.no_grad()
    def prepare(self, keys: list[tuple]) -> int:
        """Capture these buckets now (a server's or benchmark's warm-up) -> how many were captured."""
        done = 0
        for key in keys:
            if self.disabled is not None or len(self.graphs) >= self.config.max_graphs:
                break
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(*key)
                    done += 1
                except RuntimeError as e:
                    self.fail(e)
        return done

    @torch.no_grad()
    def run(self, works: list) -> Optional[list]:
        """Each work's (1, 1, V) float32 logits from a replay, or None (then the batch runs eagerly)."""
        key = self.bucket(works)
        if key is None:
            return None
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.config.max_graphs:
                return None
            try:
                g = self.graphs[key] = self._capture(*key)
            except RuntimeError as e:  # e.g. an op that syncs with the host during capture
                self.fail(e)
                return None
        self._fill(g, works)
        g.graph.replay()
        self.replays += 1
        return [g.out[:, k:k + 1].clone() for k in range(len(works))]

    def _fill(self, g: _Static, works: list) -> None:
        """Copy the batch into the graph's buffers; the rest is padding."""
        device = g.ids.device
        n = sum(w.n for w in works)
        rows_pad = g.ids.numel() - n
        g.ids[:n].copy_(torch.cat([w.inputs.to(device) for w in works]), non_blocking=True)
        g.ids[n:].zero_()
        g.positions[:, :n].copy_(torch.cat([w.positions.to(device) for w in works], dim=1), non_blocking=True)
        g.positions[:, n:].zero_()
        g.index[:n].copy_(torch.cat([w.index for w in works]))
        g.index[n:].copy_(self.scratch[:rows_pad])
        segs = torch.zeros(3, g.segs.shape[1], dtype=torch.int32)  # padding segments: no rows, no keys
        last = torch.zeros(g.last.numel(), dtype=torch.long)
        seg_of, block_m, at = [], [], 0
        block = g.block
        for k, w in enumerate(works):
            s = w.segment
            segs[:, k] = torch.tensor([at, s.n, s.length], dtype=torch.int32)
            last[k] = at + s.n - 1
            g.table[k, :s.table.numel()].copy_(s.table)
            g.rank[k, :s.length].copy_(s.rank)
            m = -(-self.group * s.n // block)
            seg_of += [k] * m
            block_m += range(m)
            at += s.n
        pad = g.programs - len(seg_of)
        assert pad >= 0, f"a batch needs {len(seg_of)} kernel programs, its graph has {g.programs}"
        blocks = torch.tensor([seg_of + [g.segs.shape[1] - 1] * pad, block_m + [0] * pad], dtype=torch.int32)
        g.segs.copy_(segs, non_blocking=True)
        g.last.copy_(last, non_blocking=True)
        g.blocks.copy_(blocks, non_blocking=True)

    def _capture(self, rows: int, segments: int, pages: int, block: int) -> _Static:
        """Record a bucket's forward over padding only (its K/V go to scratch slots)."""
        model, device, page = self.model, self.model.device, self.page
        assert self.scratch.numel() >= rows, f"{self.scratch.numel()} scratch slots for a bucket of {rows} rows"
        ids = torch.zeros(rows, dtype=torch.long, device=device)
        positions = torch.zeros(3, rows, dtype=torch.long, device=device)
        index = self.scratch[:rows].clone()
        last = torch.zeros(segments, dtype=torch.long, device=device)
        segs = torch.zeros(3, segments + 1, dtype=torch.int32, device=device)
        programs = -(-self.group * rows // block) + segments  # sum of ceil(G n_i / block) over the segments
        blocks = torch.zeros(2, programs, dtype=torch.int32, device=device)
        blocks[0] = segments  # every program in the padding segment until a batch fills them
        table = torch.zeros(segments + 1, pages, dtype=torch.int32, device=device)
        rank = torch.full((segments + 1, pages * page), -1, dtype=torch.int32, device=device)
        static = dict(table=table, rank=rank, branch=None, rows=segs[0], n=segs[1], length=segs[2], n_list=[rows],
                      max_length=pages * page, bm=block, blocks=(blocks[0], blocks[1]),
                      splits=splits_for(self.group * rows, self.kv_heads, pages * page, device, block))
        mask = PagedMask((), page, static)
        view = CacheView(self.buffers, 0, index)

        def step() -> torch.Tensor:
            embeds = model.embed_ids(ids)  # (1, R, D)
            return model.forward_segment(view, embeds, positions, mask, logits=last)  # (1, S, V)

        graph, out = self.record(step)
        return _Static(graph, out, ids, positions, index, last, segs, blocks, table, rank, programs, block,
                       keep=(mask, view, self.buffers))
