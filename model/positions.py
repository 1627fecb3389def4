"""M-RoPE positions for Qwen2.5-VL: one pure function family, shared by streaming and offline.

This follows Qwen's reference ``get_rope_index`` (DESIGN.md section 3), not whichever variant
the installed transformers ships:

- text token i after start s:                 (s+i, s+i, s+i)
- vision token (g, r, c) of a block at s:     (s + floor(g * second_per_grid_t * tokens_per_second), s+r, s+c)
  with g the global temporal-grid index inside the block (chunk k continues where k-1 ended),
  ``second_per_grid_t = temporal_patch_size / fps`` for videos and 0 for images;
- the text after a block starts at max(all positions so far) + 1, over t, h and w.

Every function returns a (3, n) int64 tensor: rows are (temporal, height, width).
"""
from __future__ import annotations

import torch


def text_positions(start: int, n: int) -> torch.Tensor:
    """(3, n) positions of n text tokens starting at ``start``."""
    return torch.arange(start, start + n, dtype=torch.long).expand(3, n)


def vision_positions(
    start: int,
    grid_t: int,
    llm_h: int,
    llm_w: int,
    *,
    t_offset: int = 0,
    second_per_grid_t: float = 0.0,
    tokens_per_second: float = 2.0,
) -> torch.Tensor:
    """(3, grid_t*llm_h*llm_w) positions of merged vision tokens, in (t, row, col) order.

    ``t_offset`` is the global temporal-grid index of the first grid in this call, so a
    block encoded chunk by chunk gets the same positions as the whole block at once.
    """
    g = torch.arange(t_offset, t_offset + grid_t, dtype=torch.long)
    # Reference arithmetic: int64 range * float32 scalar tensor * tokens_per_second -> float32,
    # then truncated (floor, positions are >= 0). Same dtypes, so the same rounding.
    t = (g * torch.tensor(second_per_grid_t, dtype=torch.float32) * tokens_per_second).long()
    t = t.view(-1, 1, 1).expand(grid_t, llm_h, llm_w)
    h = torch.arange(llm_h).view(1, -1, 1).expand(grid_t, llm_h, llm_w)
    w = torch.arange(llm_w).view(1, 1, -1).expand(grid_t, llm_h, llm_w)
    return torch.stack([t.flatten(), h.flatten(), w.flatten()]) + start


def next_start(positions: torch.Tensor) -> int:
    """The first free position after ``positions`` (max over all three rows, plus one)."""
    return int(positions.max()) + 1
