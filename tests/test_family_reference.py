"""The offline reference of every family is itself checked against transformers' own one-shot forward.

For each family, on the processor's own inputs (its chat template, its video/image processor on
frames already at the stream's size, ``do_resize=False``): the token layout our grammar writes
equals the processor's (Qwen's layout: for Qwen3-VL on transformers 5.x after undoing its nesting,
``compat.unnest_qwen3_video``), the patches are the same, and the logits of transformers' forward
with its own positions equal our offline path's. Videos here are short enough (temporal extent
within the spatial one) that transformers' ``get_rope_index`` agrees with Qwen's reference on
every tested version; longer videos are where they part, checked in ``test_positions_and_frames``.
CI runs this on transformers 4.57 and 5.24.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import compat
from model.offline import Image, Question, Video, build_inputs, native_logits
from model.prompt import token_ids
from model.testing import build_tiny_model

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
SIZE = {"qwen2_5_vl": (56, 84), "qwen2_vl": (56, 84), "qwen3_vl": (64, 96)}  # already at the stream's size
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return (request.param, *build_tiny_model(family=request.param))


def processor_inputs(proc, content, frames=None, fps=2.0, image=None):
    """The processor's own inputs for one user turn (chat template, do_resize=False), as a user would make them."""
    from transformers.video_utils import VideoMetadata

    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
    kw = dict(text=[text], return_tensors="pt", do_resize=False)
    if frames is not None:
        n = len(frames)
        kw.update(videos=[np.stack(frames)], do_sample_frames=False, fps=fps,
                  video_metadata=[VideoMetadata(total_num_frames=n, fps=fps, frames_indices=list(range(n)))])
    if image is not None:
        kw.update(images=[image])
    return proc(**kw)


def their_logits(model, proc, out, ids: list[int]) -> torch.Tensor:
    """transformers' one-shot forward on ``ids`` and the processor's pixels, with its own positions -> (V,).

    With a cache, as ``generate()`` runs it: without one, transformers 4.57's mask builder reads the
    text model's first position row as packed-sequence boundaries, and Qwen3-VL's first row (its
    temporal positions, constant inside a vision block) splits the transcript into blocks that do
    not see each other (logits off by ~5 on the tiny model; 5.x keeps a separate text row).
    """
    image_id, video_id = token_ids(proc.tokenizer, ["<|image_pad|>", "<|video_pad|>"])
    input_ids = torch.tensor([ids])
    kw = dict(input_ids=input_ids, use_cache=True)
    types = torch.zeros_like(input_ids)
    types[input_ids == image_id], types[input_ids == video_id] = 1, 2
    if "pixel_values_videos" in out:
        kw.update(pixel_values_videos=out["pixel_values_videos"], video_grid_thw=out["video_grid_thw"])
        if "second_per_grid_ts" in out:
            kw["second_per_grid_ts"] = out["second_per_grid_ts"]
    if "pixel_values" in out:
        kw.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    if "mm_token_type_ids" in out:  # 5.x: the processor's modality map, here for the (un-nested) ids
        kw["mm_token_type_ids"] = types
    model.model.rope_deltas = None
    with torch.no_grad():
        return model(**kw).logits[0, -1].float()


@pytest.mark.parametrize("n_frames", [4, 3], ids=["pairs", "odd-padded"])
def test_a_video_question_equals_transformers_on_the_processors_inputs(family, n_frames):
    name, model, proc = family
    h, w = SIZE[name]
    frames = list(np.random.default_rng(n_frames).integers(0, 256, (n_frames, h, w, 3), dtype=np.uint8))
    out = processor_inputs(proc, [{"type": "video"}, {"type": "text", "text": "What happened?"}], frames)
    vs, ve, image_id, video_id = token_ids(proc.tokenizer, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                            "<|video_pad|>"])
    theirs = compat.unnest_qwen3_video(out["input_ids"][0].tolist(), vs, ve, {image_id, video_id})
    ours = build_inputs(model, proc, [Video(frames, 2.0), Question("What happened?")])
    assert ours.input_ids[0].tolist() == theirs, "the transcript layout differs from the processor's"
    assert torch.equal(ours.pixel_values_videos, out["pixel_values_videos"].float())
    if name == "qwen3_vl":  # a block per frame pair, each behind its timestamp
        assert proc.tokenizer.decode(theirs).count("seconds>") == (n_frames + 1) // 2
    ref = their_logits(model, proc, out, theirs)
    assert (native_logits(model, ours)[0, -1] - ref).abs().max() <= TOL


def test_an_image_question_equals_transformers_on_the_processors_inputs(family):
    name, model, proc = family
    h, w = SIZE[name]
    image = np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = processor_inputs(proc, [{"type": "image"}, {"type": "text", "text": "What shape?"}], image=image)
    ours = build_inputs(model, proc, [Image(image), Question("What shape?")])
    assert ours.input_ids[0].tolist() == out["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, out["pixel_values"].float())
    ref = their_logits(model, proc, out, out["input_ids"][0].tolist())
    assert (native_logits(model, ours)[0, -1] - ref).abs().max() <= TOL


def test_unnesting_recognises_only_the_outer_pair():
    vs, ve, pad = 1, 2, 9
    nested = [5, vs, 7, 7, vs, pad, pad, ve, 7, vs, pad, ve, ve, 6]
    qwen = [5, 7, 7, vs, pad, pad, ve, 7, vs, pad, ve, 6]
    assert compat.unnest_qwen3_video(nested, vs, ve, {pad}) == qwen
    assert compat.unnest_qwen3_video(qwen, vs, ve, {pad}) == qwen  # Qwen's layout (4.57) is left alone
    assert compat.unnest_qwen3_video([5, vs, pad, ve, 6], vs, ve, {pad}) == [5, vs, pad, ve, 6]  # Qwen2.5 blocks too
