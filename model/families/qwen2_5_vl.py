"""Qwen2.5-VL: one video block per turn, temporal positions in absolute time, windowed vision attention.

Transcript: ``<|vision_start|>`` + the video tokens of every chunk + ``<|vision_end|>``; the block
stays open across chunks. A vision token of temporal grid g sits at temporal position
``start + floor(g * second_per_grid_t * tokens_per_second)`` (``second_per_grid_t`` = 2 / fps,
``tokens_per_second`` from the vision config: 2), so time is in the positions (Qwen's
reference ``get_rope_index``; transformers 4.52-5.17 truncate ``second_per_grid_t``, see
``model/positions.py``). The vision tower attends in 112-px windows within each frame pair.
"""
from __future__ import annotations

from .base import Family


class Qwen2_5_VL(Family):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    window_attention = True

    def temporal(self, vision_config, second_per_grid_t: float) -> tuple[float, float]:
        return second_per_grid_t, float(vision_config.tokens_per_second)


QWEN2_5_VL = Qwen2_5_VL()
