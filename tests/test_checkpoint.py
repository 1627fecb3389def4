"""The real-checkpoint path: save a model + processor folder, load it with from_pretrained, stream."""
from __future__ import annotations

import torch

from model import VideoStreamInference
from model.testing import synthetic_frames


def test_from_pretrained_round_trip(tiny, tmp_path):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = VideoStreamInference.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)
    assert loaded.model.dtype == torch.float32 and loaded.stats()["device"] == "cpu"
    frames = synthetic_frames(5, 90, 120)
    answers = []
    for engine in (VideoStreamInference(model, proc), loaded):
        engine.append_frames(frames, fps=2)
        answers.append(engine.ask("What?", max_new_tokens=4))
    assert torch.allclose(answers[0].first_logits, answers[1].first_logits, atol=1e-5, rtol=0)
    assert answers[0].token_ids == answers[1].token_ids
