"""What a model family is: everything that differs between Qwen-VL generations, behind one seam.

The stream, the cache, the graphs and the transactions are the same for every family; a
``Family`` says only what is the family's own (one module per family, one instance per
``model_type``):

- the model: its transformers class and ``config.json`` ``model_type``;
- the transcript layout of video: one vision block open across chunks (Qwen2-VL, Qwen2.5-VL)
  or a block per frame pair behind a ``<t seconds>`` timestamp (Qwen3-VL, ``pair_blocks``);
- the temporal position rule: a vision token's temporal position is ``block start +
  floor(g * f1 * f2)`` for temporal grid g of its block (``temporal``);
- the vision tower's outputs (merged embeddings, and DeepStack features for Qwen3-VL) and the
  layout it takes precomputed (what makes it capturable in a CUDA graph);
- how its processors size frames (``video_pixels`` / ``image_pixels``).

The transcript grammar built on these is ``model/transcript.py``; positions ``model/positions.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import compat
from ..compat import PixelConfig


@dataclass(frozen=True)
class VisionOut:
    """One vision forward: ``embeds`` (n, D) merged tokens in (t, row, col) order, and ``deepstack``
    (k, n, D) features added to the decoder's hidden states after its first k layers (Qwen3-VL), or None."""

    embeds: torch.Tensor
    deepstack: Optional[torch.Tensor] = None


class Family:
    """A Qwen-VL generation. Subclasses set the class attributes and override what differs."""

    name: str = ""  # e.g. "qwen2_5_vl"
    model_type: str = ""  # config.json ``model_type``
    hf_class: str = ""  # the transformers class, e.g. "Qwen2_5_VLForConditionalGeneration"
    pair_blocks: bool = False  # each frame pair is its own vision block behind its timestamp text
    window_attention: bool = False  # the vision tower attends in spatial windows (its layout is precomputed too)
    interpolated_positions: bool = False  # the vision tower interpolates a learned position grid per frame size

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def model_class(self):
        """The transformers ``...ForConditionalGeneration`` class of this family."""
        import transformers

        return getattr(transformers, self.hf_class)

    # -- positions ---------------------------------------------------------------------
    def temporal(self, vision_config, second_per_grid_t: float) -> tuple[float, float]:
        """The two factors of the temporal position rule: a token of temporal grid g in a block at s sits at
        ``s + floor(g * f1 * f2)``, multiplied in that order in float32 (Qwen's reference arithmetic).
        ``second_per_grid_t`` = temporal_patch_size / fps, 0 for an image."""
        raise NotImplementedError

    # -- vision ------------------------------------------------------------------------
    def deepstack_layers(self, config) -> int:
        """How many of the first decoder layers get vision features added after them (0: none)."""
        return 0

    def encode_vision(self, model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, varlen: bool = False,
                      **static) -> VisionOut:
        """(P, C*T*p*p) patches, (k, 3) grids -> ``VisionOut`` of (P / merge^2, D) embeddings, grid order.

        ``varlen``: all attention segments of a layer in one call (``fast_attention.vision_attention``);
        ``static``: the layout ``vision_static_kwargs`` precomputed (for CUDA graphs).
        """
        visual = compat.vision_tower(model)
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, stream_varlen=varlen, **static)
        embeds, deepstack = compat.vision_outputs(out)
        return VisionOut(embeds, torch.stack(deepstack) if deepstack else None)

    def vision_static_kwargs(self, model, grid_thw: torch.Tensor) -> Optional[dict]:
        """The vision tower's layout for ``grid_thw`` computed ahead (no host syncs inside), or None where the
        installed transformers cannot take it."""
        return compat.vision_static_kwargs(model, grid_thw, window=self.window_attention,
                                           interpolate=self.interpolated_positions)

    def varlen_supported(self) -> bool:
        """Whether the vision tower hands the attention function its segments (``cu_seqlens``) to batch."""
        return compat.vision_varlen_supported(self.hf_module())

    def hf_module(self) -> str:
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    # -- frames ------------------------------------------------------------------------
    def video_pixels(self, processor) -> PixelConfig:
        """How a video frame is sized and normalised (one frame at a time, as a stream must)."""
        return compat.pixel_config(compat.video_processor(processor))

    def image_pixels(self, processor) -> PixelConfig:
        return compat.pixel_config(processor.image_processor)
