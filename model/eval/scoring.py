"""Answering one event on an engine: the scorers, and the offline parity check.

Scorers (every one isolated: the stream is rolled back after each):
    choice       ``ask_choice(question, option texts)``: best summed log-likelihood
    choice_norm  the same call, best length-normalised log-likelihood
    letter       ``ask_choice(prompt listing lettered options, ["A", "B", ...])``
    generate     ``ask(prompt listing lettered options)``, the answer matched to an option (optional)
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..offline import Continuation, build_inputs, native_logits, question_events
from ..prompt import encode_user_text
from ..timing import sync
from .events import Event
from .prompts import letter_prompt, letters, match_option

SCORERS = ("choice", "choice_norm", "letter", "generate")
PARITY_TIE = 1e-3  # offline margins below this are ties: a flipped choice there is not a failure


def _timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """(result, seconds) of one engine call, synchronised on CUDA: the answer's time to first token."""
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t0


def answer_event(engine, event: Event, generate_tokens: int = 0) -> dict:
    """Every scorer's answer to ``event`` from what ``engine`` has streamed so far (a JSON-able dict)."""
    options = list(event.options)
    choice, s = _timed(engine.ask_choice, event.question, options)
    norm = options.index(choice.best_normalized)
    out = {
        "choice": {"index": choice.index, "s": s, "scores": choice.scores},
        "choice_norm": {"index": norm, "s": s, "scores": choice.normalized_scores},
    }
    prompt = letter_prompt(event.benchmark, event.question, options)
    letter, s = _timed(engine.ask_choice, prompt, letters(len(options)))
    out["letter"] = {"index": letter.index, "s": s, "scores": letter.scores}
    if generate_tokens:
        ans, s = _timed(engine.ask, prompt, max_new_tokens=generate_tokens)
        out["generate"] = {"index": match_option(ans.text, options), "s": ans.ttft_s, "total_s": s,
                           "text": ans.text}
    for scorer in out.values():
        scorer["correct"] = scorer["index"] == event.answer_index
    return out


# ------------------------------------------------------------------ parity with the offline path

def offline_choice_scores(model, processor, question: str, options: Sequence[str], frames: list,
                          fps: float) -> tuple[list[float], torch.Tensor]:
    """Summed log p(option | video, question) by the native path, and the question's next-token
    logits (V,), on exactly ``frames`` (none: the text-only prompt).

    One prefill of the prompt scores every one-token option (letters, Yes/No, digits). A longer
    option takes one prefill with its tokens appended, reading the logits of its own positions
    only (len(option) x vocab, however long the video).
    """
    tok = getattr(processor, "tokenizer", processor)
    prefix = question_events(question, frames if frames else None, fps)
    first = native_logits(model, build_inputs(model, processor, prefix))[0, -1]  # (V,)
    first_logp = torch.log_softmax(first, -1)
    scores = []
    for option in options:
        ids = encode_user_text(tok, option)  # literal text, as ask_choice reads choices
        if len(ids) == 1:
            scores.append(float(first_logp[ids[0]]))
            continue
        inputs = build_inputs(model, processor, prefix + [Continuation(ids)])
        logits = native_logits(model, inputs, last=len(ids) + 1)[0, :-1]  # (len(ids), V)
        logp = torch.log_softmax(logits, -1)
        scores.append(float(logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).sum()))
    return scores, first


def parity_check(engine, event: Event, record: dict, frames: list, fps: float) -> dict:
    """Compare the streamed answers in ``record`` with the native offline path on the same frames.

    Both the option-text scorer and the letter scorer are recomputed offline. ``same_choice``
    is the verdict; ``failed`` is a different choice with an offline margin above PARITY_TIE
    in fp32 (in bf16/fp16 a difference is reported, not failed).
    """
    model, processor = engine.model, engine.processor
    options = list(event.options)
    prompt = letter_prompt(event.benchmark, event.question, options)
    out: dict = {"frames": len(frames), "dtype": str(model.dtype).replace("torch.", "")}
    t0 = time.perf_counter()
    for name, question, choices in (("choice", event.question, options), ("letter", prompt, letters(len(options)))):
        offline, first = offline_choice_scores(model, processor, question, choices, frames, fps)
        streamed = record[name]["scores"]
        best = int(np.argmax(offline))
        ranked = sorted(offline, reverse=True)
        out[name] = {
            "offline_index": best, "stream_index": record[name]["index"], "same_choice": best == record[name]["index"],
            "max_abs_score_diff": max(abs(a - b) for a, b in zip(offline, streamed)),
            "offline_margin": ranked[0] - ranked[1] if len(ranked) > 1 else float("inf"),
        }
        if name == "choice":
            streamed_first = engine.ask(question, max_new_tokens=1).first_logits
            out["max_abs_logit_diff"] = float((streamed_first.float() - first.to(streamed_first.device)).abs().max())
    out["offline_s"] = time.perf_counter() - t0
    exact = model.dtype == torch.float32
    out["same_choice"] = all(out[n]["same_choice"] for n in ("choice", "letter"))
    out["failed"] = exact and any(not out[n]["same_choice"] and out[n]["offline_margin"] > PARITY_TIE
                                  for n in ("choice", "letter"))
    return out


def is_parity_failure(parity: Optional[dict]) -> bool:
    return bool(parity and parity.get("failed"))
