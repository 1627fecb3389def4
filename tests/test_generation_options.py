"""Generation options: every bad value gets a TypeError/ValueError naming the option; sampling is reproducible."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.decoding import GENERATION_OPTIONS, check_generation_options, decode, make_sampler

V = 50
NAN, INF = float("nan"), float("inf")

BAD = [  # (options, exception, the exact message)
    ({"do_sample": "False"}, TypeError, "do_sample must be True or False, got 'False' (str)"),
    ({"do_sample": 1}, TypeError, "do_sample must be True or False, got 1 (int)"),
    ({"temperature": 0}, ValueError, "temperature must be a finite number > 0, got 0"),
    ({"temperature": -0.5}, ValueError, "temperature must be a finite number > 0, got -0.5"),
    ({"temperature": INF}, ValueError, "temperature must be a finite number > 0, got inf"),
    ({"temperature": NAN}, ValueError, "temperature must be a finite number > 0, got nan"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a finite number > 0, got '0.7' (str)"),
    ({"temperature": True}, TypeError, "temperature must be a finite number > 0, got True (bool)"),
    ({"top_k": -1}, ValueError, "top_k must be an int >= 0 (0 or None = off), got -1"),
    ({"top_k": 2.5}, TypeError, "top_k must be an int >= 0 (0 or None = off), got 2.5 (float)"),
    ({"top_k": 5.0}, TypeError, "top_k must be an int >= 0 (0 or None = off), got 5.0 (float)"),
    ({"top_p": 2}, ValueError, "top_p must be a number in (0, 1], got 2"),
    ({"top_p": 0}, ValueError, "top_p must be a number in (0, 1], got 0"),
    ({"top_p": NAN}, ValueError, "top_p must be a number in (0, 1], got nan"),
    ({"top_p": "0.9"}, TypeError, "top_p must be a number in (0, 1], got '0.9' (str)"),
    ({"min_p": 1.5}, ValueError, "min_p must be a number in [0, 1], got 1.5"),
    ({"min_p": -0.1}, ValueError, "min_p must be a number in [0, 1], got -0.1"),
    ({"repetition_penalty": "x"}, TypeError, "repetition_penalty must be a finite number > 0, got 'x' (str)"),
    ({"repetition_penalty": 0}, ValueError, "repetition_penalty must be a finite number > 0, got 0"),
    ({"repetition_penalty": INF}, ValueError, "repetition_penalty must be a finite number > 0, got inf"),
    ({"seed": "abc"}, TypeError, "seed must be an int in [-2**63, 2**64), got 'abc' (str)"),
    ({"seed": True}, TypeError, "seed must be an int in [-2**63, 2**64), got True (bool)"),
    ({"seed": 1.0}, TypeError, "seed must be an int in [-2**63, 2**64), got 1.0 (float)"),
    ({"seed": 2**64}, ValueError, f"seed must be an int in [-2**63, 2**64), got {2**64}"),
    ({"beams": 4}, TypeError, "unknown generation option(s) ['beams']; supported: " + ", ".join(GENERATION_OPTIONS)),
]


@pytest.mark.parametrize("options,exc,message", BAD, ids=[f"{i}-{next(iter(o))}" for i, (o, _, _) in enumerate(BAD)])
@pytest.mark.parametrize("do_sample", [False, True])
def test_bad_option_gets_a_named_error(options, exc, message, do_sample):
    if "do_sample" not in options:
        options = {"do_sample": do_sample, **options}  # checked whether or not we sample
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        make_sampler("cpu", **options)


def test_numpy_scalars_are_accepted_and_mean_the_same():
    as_numpy = dict(do_sample=np.bool_(True), temperature=np.float32(0.5), top_k=np.int64(7), top_p=np.float64(0.75),
                    min_p=np.float32(0.0625), repetition_penalty=np.float32(1.5), seed=np.int64(3))
    as_python = {k: v.item() for k, v in as_numpy.items()}
    assert check_generation_options(as_numpy) == check_generation_options(as_python)
    assert all(type(v) in (bool, int, float) for v in check_generation_options(as_numpy).values())
    sampler = make_sampler("cpu", **as_numpy)
    assert [type(p) for p in sampler.processors] == [RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper]
    assert run(make_sampler("cpu", **as_numpy)) == run(make_sampler("cpu", **as_python))


def test_none_means_default_and_off():
    o = check_generation_options(dict.fromkeys(GENERATION_OPTIONS))
    assert o == {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                 "repetition_penalty": 1.0, "seed": None}
    assert len(make_sampler("cpu", do_sample=True, top_k=None, top_p=1, min_p=0).processors) == 0


def test_top_p_above_one_is_refused_not_ignored():
    with pytest.raises(ValueError, match=re.escape("top_p must be a number in (0, 1], got 2")):
        make_sampler("cpu", do_sample=True, top_p=2)
    assert isinstance(make_sampler("cpu", do_sample=True, top_p=0.5).processors[0], TopPLogitsWarper)


# ---------------------------------------------------------------- behaviour on a fake model


def fake_model(seed: int = 0):
    """(first_logits, feed): the next token's logits depend on the last token (a random V x V table)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 3
    return table[0][None], lambda tok: table[tok][None]


def run(sampler, n: int = 30, stop_ids=frozenset()) -> list[int]:
    first, feed = fake_model()
    return decode(first, feed, sampler, set(stop_ids), n, lambda: None, 0.0)[0]


def greedy_reference(n: int) -> list[int]:
    first, feed = fake_model()
    out, logits = [], first
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = feed(out[-1])
    return out


def test_greedy_is_argmax_and_ignores_sampling_options():
    assert run(make_sampler("cpu")) == greedy_reference(30)
    assert run(make_sampler("cpu", do_sample=False, temperature=0.3, top_k=3, top_p=0.5, seed=1)) == greedy_reference(30)


def test_sampling_with_a_seed_is_reproducible():
    a = run(make_sampler("cpu", do_sample=True, seed=3))
    assert a == run(make_sampler("cpu", do_sample=True, seed=3))
    assert a != run(make_sampler("cpu", do_sample=True, seed=4))
    assert a != greedy_reference(30)
    assert run(make_sampler("cpu", do_sample=True, top_k=1, seed=5)) == greedy_reference(30)  # top_k=1 is greedy
    assert run(make_sampler("cpu", do_sample=True, temperature=1e-4, seed=6)) == greedy_reference(30)


def test_repetition_penalty_applies_to_greedy():
    plain = greedy_reference(12)
    assert len(set(plain)) < len(plain)  # greedy over a fixed table cycles
    penalised = run(make_sampler("cpu", repetition_penalty=1e3), n=12)
    assert len(set(penalised)) == len(penalised)
