"""StreamQwenModel: Qwen2.5-VL that runs one segment at a time into a cache it is handed.

The model is stateless: it holds weights, never a stream. A segment is either text token ids
or the merged vision embeddings of a chunk; its M-RoPE positions come from ``positions.py``
(the reference formula) and are passed explicitly, so transformers' cached ``rope_deltas``
and its own ``get_rope_index`` are never used. Where a segment's K/V go is given by the
``CacheView`` the caller passes (see ``kv_cache.py``). Any number of streams
(``VideoStreamInference`` objects) share one model.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from . import compat, fast_attention
from .kv_cache import CacheView
from .masks import StreamMask


class StreamQwenModel(Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` plus segment-wise forwards into an explicit cache."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # Overridden: on sdpa, attention dispatches per call (fast_attention.py); set once, before any stream exists.
        self.stream_kernels = fast_attention.install(self.config)

    @property
    def stream_state(self):
        raise AttributeError("the model holds no stream: read engine.stream_state on your VideoStreamInference "
                             "(many streams can share one model)")

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, K/V heads, head dim) of the text model's cache."""
        tc = compat.text_config(self.config)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return tc.num_hidden_layers, tc.num_key_value_heads, head_dim

    # -- vision ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], varlen: bool = False) -> torch.Tensor:
        """(P, C*T*p*p) patches of one grid -> (P / merge^2, D_text) embeddings in (t, row, col) order."""
        grid = torch.tensor([grid_thw], dtype=torch.long, device=pixel_values.device)
        return compat.encode_vision(self, pixel_values, grid, varlen=varlen)

    # -- segments --------------------------------------------------------------------
    def embed_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (1, n, D) embeddings."""
        return self.get_input_embeddings()(token_ids.to(self.device)[None])

    @torch.no_grad()
    def forward_segment(
        self,
        view: CacheView,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: Union[torch.Tensor, StreamMask],
        logits: Literal["none", "last", "all"] = "last",
    ) -> Optional[torch.Tensor]:
        """Write one segment's K/V through ``view`` and return its logits.

        inputs_embeds: (1, n, D); positions: (3, n) M-RoPE positions; attention_mask: an additive
        (1, 1, n, keys) tensor or a ``StreamMask``. Returns (1, n|1, V) float32 logits, or None.
        """
        hidden = self.run_language_model(view, inputs_embeds, positions.to(inputs_embeds.device)[:, None, :],
                                         attention_mask)
        if logits == "none":
            return None
        return self.lm_head(hidden if logits == "all" else hidden[:, -1:]).float()

    def run_language_model(self, view: CacheView, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                           attention_mask) -> torch.Tensor:
        """(1, n, D) embeddings at (3, 1, n) positions through the decoder -> (1, n, D) hidden states.

        A ``StreamMask`` goes in a per-layer-type dict so that transformers builds no mask of its own
        and hands it to the attention function as is; a 4-D tensor is used as given.
        """
        if isinstance(attention_mask, StreamMask):
            attention_mask = {"full_attention": attention_mask, "sliding_attention": attention_mask}
        lm = compat.language_model(self)
        out = lm(inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=attention_mask,
                 **compat.cache_kwargs(lm, view, view.start, inputs_embeds.shape[1], inputs_embeds.device))
        return out.last_hidden_state

    def run_first_layers(self, view: CacheView, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                         attention_mask: StreamMask, layers: int) -> torch.Tensor:
        """(1, n, D) embeddings at (3, n) positions through the first ``layers`` decoder layers only.

        For recall's probe, which reads the queries of those layers (``attention_mask.on_query``):
        the later layers' K/V are not written and the hidden states are not normed.
        """
        lm = compat.language_model(self)
        return compat.run_first_layers(lm, inputs_embeds, positions.to(inputs_embeds.device)[:, None, :],
                                       attention_mask, view, view.start, layers)
