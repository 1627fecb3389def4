"""Loading an engine the way every entry point does: a checkpoint, or random weights said loudly.

``--model`` (or ``$QWEN_MODEL_PATH``) names a local checkpoint folder of any supported family
(its ``config.json`` says which); a path that does not exist is an error naming it, never a
silent fallback. With neither, random weights: a real architecture on a GPU (Qwen2.5-VL-3B by
default, ``$QWEN_RANDOM_ARCH`` another: timings are real, answers are not), a family's tiny
model on CPU. Used by the step scripts (``report.py``), the CLI, the benchmark runner and the
server. ``model.testing`` (the fixtures) is imported only on that random-weights path.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(path, device: Optional[str] = None, dtype=None, attn_implementation: str = "sdpa"):
    """(StreamQwenModel, processor) from a local checkpoint folder of any supported family (weights, config,
    processor files); the family comes from its ``config.json``.

    Defaults: CUDA if available (bf16) else CPU (fp32). A path that is not a folder, a ``model_type``
    of no supported family and missing weights are errors naming them.
    """
    from transformers import AutoProcessor

    from . import compat
    from .stream_qwen_model import StreamQwenModel, checkpoint_family

    checkpoint_family(path)  # a clear error before anything loads
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = StreamQwenModel.from_pretrained(path, attn_implementation=attn_implementation,
                                            **compat.dtype_kwarg(dtype)).to(device)
    return model, AutoProcessor.from_pretrained(path)


def load_engine(model_path: Optional[str] = None, dtype: Optional[str] = None, device: Optional[str] = None,
                attn_implementation: str = "sdpa", out: Optional[TextIO] = None, config=None,
                arch: Optional[str] = None):
    """(engine, description). ``dtype``: a name in ``DTYPES`` (default bf16 on a GPU, fp32 on CPU).
    ``config``: the engine's ``StreamConfig`` (default settings if None).

    Without a checkpoint: random weights of ``arch`` (or ``$QWEN_RANDOM_ARCH``): on a GPU a real
    architecture (``testing.REAL_CONFIGS``: "qwen2_5_vl-3b", the default, "qwen2_vl-2b",
    "qwen3_vl-2b", "qwen3_vl-4b", "qwen3_vl-8b"), on CPU a family's tiny model (the family part of
    the name: "qwen3_vl"). ``out``: where the random-weights banner goes (default: standard error).
    """
    from . import VideoStreamInference
    from .timing import set_exact_fp32

    path = model_path or os.environ.get("QWEN_MODEL_PATH")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no GPU")
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if cuda else torch.float32)
    if torch_dtype == torch.float32:
        set_exact_fp32()  # no TF32: the setting in which streamed and offline answers must agree
    if path:
        where = "--model" if model_path else "QWEN_MODEL_PATH"
        if not os.path.isdir(path):
            raise ValueError(f"Model not found: {path!r} (from {where}) is not a folder; "
                             "pass a local Qwen-VL checkpoint folder (Qwen2-VL, Qwen2.5-VL or Qwen3-VL)")
        engine = VideoStreamInference.from_pretrained(path, device="cuda" if cuda else "cpu", dtype=torch_dtype,
                                                      attn_implementation=attn_implementation, config=config)
        return engine, f"checkpoint {path}"
    from .testing import REAL_CONFIGS, TINY_CONFIGS, build_processor, build_random_model, build_tiny_model

    arch = arch or os.environ.get("QWEN_RANDOM_ARCH") or "qwen2_5_vl-3b"
    family = arch.split("-")[0]
    if arch not in REAL_CONFIGS or family not in TINY_CONFIGS:
        raise ValueError(f"random-weight architecture {arch!r} is not one of {sorted(REAL_CONFIGS)}")
    what = f"{arch} architecture" if cuda else f"tiny {family} model (CPU)"
    print("!" * 78 + f"\n! No model given (--model / QWEN_MODEL_PATH): RANDOM WEIGHTS ({what}).\n"
          "! Answers are meaningless; timings are real on a GPU.\n" + "!" * 78, file=out or sys.stderr)
    if cuda:
        model = build_random_model(REAL_CONFIGS[arch], dtype=torch_dtype, device="cuda",
                                   attn_implementation=attn_implementation)
        return VideoStreamInference(model, build_processor(family), config=config), f"random-weight {what}"
    model, processor = build_tiny_model(attn_implementation=attn_implementation, family=family)
    return VideoStreamInference(model.to(torch_dtype), processor, config=config), f"random-weight {what}"
