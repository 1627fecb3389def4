"""One forward for the work of many pooled streams: segments concatenated into one language-model forward,
chunks' frames into one vision-tower forward.

What a pooled stream hands the scheduler (``scheduler.py``) for one of its forwards:

- ``LMWork``: one segment (text ids, embeddings with vision rows in place, or recall's probe),
  its M-RoPE positions, the pool slots its K/V go to (slots its own transaction allocated) and its
  ``PagedSegment`` (what its rows may see: its own stream's slots only);
- ``VisionWork``: the patches of one grid (t, h, w).

``run_lm`` runs works of one group as ONE forward: rows (1, sum n_i, D), positions (3, sum n_i),
each segment's K/V written at its own slots, attention per segment (``paged_attention``), and
returns each work's own output (its logits rows, or its probe's query means). ``run_vision``
runs grids as ONE vision forward (patches concatenated, one row of ``grid_thw`` each: the tower
attends within each grid) and splits the embeddings back. Nothing here commits anything: the
streams' transactions do, after their own calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import compat
from .families import VisionOut
from .kv_cache import CacheView
from .paged_attention import PagedMask, PagedSegment


@dataclass(eq=False)
class LMWork:
    """One segment of a pooled stream, ready to run in a batched forward."""

    kind: str  # "ids": (n,) token ids; "embeds": (1, n, D) embeddings; "probe": (n,) ids, first layers only
    inputs: torch.Tensor
    positions: torch.Tensor  # (3, n) M-RoPE positions
    index: torch.Tensor  # (n,) int64 pool slots on the device, where the segment's K/V go
    segment: PagedSegment
    logits: str = "none"  # "none", "last" or "all" rows' logits
    deepstack: Optional[torch.Tensor] = None  # (k, 1, n, D) DeepStack rows (Qwen3-VL), zero at text rows
    probe: object = None  # recall's ``QueryProbe`` (kind "probe"): its ``out`` is the result

    @property
    def n(self) -> int:
        return self.segment.n

    @property
    def group(self) -> tuple:
        """Works of one group run in one forward (a probe runs only its first layers)."""
        return ("probe", self.probe.layers) if self.kind == "probe" else ("lm",)

    @property
    def urgent(self) -> bool:
        """Questions, answers' decode steps, choices and probes go before video chunks."""
        return self.kind != "embeds"


@dataclass(eq=False)
class VisionWork:
    """The patches of one vision grid of a pooled stream."""

    patches: torch.Tensor  # (P, C*T*p*p)
    grid: tuple  # (t, h, w) in patches
    varlen: bool  # all windows of a layer in one call (``fast_attention.vision_attention``)

    @property
    def n(self) -> int:
        return self.patches.shape[0]

    @property
    def group(self) -> tuple:
        return ("vision", self.varlen, self.patches.shape[1])

    urgent = False


@torch.no_grad()
def run_lm(model, buffers, page: int, works: list[LMWork]) -> list:
    """Works of one group -> each one's output: (1, n|1, V) float32 logits, None, or (P, H_kv, D) probe means."""
    device = model.device
    embeds = torch.cat([w.inputs if w.kind == "embeds" else model.embed_ids(w.inputs) for w in works], dim=1)
    positions = torch.cat([w.positions.to(device) for w in works], dim=1)  # (3, N)
    index = torch.cat([w.index for w in works])  # (N,)
    total = embeds.shape[1]
    deepstack = None
    if any(w.deepstack is not None for w in works):
        k = max(w.deepstack.shape[0] for w in works if w.deepstack is not None)
        deepstack = embeds.new_zeros(k, 1, total, embeds.shape[2])
    rows, spans, at = [], [], 0
    for w in works:
        if w.deepstack is not None:
            deepstack[:w.deepstack.shape[0], :, at:at + w.n] = w.deepstack
        first = len(rows)
        if w.logits == "last":
            rows.append(at + w.n - 1)
        elif w.logits == "all":
            rows.extend(range(at, at + w.n))
        spans.append((first, len(rows)))
        at += w.n
    mask = PagedMask(tuple(w.segment for w in works), page)
    view = CacheView(buffers, 0, index)
    if works[0].kind == "probe":  # the attention of the first layers writes each probe's query means
        model.forward_segment(view, embeds, positions, mask, layers=works[0].probe.layers)
        return [w.probe.out for w in works]
    which = torch.tensor(rows, dtype=torch.long, device=device) if rows else "none"
    logits = model.forward_segment(view, embeds, positions, mask, logits=which, deepstack=deepstack)
    return [logits[:, a:b] if w.logits != "none" else None for w, (a, b) in zip(works, spans)]


@torch.no_grad()
def run_vision(model, works: list[VisionWork], layouts: Optional[dict] = None) -> list[VisionOut]:
    """Grids of one group -> each one's ``VisionOut`` ((tokens, D) embeddings, DeepStack features).

    ``layouts``: a cache of the tower's precomputed layout per tuple of grids (``Family.vision_static_kwargs``,
    computed from a host copy of the grids): the tower then never waits for the device to read its layout.
    """
    patches = torch.cat([w.patches for w in works])
    grids = tuple(tuple(w.grid) for w in works)
    grid = torch.tensor(grids, dtype=torch.long, device=patches.device)  # (k, 3)
    static = None
    if layouts is not None and works[0].varlen:
        if grids not in layouts:
            if len(layouts) >= 64:
                layouts.pop(next(iter(layouts)))
            host = model.family.vision_static_kwargs(model, torch.tensor(grids, dtype=torch.long))
            layouts[grids] = host and {k: v.to(patches.device) if torch.is_tensor(v) else v for k, v in host.items()}
        static = layouts[grids]
    out = model.family.encode_vision(model, patches, grid, varlen=works[0].varlen, **dict(static or {}))
    merge = compat.vision_tower(model).spatial_merge_size
    sizes = [t * h * w // merge**2 for t, h, w in (w.grid for w in works)]
    embeds = out.embeds.split(sizes)
    deepstack = out.deepstack.split(sizes, dim=1) if out.deepstack is not None else [None] * len(works)
    return [VisionOut(e, d) for e, d in zip(embeds, deepstack)]
