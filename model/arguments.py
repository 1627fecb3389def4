"""Validation of what users pass to the engine: each check raises the library's own error naming the argument.

Plain functions, no state. Text from users is untrusted: it is checked here and tokenised as
literal text (``prompt.encode_user_text``), so special-token strings cannot forge turns.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

MIN_FPS, MAX_FPS = 0.01, 1000.0  # one frame per 100 s .. 1000 frames per second


def check_bool(name: str, value) -> bool:
    """Flags must be real booleans: ``update_state="no"`` would otherwise be truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_fps(fps) -> float:
    """A positive frame rate; numpy scalars (what OpenCV hands out) are accepted."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise ValueError(f"fps must be a positive finite number, got {fps!r} ({type(fps).__name__})")
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"fps must be between {MIN_FPS} and {MAX_FPS} frames per second, got {fps!r}: "
                         "temporal positions grow as 4/fps per pair of frames")
    return fps


def check_timestamps(timestamps, n: int) -> list[float]:
    """One finite, non-negative time in seconds per frame, non-decreasing."""
    if isinstance(timestamps, (str, bytes)) or not isinstance(timestamps, Sequence):
        raise TypeError(f"timestamps must be a sequence of seconds, one per frame, got {type(timestamps).__name__}")
    if len(timestamps) != n:
        raise ValueError(f"timestamps has {len(timestamps)} entries for {n} frame(s): give one per frame")
    out = []
    for i, t in enumerate(timestamps):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t)) or t < 0:
            raise ValueError(f"timestamps[{i}] must be a finite number of seconds >= 0, got {t!r}")
        if out and t < out[-1]:
            raise ValueError(f"timestamps must not decrease: timestamps[{i}]={t} after {out[-1]}")
        out.append(float(t))
    return out


def check_text(name: str, text) -> str:
    """A non-empty, valid Unicode string (a lone surrogate cannot be encoded and is refused)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason} at index {e.start} "
                         f"({text[e.start:e.end]!r})") from None
    return text


def check_question(question) -> str:
    return check_text("question", question)


CHARS_PER_TOKEN_AT_MOST = 256  # a text this many times longer than a token limit is refused without tokenising it


def user_text_ids(name: str, text, tokenizer, limit: int) -> list[int]:
    """Checked user text -> its literal ids (``prompt.encode_user_text``), at most ``limit`` of them.

    Refused before any forward, since a question's cost in memory and time grows with its length
    (``StreamConfig.max_question_tokens``).
    """
    from .prompt import encode_user_text

    check_text(name, text)
    if len(text) > limit * CHARS_PER_TOKEN_AT_MOST:
        raise ValueError(f"{name} has {len(text):,} characters, far more than StreamConfig.max_question_tokens="
                         f"{limit} tokens: shorten it (or raise that setting)")
    ids = encode_user_text(tokenizer, text)
    if len(ids) > limit:
        raise ValueError(f"{name} is {len(ids):,} tokens, more than StreamConfig.max_question_tokens={limit}: "
                         "shorten it (or raise that setting)")
    return ids


def check_choices(choices) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise TypeError(f"choices must be a list of strings, got {type(choices).__name__}")
    if len(choices) == 0:
        raise ValueError("choices is empty: pass at least one choice")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise TypeError(f"every choice must be a str, got {type(bad[0]).__name__}")
    for i, c in enumerate(choices):
        check_text(f"choice {i}", c)
    dupes = sorted({c for c in choices if list(choices).count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate choices: {dupes}")
    return list(choices)


def check_max_new_tokens(max_new_tokens, room: int) -> int:
    """An int >= 1 that fits in the positions left (``room`` = max_position_embeddings - positions used)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens > room:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the stream and question already use all but "
                         f"{max(room, 0)} of the model's max_position_embeddings positions")
    return int(max_new_tokens)
