"""The one place that knows which transformers version is installed.

Every difference between the tested transformers releases (4.57.x .. 5.24.x) lives here:
the vision towers' return types, their precomputed layouts, the language model's cache keyword,
``cache_position``, the decoder layers' return type, where the processors keep their pixel
budgets, and how Qwen3-VL's processor lays out a video (5.x nests it, ``unnest_qwen3_video``).
The rest of the package calls these helpers and never branches on a version itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import transformers
from packaging.version import Version
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: F401  (re-exported)

TRANSFORMERS_VERSION = Version(transformers.__version__)
TESTED_RANGE = (Version("4.57.0"), Version("5.25.0"))  # [floor, ceiling)


def check_version() -> None:
    """Raise if transformers is outside the range this package is tested against."""
    lo, hi = TESTED_RANGE
    if not lo <= TRANSFORMERS_VERSION < hi:
        raise ImportError(
            f"transformers {TRANSFORMERS_VERSION} is outside the tested range [{lo}, {hi}); "
            f"install one with: pip install 'transformers>={lo},<{hi}'"
        )


# ---------------------------------------------------------------- model internals

def vision_tower(model) -> torch.nn.Module:
    """The vision transformer of any family (``model.model.visual`` since 4.52)."""
    return model.model.visual


def language_model(model) -> torch.nn.Module:
    """The decoder-only text model (``model.model.language_model`` since 4.52)."""
    return model.model.language_model


def vision_outputs(out) -> tuple[torch.Tensor, list]:
    """What a vision tower returned -> ((n, D) merged embeddings, [DeepStack features (n, D)]).

    4.57 returns the merged tensor (Qwen2-VL, Qwen2.5-VL) or a (merged, deepstack list) tuple
    (Qwen3-VL); 5.x returns ``BaseModelOutputWithPooling(pooler_output=merged)``, with
    ``deepstack_features`` for Qwen3-VL.
    """
    if torch.is_tensor(out):
        return out, []
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


def vision_static_kwargs(model, grid_thw: torch.Tensor, window: bool = False, interpolate: bool = False):
    """The vision tower's layout for one grid, precomputed, or None where unsupported.

    transformers >= 5.x (``transformers.vision_utils``) lets the vision forward take these as
    keyword arguments instead of computing them with host syncs (``.tolist()``/``.item()``),
    which is what makes the tower capturable in a CUDA graph. 4.57 has no such hook.
    ``window``: Qwen2.5-VL's window layout too; ``interpolate``: Qwen3-VL's position-grid
    interpolation indices and weights.
    """
    try:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids
    except ImportError:
        return None
    visual = vision_tower(model)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    static = {"position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size),
              "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    if window:
        from transformers.vision_utils import get_vision_window_index

        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        static.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                      max_window_seqlen=get_max_seqlen(cu_window_seqlens, visual.config))
    if interpolate:
        try:
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights
        except ImportError:
            return None
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        static.update(interp_indices=indices, interp_weights=weights)
    # some come back on the CPU; a host-to-device copy inside a graph capture is not allowed
    return {k: v.to(grid_thw.device) if torch.is_tensor(v) else v for k, v in static.items()}


def vision_varlen_supported(module_name: str) -> bool:
    """Whether a family's vision attention hands ``cu_seqlens`` to attention functions named "flash" (5.x);
    4.57 splits the segments itself."""
    import importlib

    return hasattr(importlib.import_module(module_name), "is_flash_attention_requested")


@lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes the keyword argument ``name``."""
    return name in _forward_params(type(module))


def logits_kwargs(model: torch.nn.Module, keep: int) -> dict:
    """Keyword arguments that make a full model's forward compute only the last ``keep`` logits (0: all).

    4.57's Qwen2-VL forward has no ``logits_to_keep`` (it returns every position's: the caller slices).
    """
    return {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}


def cache_kwargs(module: torch.nn.Module, cache, cache_len: int, n_new: int, device) -> dict:
    """Keyword arguments that hand ``cache`` to ``module.forward`` (a text model, the full model or a decoder layer).

    4.57 names it ``past_key_values`` and wants ``cache_position``; 5.x renamed it ``cache``
    (``past_key_values`` is a deprecated alias until 5.40) and dropped ``cache_position``.
    """
    params = _forward_params(type(module))
    kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(cache_len, cache_len + n_new, device=device)
    return kw


def run_decoder(lm: torch.nn.Module, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention_mask, cache,
                cache_len: int, layers: Optional[int] = None, deepstack: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text model ``lm`` as its own forward runs it: rotary embeddings once, the decoder layers, the final norm.

    inputs_embeds (1, n, D), positions (3, 1, n); ``attention_mask`` goes to every layer as given
    (a ``StreamMask`` or an additive tensor: no mask of transformers' own is built). ``layers``:
    the first ``layers`` only, hidden states returned un-normed (recall's probe). ``deepstack``
    (k, 1, n, D): added after layer i < k, as Qwen3-VL's text model adds its visual features
    (there at the visual rows only; here zero rows elsewhere add nothing). The layers take the
    cache as ``cache_kwargs`` names it and return a tensor (5.x) or a 1-tuple (4.57).
    """
    hidden = inputs_embeds
    rotary = lm.rotary_emb(hidden, positions)
    kwargs = cache_kwargs(lm.layers[0], cache, cache_len, inputs_embeds.shape[1], inputs_embeds.device)
    for i, layer in enumerate(lm.layers[:layers]):
        out = layer(hidden, attention_mask=attention_mask, position_ids=None, position_embeddings=rotary, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if deepstack is not None and i < deepstack.shape[0]:
            hidden = hidden + deepstack[i]
    return hidden if layers is not None else lm.norm(hidden)


def new_dynamic_cache(config):
    """transformers' own DynamicCache, for the offline reference path."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def register_sdpa_mask(name: str) -> None:
    """Let ordinary ``model(...)`` calls under attention implementation ``name`` build sdpa's masks.

    4.57 and 5.x both keep the mask builders in ``masking_utils.AttentionMaskInterface``.
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(name, sdpa_mask)


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers DynamicCache (``layers[i].keys`` in 4.56+ and 5.x)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- configs

def text_config(config):
    """The text sub-config (4.57 and 5.x both nest it)."""
    return config.text_config


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained`` keyword for the weights' dtype (``dtype`` from 4.56 on, the floor is 4.57)."""
    return {"dtype": dtype}


# ---------------------------------------------------------------- processors

@dataclass(frozen=True)
class PixelConfig:
    """What frame preprocessing needs from a Qwen2.5-VL image or video processor."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def pixel_config(proc) -> PixelConfig:
    """Read the pixel budget and normalisation from an image or video processor.

    4.57 keeps ``min_pixels``/``max_pixels`` as attributes (and mirrors them in ``size``);
    5.x keeps only ``size={"shortest_edge": min, "longest_edge": max}``.
    """
    size = getattr(proc, "size", None) or {}
    min_px = size.get("shortest_edge", getattr(proc, "min_pixels", None))
    max_px = size.get("longest_edge", getattr(proc, "max_pixels", None))
    if min_px is None or max_px is None:
        raise ValueError(f"processor {type(proc).__name__} has no pixel budget (size={size!r})")
    return PixelConfig(
        patch_size=int(proc.patch_size),
        merge_size=int(proc.merge_size),
        temporal_patch_size=int(proc.temporal_patch_size),
        min_pixels=int(min_px),
        max_pixels=int(max_px),
        image_mean=tuple(float(x) for x in proc.image_mean),
        image_std=tuple(float(x) for x in proc.image_std),
    )


def video_processor(processor):
    """The processor's video processor (4.57 and 5.x both have ``video_processor``)."""
    vp = getattr(processor, "video_processor", None)
    return vp if vp is not None else processor.image_processor


# ---------------------------------------------------------------- processors' layouts

def unnest_qwen3_video(ids: list[int], vision_start: int, vision_end: int, pads: set[int]) -> list[int]:
    """transformers 5.x's Qwen3-VL processor layout -> Qwen's (the reference this package follows).

    Given the chat template's ``<|vision_start|><|video_pad|><|vision_end|>``, 5.x replaces only
    the pad with the per-pair blocks (``<t seconds><|vision_start|>...<|vision_end|>`` each), so they
    sit inside one more start/end pair; transformers 4.57's processor and qwen-vl-utils replace the
    whole triple. The outer pair is recognisable on either version: an outer start is followed by
    text, not a pad, and an outer end follows an end. Ids without it come back unchanged.
    """
    out = []
    for i, tok in enumerate(ids):
        if tok == vision_start and i + 1 < len(ids) and ids[i + 1] not in pads:
            continue
        if tok == vision_end and i > 0 and ids[i - 1] == vision_end:
            continue
        out.append(tok)
    return out
