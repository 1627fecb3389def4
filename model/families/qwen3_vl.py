"""Qwen3-VL (dense and MoE): a vision block per frame pair behind its timestamp, DeepStack, interleaved M-RoPE.

Transcript (Qwen's layout, as transformers 4.57's processor and qwen-vl-utils write it): the
chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` is replaced by, for each frame
pair, ``<{t:.1f} seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``, t the mean time
of the pair's two frames (a padded last pair: the last frame's time). Times are the frames'
real times: ``append_frames(..., timestamps=)`` or, without them, the stream's time at the
block's fps. (transformers 5.x's processor nests those blocks inside the template's own
start/end pair; ``compat.unnest_qwen3_video`` undoes it for the reference checks.)

Positions: a pair's tokens sit at (s, s + row, s + col) from its block's start s (time lives in
the timestamp text, not in the positions); the text after starts at s + max(h', w'), which is
the largest position + 1. The rotary embedding interleaves T, H, W frequencies and q/k are
RMS-normed per head: both inside transformers' modules, which the stream calls.

DeepStack: the vision tower's features after blocks ``deepstack_visual_indexes`` are added to
the decoder's hidden states at the visual rows after its first layers (``VisionOut.deepstack``;
a masked add with static buffers in CUDA graphs), for video and images alike.

Frames: patch 16, merge 2 (32-px factor); the processor sizes a video by a pixel budget over
all its frames, which a stream cannot know. Each frame is sized as the video processor sizes a
two-frame clip with its per-frame cap: at most ``max_video_tokens`` x 32^2 pixels (768 tokens),
at least ``size["shortest_edge"] / 2`` (a 448x448 frame stays 448x448: 196 tokens a pair). The
offline reference takes the same frames.
"""
from __future__ import annotations

from dataclasses import replace

from .. import compat
from ..compat import PixelConfig
from .base import Family


class Qwen3_VL(Family):
    name = "qwen3_vl"
    model_type = "qwen3_vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    pair_blocks = True
    interpolated_positions = True

    def temporal(self, vision_config, second_per_grid_t: float) -> tuple[float, float]:
        return 0.0, 0.0  # a block is one pair: every token at the block's temporal start

    def deepstack_layers(self, config) -> int:
        return len(config.vision_config.deepstack_visual_indexes)

    def video_pixels(self, processor) -> PixelConfig:
        vp = compat.video_processor(processor)
        pix = compat.pixel_config(vp)
        per_frame_cap = int(getattr(vp, "max_video_tokens", 768)) * pix.factor ** 2
        return replace(pix, min_pixels=max(1, pix.min_pixels // pix.temporal_patch_size),
                       max_pixels=min(pix.max_pixels, per_frame_cap))

    @staticmethod
    def timestamp(seconds: float) -> str:
        """The text before a pair's block (the processor's format: one decimal)."""
        return f"<{seconds:.1f} seconds>"


class Qwen3_VL_MoE(Qwen3_VL):
    name = "qwen3_vl_moe"
    model_type = "qwen3_vl_moe"
    hf_class = "Qwen3VLMoeForConditionalGeneration"

    def hf_module(self) -> str:
        return "transformers.models.qwen3_vl.modeling_qwen3_vl"  # the MoE reuses the dense vision tower


QWEN3_VL = Qwen3_VL()
QWEN3_VL_MOE = Qwen3_VL_MoE()
