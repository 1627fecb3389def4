"""Answers: the decode loop, generation options, and the result types of ``ask``/``ask_choice``.

Sampling options are turned into transformers' own logits processors; greedy is the default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

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

    @property
    def best_normalized(self) -> str:
        return self.choices[max(range(len(self.choices)), key=self.normalized_scores.__getitem__)]


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
    """Validate generation options (names as in transformers' GenerationConfig) and build a Sampler."""
    unknown = set(options) - set(GENERATION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown generation option(s) {sorted(unknown)}; supported: {', '.join(GENERATION_OPTIONS)}")
    do_sample = bool(options.get("do_sample", False))
    procs = LogitsProcessorList()
    rp = options.get("repetition_penalty")
    if rp is not None and rp != 1.0:
        if not rp > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {rp}")
        procs.append(RepetitionPenaltyLogitsProcessor(float(rp)))
    generator = None
    if do_sample:
        t = options.get("temperature", 1.0)
        if not (isinstance(t, (int, float)) and t > 0):
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        if t != 1.0:
            procs.append(TemperatureLogitsWarper(float(t)))
        if options.get("top_k"):
            procs.append(TopKLogitsWarper(int(options["top_k"])))
        if options.get("top_p") is not None and options["top_p"] < 1.0:
            procs.append(TopPLogitsWarper(float(options["top_p"])))
        if options.get("min_p"):
            procs.append(MinPLogitsWarper(float(options["min_p"])))
        if options.get("seed") is not None:
            generator = torch.Generator(device=device).manual_seed(int(options["seed"]))
    return Sampler(procs, do_sample, generator)


def decode(
    first_logits: torch.Tensor,
    feed: Callable[[int], torch.Tensor],
    sampler: Sampler,
    stop_ids: set[int],
    max_new_tokens: int,
    sync: Callable[[], None],
    t0: float,
) -> tuple[list[int], int, float, str]:
    """Generate from ``first_logits`` (1, V); ``feed(token)`` appends it and returns the next (1, V).

    Returns (token ids without the stop token, how many of them were fed, ttft_s, finish_reason).
    The last token is not fed when ``max_new_tokens`` ends the answer.
    """
    tokens: list[int] = []
    fed = 0
    logits = first_logits
    ttft = None
    device = first_logits.device
    while True:
        generated = torch.tensor([tokens], dtype=torch.long, device=device) if sampler.processors else None
        tok = sampler(generated, logits)
        if ttft is None:
            sync()
            ttft = time.perf_counter() - t0
        if tok in stop_ids:
            return tokens, fed, ttft, "stop"
        tokens.append(tok)
        if len(tokens) >= max_new_tokens:
            return tokens, fed, ttft, "length"
        logits = feed(tok)
        fed += 1
