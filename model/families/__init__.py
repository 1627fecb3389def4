"""Model families: what differs between Qwen-VL generations, one module each.

Adding a family: a module here with a ``Family`` subclass (its transformers class, ``model_type``,
temporal rule, transcript layout, vision outputs, frame sizing), its entry in ``FAMILIES``, tiny
and real configs in ``model/testing.py``, and its tests (the exactness and reference checks
are parametrized over ``FAMILIES``).
"""
from __future__ import annotations

from .base import Family, VisionOut
from .qwen2_5_vl import QWEN2_5_VL
from .qwen2_vl import QWEN2_VL
from .qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

FAMILIES: tuple[Family, ...] = (QWEN2_5_VL, QWEN2_VL, QWEN3_VL, QWEN3_VL_MOE)
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def supported() -> str:
    return ", ".join(sorted(BY_MODEL_TYPE))


def family_of(model_type) -> Family:
    """The family of a checkpoint's ``config.json`` ``model_type``; a clear error for any other."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model_type {model_type!r} is not a supported Qwen-VL family; supported: {supported()}")
    return BY_MODEL_TYPE[model_type]


__all__ = ["Family", "VisionOut", "FAMILIES", "family_of", "supported", "QWEN2_VL", "QWEN2_5_VL", "QWEN3_VL",
           "QWEN3_VL_MOE"]
