"""Answers: the decode loop, generation options, token streaming, and the result types of ``ask``/``ask_choice``.

Sampling options are turned into transformers' own logits processors; greedy is the default.
Streaming building blocks: ``Decoding`` (yields each token as it is sampled), ``TextPieces``
(incremental detokenizer) and ``StreamerFeed`` (drives a transformers streamer).
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


# ---------------------------------------------------------------- text streaming


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids ``tokenizer.decode(..., skip_special_tokens=True)`` leaves out (all special added tokens)."""
    added = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return frozenset(added | set(tokenizer.all_special_ids))


class TextPieces:
    """Incremental detokenizer: ``push(token_id)`` -> the text new since the last call (maybe "").

    All pieces plus ``flush()`` join to ``tokenizer.decode(ids, skip_special_tokens=...)`` of all
    pushed ids. Each push decodes all ids so far (quadratic, but ~0.01 ms a push at 128 tokens and
    ~0.4 ms at 2000 with a fast tokenizer) and gives out only text later tokens cannot change: a
    trailing U+FFFD (an incomplete UTF-8 character split over byte-level tokens) and trailing
    whitespace (which clean_up_tokenization_spaces removes before "." and the like) are held back.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # given out so far

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)

    def _give_out(self, text: str) -> str:
        if not text.startswith(self.text):
            return ""  # text already given out changed; wait (flush checks)
        piece, self.text = text[len(self.text):], text
        return piece

    def push(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        stable = self._decode().rstrip("\ufffd").rstrip()
        return self._give_out(stable) if len(stable) > len(self.text) else ""

    def flush(self) -> str:
        """The text held back; after it, the pieces join to the decoded text."""
        text = self._decode()
        if not text.startswith(self.text):
            raise RuntimeError(f"the tokenizer's text changed after it was given out ({self.text[-30:]!r} is no "
                               f"longer a prefix of {text[-60:]!r}); TextPieces cannot stream this tokenizer exactly")
        return self._give_out(text)


class StreamerFeed:
    """Drives a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``, anything with
    ``put(value)`` and ``end()``) the way ``generate(streamer=...)`` does.

    What is put: first the prompt, as generate() does, when the feed is made (``prompt_ids``,
    by default an empty (1, 0) tensor: a streamer made with ``skip_prompt=True`` drops it, one
    without adds ""); then, per call, the token as a (1,) int64 CPU tensor, unless it is in
    ``skip_ids``. The stop token is never put (``Decoding`` does not yield it). With
    ``skip_ids=special_token_ids(tokenizer)`` the streamer's text equals ``Answer.text`` (decoded
    with skip_special_tokens=True) whatever its own decode options, e.g. for
    ``TextIteratorStreamer(tokenizer, skip_prompt=True)``. ``end()`` is called exactly once, by
    ``close()`` or on leaving the ``with`` block, also when decoding breaks early or raises::

        with StreamerFeed(streamer, skip_ids=special_token_ids(tokenizer)) as put:
            for token in decoding:
                put(token)
    """

    def __init__(self, streamer, prompt_ids: Optional[Iterable[int]] = None, skip_ids: Iterable[int] = ()):
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put(value) and end() methods, got {type(streamer).__name__}")
        self.streamer = streamer
        self.skip_ids = frozenset(int(i) for i in skip_ids)
        self.closed = False
        prompt = [] if prompt_ids is None else [int(i) for i in prompt_ids]
        streamer.put(torch.tensor([prompt], dtype=torch.long))  # (1, n), as generate() puts input_ids

    def __call__(self, token_id: int) -> None:
        if self.closed:
            raise RuntimeError("this StreamerFeed is closed (end() was called)")
        if int(token_id) not in self.skip_ids:
            self.streamer.put(torch.tensor([int(token_id)], dtype=torch.long))

    def close(self) -> None:
        """Call the streamer's end() (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.streamer.end()

    def __enter__(self) -> "StreamerFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
