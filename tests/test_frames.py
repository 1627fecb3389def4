"""model/frames.py: the same pixels as transformers' Qwen2-VL processors, bounded memory, degenerate frames.

The processors are the references (DESIGN.md invariant 7): every comparison here is exact
(torch.equal), on whichever transformers version is installed (CI runs 4.57.x and 5.x).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import compat
from model.frames import pad_to_temporal_patch, patchify, resize_frames, target_size, to_frame_list
from model.testing import build_3b_processor, load_processor, synthetic_frames, write_processor_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES_WH = [(720, 528), (768, 576), (640, 480), (320, 240)]  # real frame sizes (width x height)


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    return {"tiny": load_processor(write_processor_files(tmp_path_factory.mktemp("tiny"))),
            "3b": build_3b_processor(tmp_path_factory.mktemp("3b"))}


def video_call(vp, frames: list[np.ndarray], **kw):
    """The video processor on one video, without the per-call pixel cap (5.x; 4.57 has none)."""
    if hasattr(type(vp), "cap_pixels_per_frame"):
        kw["cap_pixels_per_frame"] = False
    return vp(videos=[np.stack(frames)], return_tensors="pt", **kw)


def ours(frames, size, pix) -> tuple[torch.Tensor, tuple]:
    return patchify(pad_to_temporal_patch(resize_frames(to_frame_list(frames), size), pix.temporal_patch_size), pix)


def make_frames(content: str, n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    if content == "synthetic":
        return synthetic_frames(n, h, w, seed=seed)
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def processor_resize(vp, video: torch.Tensor, size) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, H, W) uint8 by the processor's own resize at a forced size."""
    from transformers.image_utils import SizeDict

    base = super(type(vp), vp).resize  # the backend's resize, below Qwen's smart_resize wrapper
    params = inspect.signature(base).parameters
    if "resample" in params:  # 5.x
        kw = {"resample": vp.resample}
    else:  # 4.57 takes a torchvision interpolation mode
        from transformers.image_utils import pil_torch_interpolation_mapping
        kw = {"interpolation": pil_torch_interpolation_mapping[vp.resample]}
    return base(video, size=SizeDict(height=size[0], width=size[1]), **kw)


# ---------------------------------------------------------------- same pixels as transformers

@pytest.mark.parametrize("content", ["random", "synthetic"])
@pytest.mark.parametrize("wh", SIZES_WH, ids=[f"{w}x{h}" for w, h in SIZES_WH])
@pytest.mark.parametrize("budget", ["tiny", "3b"])
def test_resized_frames_equal_video_processor(procs, budget, wh, content):
    """3 frames (odd: the processor pads) resized by the processor itself == ours at its size."""
    vp = compat.video_processor(procs[budget])
    pix = compat.pixel_config(vp)
    w, h = wh
    frames = make_frames(content, 3, h, w)
    theirs = video_call(vp, frames)
    gt, gh, gw = theirs["video_grid_thw"][0].tolist()
    size = (gh * pix.patch_size, gw * pix.patch_size)
    assert size != (h, w), "these frames must need resizing"
    if h * w >= pix.min_pixels:  # the stream's size comes from target_size
        assert target_size(h, w, pix) == size
    got, grid = ours(frames, size, pix)
    assert grid == (gt, gh, gw) == (2, gh, gw)
    assert got.dtype == torch.float32 and torch.equal(got, theirs["pixel_values_videos"])


@pytest.mark.parametrize("wh", SIZES_WH[:3] + [(320, 240), (90, 120)], ids=["720x528", "768x576", "640x480", "320x240", "90x120"])
def test_frames_resized_to_the_stream_size_equal_processor_resize(procs, wh):
    """Later frames of another size go to the stream's size: same as the processor's resize to that size."""
    vp = compat.video_processor(procs["3b"])
    pix = compat.pixel_config(vp)
    stream = target_size(480, 640, pix)  # the stream was opened by a 640x480 frame
    w, h = wh
    frames = make_frames("synthetic", 3, h, w, seed=4)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # the processor's layout
    resized = processor_resize(vp, video, stream)
    mine = resize_frames(to_frame_list(frames), stream)
    assert resized.dtype == torch.uint8 and torch.equal(mine, resized.float())
    theirs = video_call(vp, list(resized.permute(0, 2, 3, 1).numpy()), do_resize=False)
    assert torch.equal(patchify(pad_to_temporal_patch(mine, 2), pix)[0], theirs["pixel_values_videos"])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_frame_counts_padded_as_the_processor_pads(procs, n):
    vp = compat.video_processor(procs["tiny"])
    pix = compat.pixel_config(vp)
    frames = make_frames("random", n, 130, 170, seed=n)
    theirs = video_call(vp, frames)
    got, grid = ours(frames, target_size(130, 170, pix), pix)
    assert list(grid) == theirs["video_grid_thw"][0].tolist() and grid[0] == (n + 1) // 2
    assert torch.equal(got, theirs["pixel_values_videos"])


@pytest.mark.parametrize("budget", ["tiny", "3b"])
@pytest.mark.parametrize("wh", [(640, 480), (500, 700)], ids=["640x480", "500x700"])
def test_still_image_equals_image_processor(procs, budget, wh):
    ip = procs[budget].image_processor
    pix = compat.pixel_config(ip)
    w, h = wh
    img = make_frames("synthetic", 1, h, w, seed=2)[0]
    theirs = ip(images=[img], return_tensors="pt")
    size = target_size(h, w, pix)
    assert size != (h, w)
    got, grid = ours(img, size, pix)
    assert list(grid) == theirs["image_grid_thw"][0].tolist()
    assert torch.equal(got, theirs["pixel_values"])


# ---------------------------------------------------------------- input types

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("size", [(168, 252), (480, 640)], ids=["resized", "same-size"])
def test_float_frames_give_the_uint8_pixels(dtype, size):
    f = make_frames("random", 2, 480, 640, seed=3)
    as_float = [(torch.from_numpy(x).to(torch.float64) / 255).to(dtype) for x in f]
    assert torch.equal(resize_frames(to_frame_list(as_float), size), resize_frames(to_frame_list(f), size))


def test_frame_layouts_and_types_give_the_same_pixels():
    """HWC numpy (a channels-last view), CHW contiguous tensor, PIL, BGR-flipped view: one result."""
    f = make_frames("synthetic", 1, 480, 640, seed=5)[0]
    bgr = np.ascontiguousarray(f[:, :, ::-1])
    variants = [f, torch.from_numpy(f).permute(2, 0, 1).contiguous(), Image.fromarray(f), bgr[:, :, ::-1]]
    outs = [resize_frames(to_frame_list(v), (168, 252)) for v in variants]
    for o in outs[1:]:
        assert torch.equal(outs[0], o)


def test_to_frame_list_keeps_views_and_dtypes():
    video = np.zeros((4, 60, 80, 3), np.uint8)
    floats = torch.rand(2, 60, 80, 3, dtype=torch.float64)
    got = to_frame_list(video)
    assert [t.shape for t in got] == [(3, 60, 80)] * 4 and all(t.dtype == torch.uint8 for t in got)
    assert [t.data_ptr() for t in got] == [video[i].ctypes.data for i in range(4)]  # views, no copies
    got = to_frame_list(floats)
    assert all(t.dtype == torch.float64 for t in got) and got[1].data_ptr() == floats[1].data_ptr()


def test_resize_frames_on_a_device_argument():
    f = make_frames("random", 3, 100, 140)
    out = resize_frames(to_frame_list(f), (84, 112), device="cpu")
    assert out.shape == (3, 3, 84, 112) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert float(out.min()) >= 0 and float(out.max()) <= 255 and torch.equal(out, out.round())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_frames_and_device_give_the_cpu_pixels():
    f = make_frames("synthetic", 3, 480, 640, seed=6)
    cpu = resize_frames(to_frame_list(f), (168, 252))
    cuda_in = [torch.from_numpy(x).cuda() for x in f] + [torch.from_numpy(f[0]).cuda().float() / 255]
    assert torch.equal(resize_frames(to_frame_list(f), (168, 252), device="cuda").cpu(), cpu)
    out = resize_frames(to_frame_list(cuda_in), (168, 252))
    assert out.device.type == "cuda" and torch.equal(out[:3].cpu(), cpu) and torch.equal(out[3].cpu(), cpu[0])


# ---------------------------------------------------------------- degenerate frames

@pytest.mark.parametrize("hw", [(2, 2), (27, 300), (300, 20), (40, 60)])
def test_frames_below_the_processor_minimum_are_refused(procs, hw):
    pix = compat.pixel_config(compat.video_processor(procs["tiny"]))  # factor 28, min_pixels 3136
    h, w = hw
    with pytest.raises(ValueError, match=rf"frame 3: {h}x{w} .*too small.*>= 28 px.*min_pixels=3136"):
        target_size(h, w, pix, index=3)


def test_frames_at_the_minimum_are_accepted(procs):
    pix = compat.pixel_config(compat.video_processor(procs["tiny"]))
    assert target_size(28, 112, pix) == (28, 112) and target_size(56, 56, pix) == (56, 56)


# ---------------------------------------------------------------- memory

MEASURE = """
import gc, json, os, resource, sys
import numpy as np
from model.compat import PixelConfig
from model.frames import pad_to_temporal_patch, patchify, resize_frames, target_size, to_frame_list
pix = PixelConfig(**json.loads(sys.argv[1]))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def run(frames):
    size = target_size(frames.shape[1], frames.shape[2], pix)
    return patchify(pad_to_temporal_patch(resize_frames(to_frame_list(frames), size), 2), pix)
run(np.zeros((2, 480, 640, 3), np.uint8))  # warm-up: lazy imports, kernels, thread pools
for n, h, w in json.loads(sys.argv[2]):
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = (40 + 10 * i) % 256  # touch every page: the inputs are in memory before the call
    # an earlier peak (imports, warm-up, the last case) would hide this call's: hold ballast above it
    ballast = np.ones(max(0, maxrss() - rss()) + 2 ** 24, np.uint8)
    rss_before, max_before = rss(), maxrss()
    patches, grid = run(frames)
    peak = maxrss()
    print(json.dumps({"case": [n, h, w], "before": rss_before, "max_before": max_before, "peak": peak, "grid": grid}))
    del frames, patches, ballast
    gc.collect()
"""

# (frames, height, width) -> limit in MiB; the first case used to take ~2.2 GB (full-size float32)
MEMORY_CASES = {(200, 480, 640): 512, (16, 3000, 4000): 1024}


@pytest.mark.slow
def test_peak_memory_of_one_call(procs):
    """RSS peak (ru_maxrss) over the RSS before each call, in a fresh process, inputs already in memory."""
    pix = compat.pixel_config(compat.video_processor(procs["tiny"]))
    args = [json.dumps(pix.__dict__), json.dumps(list(MEMORY_CASES))]
    res = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
    results = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(MEMORY_CASES)
    mib = 2 ** 20
    for m in results:
        n, h, w = m["case"]
        # ru_maxrss never falls: the peak is the call's own if nothing before it went much higher
        assert m["max_before"] - m["before"] < 64 * mib, m
        assert m["grid"][0] == (n + 1) // 2
        delta = (m["peak"] - m["before"]) / mib
        limit = MEMORY_CASES[(n, h, w)]
        assert delta < limit, f"{n}x{h}x{w}: peak {delta:.0f} MiB over the memory held before the call (limit {limit})"
