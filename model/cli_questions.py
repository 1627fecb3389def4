"""The CLI's questions: typed at the prompt (``question | a | b``) or scripted in a JSONL file.

Every question and choice is user text, checked by ``arguments`` and later read as literal text;
a malformed line of a questions file is skipped with a message that names the line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from .arguments import check_choices, check_question

KNOWN_KEYS = {"t", "question", "choices", "id"}


@dataclass
class Question:
    question: str
    choices: Optional[list[str]] = None
    t: Optional[float] = None  # scripted: ask once the video up to t is in; None: now
    line: Optional[int] = None
    id: Any = None


def parse_typed(line: str) -> Question:
    """``question`` or ``question | a | b [| ...]`` (multiple choice); ValueError when malformed."""
    question, *choices = [part.strip() for part in line.split("|")]
    if len(choices) == 1 or any(not c for c in choices):
        raise ValueError("multiple choice is 'question | choice | choice [| ...]', at least two non-empty choices")
    check_question(question)
    return Question(question, check_choices(choices) if choices else None)


def question_from_json(text: str, line: int) -> tuple[Question, list[str]]:
    """One line of a questions file and its unknown keys; ValueError saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    t, choices = obj.get("t"), obj.get("choices")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
        raise ValueError(f'"t" must be a number of seconds >= 0, got {t!r}')
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2):
        raise ValueError(f'"choices" must be a list of at least two strings, got {choices!r}')
    try:
        question = check_question(obj.get("question"))
        choices = check_choices(choices) if choices is not None else None
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    return Question(question, choices, float(t), line, obj.get("id")), sorted(set(obj) - KNOWN_KEYS)


def read_questions(path: str, report) -> tuple[list[Question], list[str]]:
    """The valid questions in t order (stable) and one message per skipped line (also ``report``ed)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read questions file {path}: {e}") from None
    questions, skipped = [], []
    for n, text in enumerate(lines, 1):
        try:
            q, unknown = question_from_json(text, n) if text.strip() else (None, [])
        except ValueError as e:
            skipped.append(f"{path}:{n}: {e}; line skipped")
            report(skipped[-1])
            continue
        questions += [q] if q else []
        if unknown:
            report(f"{path}:{n}: unknown key(s) {unknown} ignored (known: {sorted(KNOWN_KEYS)})")
    if not questions:
        raise ValueError(f"no valid question in {path}")
    return sorted(questions, key=lambda q: q.t), skipped
