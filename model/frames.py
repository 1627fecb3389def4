"""Frame preprocessing: validate, resize to the stream's fixed size, normalise, patchify.

Pure functions over tensors, so a chunk of frames is processed exactly like the same frames
inside a whole offline video (the processors' per-call pixel budget and fps guessing are
avoided; see DESIGN.md section 5, "Frames").

Same pixels as transformers (DESIGN.md invariant 7): the Qwen2-VL image and video processors
(4.57 and 5.x alike) resize an (N, 3, h, w) uint8 CPU tensor with torchvision's
``resize(..., BICUBIC, antialias=True)``, which on the CPU runs torch's native uint8 kernel
(rounding between its horizontal and vertical passes), then rescale and normalise in one fused
step ``(x - mean * 255) / (std * 255)`` in float32. We call the same function on the same
input, so the pixels are identical. On CUDA torchvision would take a float path with other
results, so frames are resized on the CPU (as the processors do by default) and only the
resized frame moves to ``device``.

Memory: ``to_frame_list`` validates without copying or widening (views where possible), and
``resize_frames`` resizes one frame at a time in uint8 before widening to float32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvF

from .compat import PixelConfig, smart_resize

RESCALE_FACTOR = 1 / 255  # the processors' rescale_factor (their configs store 0.00392156862745098)
RESAMPLE = tvF.InterpolationMode.BICUBIC  # Qwen2VLImageProcessor / Qwen2VLVideoProcessor ``resample``


# ---------------------------------------------------------------- validation (no copies, no widening)

def _is_pil(frame: Any) -> bool:
    return hasattr(frame, "mode") and hasattr(frame, "size") and not isinstance(frame, (np.ndarray, torch.Tensor))


def _as_tensor(frame: Any, where: str) -> torch.Tensor:
    """A PIL image, numpy array or tensor -> a tensor sharing its memory where torch allows it."""
    if _is_pil(frame):
        if frame.mode != "RGB":
            raise ValueError(f"{where}: PIL image mode is {frame.mode!r}; convert it with image.convert('RGB')")
        return torch.from_numpy(np.array(frame))  # one writable copy (PIL's own buffer is read-only)
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 and frame.dtype.kind != "f":
            raise TypeError(f"{where}: numpy dtype {frame.dtype} is not supported; use uint8 (0..255) or float (0..1)")
        if not frame.flags.writeable or any(s < 0 for s in frame.strides):
            frame = np.array(frame)  # torch cannot view read-only memory or negative strides
        return torch.from_numpy(frame)
    if isinstance(frame, torch.Tensor):
        return frame.detach()
    raise TypeError(f"{where}: expected a numpy array, PIL image or torch tensor, got {type(frame).__name__}")


def _channels_first(t: torch.Tensor, where: str) -> torch.Tensor:
    """(H, W, 3) or (3, H, W) -> a (3, H, W) view."""
    if t.ndim != 3:
        raise ValueError(
            f"{where}: expected an RGB image of shape (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}"
            + (" (grayscale? stack it to 3 channels)" if t.ndim == 2 else "")
        )
    if t.shape[-1] == 3:
        return t.permute(2, 0, 1)
    if t.shape[0] == 3:
        return t
    channels = t.shape[-1] if t.shape[-1] <= 4 else t.shape[0]
    raise ValueError(
        f"{where}: expected 3 RGB channels, got shape {tuple(t.shape)}"
        + (" (RGBA? drop the alpha channel)" if channels == 4 else "")
        + (" (grayscale? stack it to 3 channels)" if channels == 1 else "")
    )


def _check_values(t: torch.Tensor, where: str) -> None:
    """uint8 passes; float must be finite and in [0, 1] (checked by a reduction, without widening)."""
    if t.dtype == torch.uint8:
        return
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: dtype {t.dtype} is not supported; use uint8 (0..255) or float (0..1)")
    lo, hi = (float(v) for v in torch.aminmax(t))  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{where}: float frames must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")


def _one_frame(frame: Any, index: int) -> torch.Tensor:
    """Any supported frame -> (3, H, W) uint8 or float-in-[0, 1] tensor, a view where possible."""
    where = f"frame {index}"
    t = _channels_first(_as_tensor(frame, where), where)
    if t.shape[1] < 2 or t.shape[2] < 2:
        raise ValueError(f"{where}: image of {tuple(t.shape[1:])} pixels is too small")
    _check_values(t, where)
    return t


def to_frame_list(frames: Any) -> list[torch.Tensor]:
    """User input (one frame, a list of frames, or an (N, H, W, 3) array) -> list of (3, H, W).

    Each entry is the caller's uint8 or float data (a view where possible, never widened).
    """
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        frames = list(frames)
    elif isinstance(frames, (np.ndarray, torch.Tensor)) or _is_pil(frames):
        frames = [frames]
    elif isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise TypeError(f"frames must be a frame or a sequence of frames, got {type(frames).__name__}")
    if len(frames) == 0:
        raise ValueError("frames is empty: pass at least one frame")
    return [_one_frame(f, i) for i, f in enumerate(frames)]


# ---------------------------------------------------------------- size

def check_sizes(frames: Sequence[torch.Tensor], cfg: PixelConfig) -> None:
    """Refuse any (3, H, W) frame of a call below the processor's minimum or of aspect ratio over 200
    (``check_size``), every frame and not only a block's first: a later frame is resized to the
    block's size, and a sliver would be stretched into it."""
    for i, f in enumerate(frames):
        check_size(f.shape[1], f.shape[2], cfg, i)


def check_size(height: int, width: int, cfg: PixelConfig, index: int = 0) -> None:
    """Frames below the processor's minimum (a side under patch_size * merge_size, or fewer than
    min_pixels pixels) are refused: they would fix a stream's size to a few patches and
    squash every later frame into it. ``index`` names the frame in the message."""
    if min(height, width) < cfg.factor or height * width < cfg.min_pixels:
        side = max(cfg.factor, math.ceil(math.sqrt(cfg.min_pixels)))
        raise ValueError(
            f"frame {index}: {height}x{width} (HxW) is too small; the processor needs each side >= "
            f"{cfg.factor} px and at least min_pixels={cfg.min_pixels} pixels (e.g. {side}x{side})"
        )
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame {index}: aspect ratio of {height}x{width} exceeds 200")


def target_size(height: int, width: int, cfg: PixelConfig, index: int = 0) -> tuple[int, int]:
    """The (H, W) a frame of this size is resized to (Qwen's smart_resize); refused as ``check_size`` says."""
    check_size(height, width, cfg, index)
    return smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# ---------------------------------------------------------------- resize

def _to_uint8(frame: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 or float in [0, 1] -> (3, H, W) uint8; a float f/255 gives back exactly f."""
    if frame.dtype == torch.uint8:
        return frame
    x = frame if frame.dtype in (torch.float32, torch.float64) else frame.float()
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def _resize_uint8(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 on any device -> (3, H, W) uint8, the processors' resize (on the CPU)."""
    if tuple(frame.shape[1:]) == tuple(size):
        return frame  # torchvision returns the input unchanged at the same size
    # (1, 3, h, w) CPU; any memory layout gives the same pixels as the processors' contiguous batch
    # (torch's uint8 kernel works in channels-last; tests/test_frames.py checks both layouts)
    return tvF.resize(frame.cpu()[None], list(size), interpolation=RESAMPLE, antialias=True)[0]


def resize_frames(frames: Sequence[torch.Tensor], size: tuple[int, int], device=None) -> torch.Tensor:
    """List of (3, H_i, W_i) uint8 or float in [0, 1] -> (N, 3, H, W) float32 holding uint8 values 0..255.

    One frame at a time: convert to uint8, resize (CPU), then widen into the output on
    ``device`` (default: the first frame's device).
    """
    if len(frames) == 0:
        raise ValueError("resize_frames needs at least one frame")
    device = torch.device(device) if device is not None else frames[0].device
    out = torch.empty((len(frames), 3, *size), dtype=torch.float32, device=device)
    for i, f in enumerate(frames):
        out[i].copy_(_resize_uint8(_to_uint8(f), size))
    return out


# ---------------------------------------------------------------- patches

def patchify(frames: torch.Tensor, cfg: PixelConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(N, 3, H, W) in [0, 255], N a multiple of temporal_patch_size -> patches, grid.

    Returns the (grid_t*grid_h*grid_w, 3*T*p*p) normalised patches in the layout of
    Qwen2VLImageProcessor (merge windows contiguous) and the grid (grid_t, grid_h, grid_w).
    Normalises as the processors do (fused rescale: ``(x - mean/rescale) / (std/rescale)``).
    """
    n, c, h, w = frames.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    assert n % tp == 0 and h % (p * m) == 0 and w % (p * m) == 0, (n, h, w, tp, p, m)
    mean = torch.tensor(cfg.image_mean, device=frames.device) * (1.0 / RESCALE_FACTOR)
    std = torch.tensor(cfg.image_std, device=frames.device) * (1.0 / RESCALE_FACTOR)
    gt, gh, gw = n // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, c, tp, p, p), a view
    out = torch.empty(x.shape, dtype=torch.float32, device=frames.device)
    torch.sub(x, mean.view(c, 1, 1, 1), out=out).div_(std.view(c, 1, 1, 1))  # one copy, normalised on the way
    return out.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def pad_to_temporal_patch(frames: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """Repeat the last frame until N is a multiple of temporal_patch_size (as the processor pads)."""
    short = (-frames.shape[0]) % temporal_patch_size
    return torch.cat([frames, frames[-1:].expand(short, -1, -1, -1)]) if short else frames
