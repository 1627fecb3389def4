"""The position function follows Qwen's reference formula; frame patches match the real processor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import compat
from model.frames import pad_to_temporal_patch, patchify, resize_frames, to_frame_list
from model.families import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from model.positions import text_positions, vision_positions
from model.prompt import prompt_pieces
from model.testing import build_tiny_model
from model.transcript import Grammar, Text, positions

_, _PROC = build_tiny_model()
PIECES, TOKENIZER = prompt_pieces(_PROC), _PROC.tokenizer
VISION_CONFIG = type("VisionConfig", (), {"tokens_per_second": 2})()


def reference_video_positions(start, grid_t, h, w, fps, tps=2, tp=2):
    """Qwen's formula written out element by element (DESIGN.md section 3)."""
    spgt = torch.tensor(tp / fps, dtype=torch.float32)
    out = []
    for g in range(grid_t):
        t = int((torch.tensor(g) * spgt * tps).item())  # floor after the multiplication, in float32
        for r in range(h):
            for c in range(w):
                out.append((start + t, start + r, start + c))
    return torch.tensor(out).T


@pytest.mark.parametrize("fps", [1, 2, 4, 30, 29.97])
def test_vision_positions_follow_reference(fps):
    got = vision_positions(7, 40, 3, 5, second_per_grid_t=2 / fps, tokens_per_second=2)
    assert torch.equal(got, reference_video_positions(7, 40, 3, 5, fps))


def test_chunked_blocks_continue_the_temporal_index():
    whole = vision_positions(3, 9, 2, 2, second_per_grid_t=2 / 30, tokens_per_second=2)
    parts = torch.cat([vision_positions(3, n, 2, 2, t_offset=o, second_per_grid_t=2 / 30, tokens_per_second=2)
                       for o, n in [(0, 2), (2, 3), (5, 1), (6, 3)]], dim=1)
    assert torch.equal(whole, parts)


def test_high_fps_is_not_truncated():
    """transformers 4.52-5.17 truncated second_per_grid_t to an int: every t collapsed to 0 above 2 fps."""
    t = vision_positions(0, 16, 1, 1, second_per_grid_t=2 / 30, tokens_per_second=2)[0]
    assert t.tolist() == [math.floor(g * (2 / 30) * 2 + 1e-9) for g in range(16)] and t.max() == 2


def _video_then_text(family, grids: int, h: int, w: int, spgt: float = 1.0):
    """Positions of two text tokens, a video of ``grids`` pairs of h x w merged tokens (as one block), two more."""
    grammar = Grammar(family, PIECES, TOKENIZER, VISION_CONFIG)
    pieces = [Text((1, 2)), *grammar.open_video()]
    start = positions(pieces, 0)[1]
    times = [i * spgt for i in range(grids)]
    pieces += list(grammar.pairs((2 * h, 2 * w), 2, times, start, 0, spgt).pieces) + list(grammar.close_video())
    pieces.append(Text((3, 4)))
    return positions(pieces, 0)[0], start


def test_qwen2_5_text_after_a_long_video_starts_after_its_max_temporal_position():
    """transformers >= 5.3 uses s + max(h, w) here; the reference uses max over t, h, w."""
    pos, s = _video_then_text(QWEN2_5_VL, 20, 2, 2, spgt=2.0)  # 1 fps: t = 4g
    video_t_max = s + 19 * 4
    assert pos[:, -2].tolist() == [video_t_max + 2] * 3  # after the block's end marker
    assert torch.equal(pos[:, :2], text_positions(0, 2))


def test_qwen2_temporal_position_is_the_pair_index_and_text_follows_its_max():
    """transformers 5.x puts the token after a 20-pair Qwen2-VL video at s + max(h, w) (5 here); Qwen's rule: 23."""
    pos, s = _video_then_text(QWEN2_VL, 20, 2, 2, spgt=0.5)  # any fps: t = g
    video = pos[:, 3:3 + 20 * 4]
    assert video[0].tolist() == [s + g for g in range(20) for _ in range(4)]
    assert pos[:, -3].tolist() == [s + 20] * 3 and pos[:, -2].tolist() == [s + 21] * 3


def test_qwen3_pair_blocks_sit_at_their_start_and_text_follows_at_start_plus_max_hw():
    grammar = Grammar(QWEN3_VL, PIECES, TOKENIZER, VISION_CONFIG)
    seg = grammar.pairs((4, 6), 2, [0.0], 10, 0, 1.0)
    got, nxt = positions(seg.pieces, 10)
    stamp = seg.pieces[0].n
    s = 10 + stamp  # the pair's block starts after its timestamp and start marker
    vision = got[:, stamp:stamp + 6]
    assert vision[0].tolist() == [s] * 6 and vision[1].tolist() == [s, s, s, s + 1, s + 1, s + 1]
    assert vision[2].tolist() == [s, s + 1, s + 2] * 2
    assert got[:, -1].tolist() == [s + 3] * 3 and nxt == s + 4  # the end marker at s + max(h', w')


def test_image_block_positions_have_t_zero():
    grammar = Grammar(QWEN2_5_VL, PIECES, TOKENIZER, VISION_CONFIG)
    seg = grammar.image((4, 6), 2)
    pos = positions(seg.pieces, 0)[0][:, 1:-1]  # inside the start and end markers
    assert pos[0].tolist() == [1] * 6 and pos[1].tolist() == [1, 1, 1, 2, 2, 2] and pos[2].tolist() == [1, 2, 3] * 2


@pytest.mark.parametrize("n_frames", [4, 3], ids=["even", "odd-padded"])
def test_patchify_matches_transformers_video_processor(tiny, n_frames):
    """Our patches (and odd-frame padding) equal the real Qwen2VL video processor's on frames at the target size."""
    _, proc = tiny
    vp = compat.video_processor(proc)
    pix = compat.pixel_config(vp)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(n_frames)]
    resized = pad_to_temporal_patch(resize_frames(to_frame_list(frames), (84, 112)), pix.temporal_patch_size)
    ours, grid = patchify(resized, pix)
    theirs = vp(videos=[np.stack(frames)], return_tensors="pt", do_resize=False)
    assert tuple(theirs["video_grid_thw"][0].tolist()) == grid
    assert torch.allclose(ours, theirs["pixel_values_videos"].float(), atol=1e-5), (ours - theirs["pixel_values_videos"]).abs().max()


def test_synthetic_video_file_round_trip(tmp_path):
    """write_synthetic_video writes an mp4 that read_video reads back (frames, fps, size)."""
    from model.testing import write_synthetic_video
    from model.video_io import read_video

    path = write_synthetic_video(tmp_path / "clip.mp4", seconds=1.0, fps=10, height=112, width=140)
    frames, fps = read_video(path)
    assert fps == 10 and len(frames) == 10 and frames[0].shape == (112, 140, 3) and frames[0].dtype == np.uint8
    assert len(read_video(path, seconds=0.5)[0]) == 5
    with pytest.raises(ValueError, match="Cannot open video"):
        read_video(tmp_path / "missing.mp4")
