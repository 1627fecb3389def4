"""StreamQwenModel: a Qwen-VL model of any supported family that runs one segment at a time into a cache it is handed.

The model is stateless: it holds weights, never a stream. ``StreamQwenModel`` is a mixin over
the family's transformers class (``StreamQwenModel.for_family``; ``StreamQwenModel(config)``
and ``from_pretrained`` pick the family from the config's ``model_type``). A segment is text
token ids or embeddings (vision rows already in place); its M-RoPE positions come from
``transcript.positions`` and are passed explicitly, so transformers' cached ``rope_deltas`` and
its own ``get_rope_index`` are never used. Where a segment's K/V go is given by the
``CacheView`` the caller passes (``kv_cache.py``). ``forward_segment`` is the one forward, used
eagerly and inside CUDA graphs alike. Any number of streams share one model.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Literal, Optional, Union

import torch

from . import compat, fast_attention
from .families import Family, VisionOut, family_of
from .kv_cache import CacheView
from .masks import StreamMask


class StreamQwenModel:
    """A family's ``...ForConditionalGeneration`` plus segment-wise forwards into an explicit cache (a mixin:
    instances are of ``StreamQwenModel.for_family(family)``)."""

    family: Family

    def __new__(cls, *args, **kwargs):
        if cls is StreamQwenModel:  # StreamQwenModel(config): the class of the config's family
            config = args[0] if args else kwargs.get("config")
            cls = StreamQwenModel.for_family(family_of(getattr(config, "model_type", None)))
        return object.__new__(cls)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # Overridden: on sdpa, attention dispatches per call (fast_attention.py); set once, before any stream exists.
        self.stream_kernels = fast_attention.install(self.config)

    @staticmethod
    @lru_cache(maxsize=None)
    def for_family(family: Family) -> type:
        """The stream model class of ``family``: this mixin over the family's transformers class."""
        base = family.model_class()
        klass = type(f"Stream{base.__name__}", (StreamQwenModel, base), {"family": family, "__module__": __name__})
        globals()[klass.__name__] = klass  # importable by name: pickle and copy find it
        return klass

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Load a local checkpoint folder as the family its ``config.json`` names; an unsupported ``model_type``
        or weights the checkpoint lacks (which transformers would initialise at random) are errors."""
        if cls is StreamQwenModel:
            return StreamQwenModel.for_family(checkpoint_family(path)).from_pretrained(path, *args, **kwargs)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weight(s) of a {cls.family.model_type} "
                             f"model (e.g. {missing[:3]}); they would be newly initialised (random): is the folder "
                             "complete and of this family?")
        return model

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
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], varlen: bool = False,
                      **static) -> VisionOut:
        """(P, C*T*p*p) patches of one grid -> ``VisionOut``: (P / merge^2, D) embeddings in (t, row, col) order
        (and DeepStack features where the family has them)."""
        grid = torch.tensor([grid_thw], dtype=torch.long, device=pixel_values.device)
        return self.family.encode_vision(self, pixel_values, grid, varlen=varlen, **static)

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
        logits: Union[Literal["none", "last", "all"], torch.Tensor] = "last",
        deepstack: Optional[torch.Tensor] = None,
        layers: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Write one segment's K/V through ``view``; the one forward of eager and captured segments alike.

        inputs_embeds: (1, n, D); positions: (3, n) M-RoPE positions; attention_mask: an additive
        (1, 1, n, keys) tensor or a ``StreamMask``; deepstack: (k, 1, n, D) added to the hidden
        states after layer i < k (zero rows where no vision token is). ``logits``: "none", "last",
        "all", or a (1,) device index of the row to return (a graph's last real row) -> (1, n|1, V)
        float32. ``layers``: only the first ``layers`` decoder layers run (recall's probe; returns
        their un-normed hidden states, logits none).
        """
        lm = compat.language_model(self)
        hidden = compat.run_decoder(lm, inputs_embeds, positions.to(inputs_embeds.device)[:, None, :], attention_mask,
                                    view, view.start, layers=layers, deepstack=deepstack)
        if layers is not None or (isinstance(logits, str) and logits == "none"):
            return None if layers is None else hidden
        if torch.is_tensor(logits):
            hidden = hidden.index_select(1, logits)
        elif logits == "last":
            hidden = hidden[:, -1:]
        return self.lm_head(hidden).float()


def checkpoint_family(path) -> Family:
    """The family a checkpoint folder's ``config.json`` names (``model_type``)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"Model not found: {path!r} is not a folder; set QWEN_MODEL_PATH to a local Qwen-VL "
                         "checkpoint folder")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{path}: no config.json: not a transformers checkpoint folder")
    with open(config) as f:
        return family_of(json.load(f).get("model_type"))


def __getattr__(name: str):
    """``model.stream_qwen_model.Stream<transformers class>``: made on first use (unpickling in a new process)."""
    from .families import FAMILIES

    for family in FAMILIES:
        if name == f"Stream{family.hf_class}":
            return StreamQwenModel.for_family(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
