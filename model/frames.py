"""Frame preprocessing: validate, resize to the stream's fixed size, normalise, patchify.

Pure functions over tensors, so a chunk of frames is processed exactly like the same frames
inside a whole offline video (the processors' per-call pixel budget and fps guessing are
avoided; see DESIGN.md section 4, "Processor traps"). Works on CPU or GPU tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .compat import PixelConfig, smart_resize


def _one_frame(frame: Any, index: int) -> torch.Tensor:
    """Any supported frame -> (3, H, W) float32 tensor with values in [0, 255]."""
    where = f"frame {index}"
    if hasattr(frame, "mode") and hasattr(frame, "size") and not isinstance(frame, (np.ndarray, torch.Tensor)):
        if frame.mode != "RGB":
            raise ValueError(f"{where}: PIL image mode is {frame.mode!r}; convert it with image.convert('RGB')")
        frame = np.asarray(frame)
    if isinstance(frame, np.ndarray):
        if frame.dtype == object:
            raise TypeError(f"{where}: numpy array of dtype object is not an image")
        frame = np.ascontiguousarray(frame)
        t = torch.from_numpy(frame if frame.flags.writeable else frame.copy())
    elif isinstance(frame, torch.Tensor):
        t = frame.detach()
    else:
        raise TypeError(
            f"{where}: expected a numpy array, PIL image or torch tensor, got {type(frame).__name__}"
        )
    if t.ndim != 3:
        raise ValueError(
            f"{where}: expected an RGB image of shape (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}"
            + (" (grayscale? stack it to 3 channels)" if t.ndim == 2 else "")
        )
    if t.shape[-1] == 3:
        t = t.permute(2, 0, 1)
    elif t.shape[0] != 3:
        channels = t.shape[-1] if t.shape[-1] <= 4 else t.shape[0]
        raise ValueError(
            f"{where}: expected 3 RGB channels, got shape {tuple(frame.shape)}"
            + (" (RGBA? drop the alpha channel)" if channels == 4 else "")
            + (" (grayscale? stack it to 3 channels)" if channels == 1 else "")
        )
    if t.shape[1] < 2 or t.shape[2] < 2:
        raise ValueError(f"{where}: image of {tuple(t.shape[1:])} pixels is too small")
    if t.dtype == torch.uint8:
        return t.float()
    if t.dtype.is_floating_point:
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: contains NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float frames must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        return t * 255.0
    raise TypeError(f"{where}: dtype {t.dtype} is not supported; use uint8 (0..255) or float (0..1)")


def to_frame_list(frames: Any) -> list[torch.Tensor]:
    """User input (one frame, a list of frames, or an (N, H, W, 3) array) -> list of (3, H, W)."""
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        frames = list(frames)
    elif isinstance(frames, (np.ndarray, torch.Tensor)) or hasattr(frames, "mode"):
        frames = [frames]
    elif isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise TypeError(f"frames must be a frame or a sequence of frames, got {type(frames).__name__}")
    if len(frames) == 0:
        raise ValueError("frames is empty: pass at least one frame")
    return [_one_frame(f, i) for i, f in enumerate(frames)]


def target_size(height: int, width: int, cfg: PixelConfig) -> tuple[int, int]:
    """The (H, W) a frame of this size is resized to (Qwen's smart_resize)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    return smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


def resize_frames(frames: Sequence[torch.Tensor], size: tuple[int, int], device=None) -> torch.Tensor:
    """List of (3, H_i, W_i) in [0, 255] -> (N, 3, H, W) float32 in [0, 255], rounded like uint8."""
    out = []
    for f in frames:
        f = f.to(device) if device is not None else f
        if tuple(f.shape[1:]) != tuple(size):
            f = F.interpolate(f[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            f = f.clamp_(0, 255).round_()
        out.append(f)
    return torch.stack(out)


def patchify(frames: torch.Tensor, cfg: PixelConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(N, 3, H, W) in [0, 255], N a multiple of temporal_patch_size -> patches, grid.

    Returns the (grid_t*grid_h*grid_w, 3*T*p*p) normalised patches in the layout of
    Qwen2VLImageProcessor (merge windows contiguous) and the grid (grid_t, grid_h, grid_w).
    """
    n, c, h, w = frames.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    assert n % tp == 0 and h % (p * m) == 0 and w % (p * m) == 0, (n, h, w, tp, p, m)
    mean = torch.tensor(cfg.image_mean, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, device=frames.device).view(1, 3, 1, 1)
    x = (frames / 255.0 - mean) / std
    gt, gh, gw = n // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def pad_to_temporal_patch(frames: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """Repeat the last frame until N is a multiple of temporal_patch_size (as the processor pads)."""
    short = (-frames.shape[0]) % temporal_patch_size
    return torch.cat([frames, frames[-1:].expand(short, -1, -1, -1)]) if short else frames
