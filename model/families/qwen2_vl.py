"""Qwen2-VL: Qwen2.5-VL's transcript, with a temporal position per frame pair and no vision windows.

Transcript: as Qwen2.5-VL (one block per turn, open across chunks). A vision token of temporal
grid g sits at temporal position ``start + g``: one position per frame pair whatever the fps
(no ``second_per_grid_ts``). The text after a block starts at the largest position so far + 1.
transformers 5.x's ``get_rope_index`` starts it at ``start + max(h, w)`` instead (after a
20-pair video the next token sits at position 5, not 23): streaming and the offline reference
both use ``model/positions.py``. The vision tower attends within each frame pair (no windows).
"""
from __future__ import annotations

from .base import Family


class Qwen2_VL(Family):
    name = "qwen2_vl"
    model_type = "qwen2_vl"
    hf_class = "Qwen2VLForConditionalGeneration"

    def temporal(self, vision_config, second_per_grid_t: float) -> tuple[float, float]:
        # g * 1.0 * 1.0 in float32 is g exactly (for g < 2^24): the reference's integer index
        return (1.0, 1.0) if second_per_grid_t else (0.0, 0.0)


QWEN2_VL = Qwen2_VL()
