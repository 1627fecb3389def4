"""Shared fixtures: one tiny random Qwen2.5-VL per test session, and stream signatures."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import VideoStreamInference  # noqa: E402
from model.testing import build_tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) shared by all tests; the model is stateless, every engine is its own stream."""
    return build_tiny_model(seed=0)


@pytest.fixture
def engine(tiny):
    return VideoStreamInference(*tiny)


def signature(engine: VideoStreamInference) -> dict:
    """Everything that defines the stream: cache length, live K/V tensors (cloned), every state field."""
    kv_manager = engine.kv
    length = kv_manager.get_seq_length()
    kv = [tuple(t.clone() for t in kv_manager.layer(i)) for i in range(kv_manager.cache.num_layers)] if length else []
    state = {f.name: getattr(engine.stream_state, f.name) for f in dataclasses.fields(engine.stream_state)}
    if state["pending_frame"] is not None:
        state["pending_frame"] = state["pending_frame"].clone()
    return {"length": length, "kv": kv, "state": state, "snapshots": kv_manager.snapshot_depth}


def assert_same_signature(a: dict, b: dict) -> None:
    assert a["length"] == b["length"], f"cache length {a['length']} != {b['length']}"
    assert a["snapshots"] == b["snapshots"], f"snapshot depth {a['snapshots']} != {b['snapshots']}"
    assert len(a["kv"]) == len(b["kv"])
    for i, ((ka, va), (kb, vb)) in enumerate(zip(a["kv"], b["kv"])):
        assert torch.equal(ka, kb) and torch.equal(va, vb), f"layer {i} K/V changed"
    for name, va in a["state"].items():
        vb = b["state"][name]
        same = torch.equal(va, vb) if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) else va == vb
        assert same, f"stream_state.{name}: {va!r} != {vb!r}"


def captures(engine: VideoStreamInference, kind: str = "cuda_graphs") -> int:
    """Graphs an engine captured so far (``stats()``: "on (N captures)"; with ``StreamConfig(emulate_graphs=True)``
    on CPU each replay re-runs its step eagerly, so the graph paths run and count as on a GPU)."""
    status = engine.stats()[kind]
    assert status.startswith("on ("), status
    return int(status.split("(")[1].split()[0])
