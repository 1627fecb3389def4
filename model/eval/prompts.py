"""The texts asked: probe questions for OVO-Bench's forward tasks, lettered prompts, answer matching.

The wording follows each benchmark's conventions (OVO-Bench: "Question/Options/respond with
the letter"; StreamingBench: a preamble, lettered options, "The best option is:") but is this
project's own; replace the templates here to reproduce a paper's exact prompt.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence

from .events import OVO

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
YES_NO = ("Yes", "No")  # answer_index 0 = the probe's type 1 ("yes"), 1 = type 0
REC_MAX_COUNT = 10  # REC options are the counts 0..max(10, the probe's count)
REC_COUNT_LIMIT = len(LETTERS) - 1  # a larger count is refused: its options 0..count could not be lettered

REC_QUESTION = ("People in this video may repeat one kind of action; 'they' means whoever performs it. "
                "Counting every complete motion by anyone, how many times did they {activity} so far?")
SSR_QUESTION = ("This tutorial video shows a procedure step by step. Is the person performing this step "
                "right now: \"{step}\"?")
CRR_QUESTION = ("{question}\nDo the frames seen so far, above all the latest ones, give enough information "
                "to answer this question?")

OVO_INSTRUCTION = "Respond only with the letter of the correct option."
STREAMINGBENCH_PREAMBLE = ("You are watching a video as it streams. Answer the multiple-choice question about "
                           "what you have seen so far with the letter of the best option.")
STREAMINGBENCH_CUE = "The best option is:"


def prompts_fingerprint() -> str:
    """A hash of every text this file makes the model read (part of a results folder's resume key)."""
    sample = ["q?", ["first", "second"]]
    texts = [REC_QUESTION, SSR_QUESTION, CRR_QUESTION, repr(YES_NO), str(REC_MAX_COUNT), repr(LETTERS),
             letter_prompt(OVO, *sample), letter_prompt("streamingbench", *sample)]
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def letters(n: int) -> list[str]:
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"a question needs 1..{len(LETTERS)} options to letter them, got {n}")
    return list(LETTERS[:n])


def lettered_options(options: Sequence[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(letters(len(options)), options))


def letter_prompt(benchmark: str, question: str, options: Sequence[str]) -> str:
    """The prompt listing the options, after which the option letter is scored or generated."""
    listed = lettered_options(options)
    if benchmark == OVO:
        return f"Question: {question}\nOptions:\n{listed}\n{OVO_INSTRUCTION}"
    return f"{STREAMINGBENCH_PREAMBLE}\n\nQuestion: {question}\n\nOptions:\n{listed}\n\n{STREAMINGBENCH_CUE}"


_LEADING_LETTER = re.compile(r"^\s*(?:answer\s*:?\s*|option\s*)?\(?([A-Z])(?:[\s.):,]|$)", re.IGNORECASE)
_ANY_LETTER = re.compile(r"\b([A-Z])\b")


def match_option(text: str, options: Sequence[str]) -> Optional[int]:
    """The option a generated answer names, or None.

    Numeric options (OVO-Bench REC): the digits of the answer, joined, as OVO-Bench scores it.
    Otherwise a leading option letter ("B", "(B)", "B. ..."), then an option's text contained in
    the answer (the longest one), then any standalone capital letter in range.
    """
    n = len(options)
    if all(o.isdigit() for o in options):
        digits = "".join(re.findall(r"\d+", text))
        return options.index(digits) if digits in options else None
    m = _LEADING_LETTER.match(text)
    if m and LETTERS.index(m.group(1).upper()) < n:
        return LETTERS.index(m.group(1).upper())
    low = text.lower()
    hits = [i for i, o in enumerate(options) if _norm(o) and re.search(rf"\b{re.escape(_norm(o))}\b", low)]
    if hits:
        return max(hits, key=lambda i: len(_norm(options[i])))
    for m in _ANY_LETTER.finditer(text):
        if LETTERS.index(m.group(1)) < n:
            return LETTERS.index(m.group(1))
    return None


def _norm(option: str) -> str:
    return option.strip().rstrip(".").strip().lower()
