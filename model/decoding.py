"""Answers: the decode loop, generation options, and the result types of ``ask``/``ask_choice``.

Sampling options are turned into transformers' own logits processors; greedy is the default.
``Decoding`` yields each token as it is sampled (the text side of streaming is ``text_stream.py``).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

GENERATION_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


@dataclass
class Answer:
    """What ``ask`` returns. ``str(answer)`` is the text."""

    text: str
    token_ids: list[int]
    ttft_s: float  # question arrival -> first answer token
    total_s: float  # question arrival -> last answer token
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens)
    first_logits: Optional[torch.Tensor] = field(default=None, repr=False)  # (V,) float32 logits of token 1
    recalled: tuple = ()  # recall.Recalled grids of evicted video this answer saw again (bounded streams)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.num_tokens - 1) / decode_s if self.num_tokens > 1 and decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return self.text


@dataclass
class ChoiceResult:
    """What ``ask_choice`` returns: the best choice by summed log-probability."""

    best: str
    index: int
    scores: list[float]  # summed log p(choice tokens | video, question)
    normalized_scores: list[float]  # scores / number of tokens of each choice
    choices: list[str]
    total_s: float
    recalled: tuple = ()  # recall.Recalled grids of evicted video the scores saw again (bounded streams)

    @property
    def best_normalized(self) -> str:
        return self.choices[max(range(len(self.choices)), key=self.normalized_scores.__getitem__)]


# ---------------------------------------------------------------- generation options


def _checked(name: str, value: Any, allowed: str, ok: Callable[[float], bool], kind=numbers.Real):
    """``value`` as a float (an int for ``kind=numbers.Integral``); numpy scalars pass, bools do not.

    TypeError when it is not of ``kind``, ValueError when ``ok(value)`` is false.
    """
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    converted = int(value) if kind is numbers.Integral else float(value)
    if not ok(converted):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return converted


def check_generation_options(options: dict) -> dict:
    """Validate generation options (names as in transformers' GenerationConfig) -> all of them, as Python values.

    None (or leaving an option out) means its default: do_sample False, temperature 1, top_k 0 (off),
    top_p 1 (off), min_p 0 (off), repetition_penalty 1 (off), seed None. Every given option is
    checked, also when do_sample is False (then only repetition_penalty has an effect).
    TypeError for an unknown option or a wrong type, ValueError for a value out of range.
    """
    unknown = set(options) - set(GENERATION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown generation option(s) {sorted(unknown)}; supported: {', '.join(GENERATION_OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    do_sample = given.get("do_sample", False)
    if not isinstance(do_sample, (bool, np.bool_)):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r} ({type(do_sample).__name__})")
    positive, seed = "a finite number > 0", given.get("seed")
    return {
        "do_sample": bool(do_sample),
        "temperature": _checked("temperature", given.get("temperature", 1.0), positive,
                                lambda v: math.isfinite(v) and v > 0),
        "top_k": _checked("top_k", given.get("top_k", 0), "an int >= 0 (0 or None = off)", lambda v: v >= 0,
                          numbers.Integral),
        "top_p": _checked("top_p", given.get("top_p", 1.0), "a number in (0, 1]", lambda v: 0 < v <= 1),
        "min_p": _checked("min_p", given.get("min_p", 0.0), "a number in [0, 1]", lambda v: 0 <= v <= 1),
        "repetition_penalty": _checked("repetition_penalty", given.get("repetition_penalty", 1.0), positive,
                                       lambda v: math.isfinite(v) and v > 0),
        "seed": None if seed is None else _checked("seed", seed, "an int in [-2**63, 2**64)",
                                                   lambda v: -2**63 <= v < 2**64, numbers.Integral),
    }


@dataclass
class Sampler:
    """Greedy or sampling with transformers' logits processors."""

    processors: LogitsProcessorList
    do_sample: bool
    generator: Optional[torch.Generator]

    def __call__(self, generated: Optional[torch.Tensor], logits: torch.Tensor) -> int:
        """generated: (1, k) ids so far (None without processors); logits: (1, V) float32 -> next token id."""
        scores = self.processors(generated, logits) if len(self.processors) else logits
        if not self.do_sample:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def make_sampler(device, **options) -> Sampler:
    """Validate generation options (see ``check_generation_options``) and build a Sampler.

    repetition_penalty applies to greedy and sampling; temperature, top_k, top_p, min_p and seed
    only to sampling (do_sample=True).
    """
    o = check_generation_options(options)
    procs = LogitsProcessorList()
    if o["repetition_penalty"] != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(o["repetition_penalty"]))
    generator = None
    if o["do_sample"]:
        if o["temperature"] != 1.0:
            procs.append(TemperatureLogitsWarper(o["temperature"]))
        if o["top_k"]:
            procs.append(TopKLogitsWarper(o["top_k"]))
        if o["top_p"] < 1.0:
            procs.append(TopPLogitsWarper(o["top_p"]))
        if o["min_p"]:
            procs.append(MinPLogitsWarper(o["min_p"]))
        if o["seed"] is not None:
            generator = torch.Generator(device=device).manual_seed(o["seed"])
    return Sampler(procs, o["do_sample"], generator)


# ---------------------------------------------------------------- the decode loop


class Decoding:
    """The decode loop as an iterator: yields each new token id as soon as it is sampled.

    ``first_logits`` (1, V) gives token 1; ``feed(token)`` appends a token to the model and
    returns the next (1, V) logits. A token is fed only when the next one is asked for, so
    breaking out of the loop feeds nothing more. The stop token is neither yielded nor fed; the
    last token is not fed when ``max_new_tokens`` ends the answer. Once exhausted: ``tokens``
    (without the stop token), ``fed`` (how many of them were fed), ``ttft_s`` (``t0`` -> token 1
    sampled, after ``sync()``) and ``finish_reason`` ("stop" or "length"; None while running or
    after a break). Not resumable after ``feed`` or the sampler raised.
    """

    def __init__(self, first_logits: torch.Tensor, feed: Callable[[int], torch.Tensor], sampler: Sampler,
                 stop_ids: Iterable[int], max_new_tokens: int, sync: Callable[[], None], t0: float):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self._logits, self._feed, self._sampler = first_logits, feed, sampler
        self._stop_ids, self._max_new_tokens = set(stop_ids), int(max_new_tokens)
        self._sync, self._t0 = sync, t0
        self.tokens: list[int] = []
        self.fed = 0
        self.ttft_s: Optional[float] = None
        self.finish_reason: Optional[str] = None

    def __iter__(self) -> "Decoding":
        return self

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self.fed < len(self.tokens):  # the token yielded last: feed it now that the next one is wanted
            self._logits = self._feed(self.tokens[-1])
            self.fed += 1
        generated = None
        if self._sampler.processors:
            generated = torch.tensor([self.tokens], dtype=torch.long, device=self._logits.device)
        tok = self._sampler(generated, self._logits)
        if self.ttft_s is None:
            self._sync()
            self.ttft_s = time.perf_counter() - self._t0
        if tok in self._stop_ids:
            self.finish_reason = "stop"
            raise StopIteration
        self.tokens.append(tok)
        if len(self.tokens) >= self._max_new_tokens:
            self.finish_reason = "length"
        return tok


def decode(first_logits: torch.Tensor, feed: Callable[[int], torch.Tensor], sampler: Sampler, stop_ids: set[int],
           max_new_tokens: int, sync: Callable[[], None], t0: float) -> tuple[list[int], int, float, str]:
    """Run ``Decoding`` to the end -> (token ids without the stop token, how many were fed, ttft_s, finish_reason)."""
    decoding = Decoding(first_logits, feed, sampler, stop_ids, max_new_tokens, sync, t0)
    for _ in decoding:
        pass
    return decoding.tokens, decoding.fed, decoding.ttft_s, decoding.finish_reason
