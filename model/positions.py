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

from typing import Sequence

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


def transcript_positions(
    input_ids: Sequence[int] | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grids: Sequence[Sequence[int]] = (),
    video_grids: Sequence[Sequence[int]] = (),
    second_per_grid_ts: Sequence[float] = (),
    merge_size: int = 2,
    tokens_per_second: float = 2.0,
) -> torch.Tensor:
    """(3, T) positions of a whole offline transcript (one sequence, no padding).

    Each maximal run of image (video) placeholder tokens is one image (video) block and
    takes the next grid (t, h, w) in patch units, in order. Used by the native path.
    """
    ids = torch.as_tensor(input_ids).flatten().tolist()
    parts, pos, i, n_img, n_vid = [], 0, 0, 0, 0
    while i < len(ids):
        tok = ids[i]
        j = i
        if tok in (image_token_id, video_token_id):
            while j < len(ids) and ids[j] == tok:
                j += 1
            if tok == image_token_id:
                (t, h, w), spgt = image_grids[n_img], 0.0
                n_img += 1
            else:
                (t, h, w), spgt = video_grids[n_vid], float(second_per_grid_ts[n_vid])
                n_vid += 1
            block = vision_positions(
                pos, int(t), int(h) // merge_size, int(w) // merge_size,
                second_per_grid_t=spgt, tokens_per_second=tokens_per_second,
            )
            assert block.shape[1] == j - i, f"grid {(t, h, w)} gives {block.shape[1]} tokens, transcript has {j - i}"
        else:
            while j < len(ids) and ids[j] not in (image_token_id, video_token_id):
                j += 1
            block = text_positions(pos, j - i)
        parts.append(block)
        pos = next_start(block)
        i = j
    assert n_img == len(image_grids) and n_vid == len(video_grids), (n_img, len(image_grids), n_vid, len(video_grids))
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
