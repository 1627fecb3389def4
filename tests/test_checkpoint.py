"""The real-checkpoint path: save a model + processor folder of each family, load it with from_pretrained, stream.

The family comes from the folder's ``config.json`` (``model_type``): a Qwen3-VL folder loads as
Qwen3-VL, never as a Qwen2.5-VL with fresh weights. An unsupported ``model_type``, or a folder
whose weights lack some of the model's (which transformers would initialise at random), is a
clear error.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import StreamQwenModel, VideoStreamInference
from model.testing import build_tiny_model, synthetic_frames

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


def saved(family: str, folder):
    model, proc = build_tiny_model(family=family)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, proc


@pytest.mark.slow  # writes and loads a checkpoint per family
@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_folder_of_each_family_loads_as_its_family_and_streams_exactly(family, tmp_path):
    model, proc = saved(family, tmp_path)
    loaded = VideoStreamInference.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)
    assert loaded.model.family is model.family and loaded.stats()["family"] == family
    assert loaded.model.dtype == torch.float32 and loaded.stats()["device"] == "cpu"
    assert type(loaded.processor).__name__ == type(proc).__name__
    frames = synthetic_frames(5, 90, 120)
    answers = []
    for engine in (VideoStreamInference(model, proc), loaded):
        engine.append_frames(frames, fps=2)
        answers.append((engine.ask("What?", max_new_tokens=4), engine.ask_choice("Which?", ["a", "b c"])))
    (a, ca), (b, cb) = answers
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5, rtol=0) and a.token_ids == b.token_ids
    assert ca.index == cb.index and torch.allclose(torch.tensor(ca.scores), torch.tensor(cb.scores), atol=1e-5, rtol=0)


def test_an_unsupported_model_type_is_a_clear_error(tmp_path):
    saved("qwen2_5_vl", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (VideoStreamInference.from_pretrained, StreamQwenModel.from_pretrained):
        with pytest.raises(ValueError, match="model_type 'llava' is not a supported.*qwen2_5_vl.*qwen3_vl"):
            load(str(tmp_path))


def test_weights_missing_from_a_folder_are_an_error_not_random_weights(tmp_path):
    """A checkpoint of another family under a Qwen3-VL config (or a truncated one) lacks weights transformers
    would initialise at random: refused, naming how many."""
    saved("qwen3_vl", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if "deepstack" in k]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks {len(dropped)} weight"):
        VideoStreamInference.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        VideoStreamInference.from_pretrained(str(tmp_path))
