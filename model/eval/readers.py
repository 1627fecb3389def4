"""Readers: OVO-Bench and StreamingBench annotation files -> events.

    OVO-Bench       [{id, task, video, realtime, question, options, gt}, ...]; the forward-active
                    tasks carry test_info: [{realtime, ...}], one event per probe (REC: count,
                    SSR: step + type, CRR: type; type 1 = "Yes", 0 = "No").
    StreamingBench  [{video_path, questions: [{task_type, question, time_stamp "HH:MM:SS",
                    options ["A. ...", ...], answer "C"}]}, ...]

A malformed entry (or StreamingBench question) is reported as a ``Problem`` with its index
and skipped; the rest is read.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Optional

from .events import OVO, OVO_TASKS, STREAMINGBENCH, Annotations, Event, Problem, category_of, parse_timestamp
from .prompts import CRR_QUESTION, LETTERS, REC_COUNT_LIMIT, REC_MAX_COUNT, REC_QUESTION, SSR_QUESTION, YES_NO

_LETTER_PREFIX = re.compile(r"^\s*[A-Z]\s*[.)]\s*")


def read_annotations(benchmark: str, path: str | os.PathLike, limit: Optional[int] = None) -> Annotations:
    """Read ``path`` as ``benchmark`` ("ovo" or "streamingbench"); ``limit``: keep the first N events."""
    readers: dict[str, Callable[[list], Annotations]] = {OVO: read_ovo, STREAMINGBENCH: read_streamingbench}
    if benchmark not in readers:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(readers)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    if not os.path.isfile(path):
        raise ValueError(f"annotation file not found: {str(path)!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got a {type(data).__name__}")
    ann = readers[benchmark](data)
    if limit is not None:
        ann.events = ann.events[:limit]
    return ann


# ------------------------------------------------------------------ OVO-Bench

def read_ovo(data: list) -> Annotations:
    ann = Annotations(OVO, entries=len(data))
    first_entry: dict[str, int] = {}
    for i, entry in enumerate(data):
        try:
            events = _ovo_entry(i, entry)
            dup = next((e.event_id for e in events if e.event_id in first_entry), None)
            if dup is not None:
                raise ValueError(f"duplicate id {dup!r} (first used by entry {first_entry[dup]})")
        except ValueError as e:
            ann.problems.append(Problem(i, str(e)))
            continue
        first_entry.update({e.event_id: i for e in events})
        ann.events.extend(events)
    return ann


def _ovo_entry(i: int, entry: Any) -> list[Event]:
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    task = _field(entry, "task", str)
    video = _field(entry, "video", str)
    eid = entry.get("id", i)
    if isinstance(eid, bool) or not isinstance(eid, (int, str)):
        raise ValueError(f"'id' must be an int or a string, got {eid!r}")

    def event(t, question, options, answer, probe=None) -> Event:
        return Event(OVO, str(eid) if probe is None else f"{eid}#{probe}", video, t, question, tuple(options),
                     answer, task, category_of(OVO, task), i, probe)

    if "test_info" not in entry:
        return [event(_seconds(entry.get("realtime"), "realtime"), *_multiple_choice(entry))]
    probes = entry["test_info"]
    if not isinstance(probes, list) or not probes:
        raise ValueError("'test_info' must be a non-empty list of {realtime, ...} probes")
    events = []
    for k, probe in enumerate(probes):
        if not isinstance(probe, dict):
            raise ValueError(f"test_info[{k}] must be an object, got {type(probe).__name__}")
        t = _seconds(probe.get("realtime"), f"test_info[{k}].realtime")
        if task in OVO_TASKS["forward"] and "question" not in probe and "options" not in entry:
            events.append(event(t, *_forward_probe(task, entry, probe, k), probe=k))
        else:  # the same multiple-choice question probed at several times
            events.append(event(t, *_multiple_choice({**entry, **probe}), probe=k))
    return events


def _multiple_choice(entry: dict) -> tuple[str, list[str], int]:
    question = _field(entry, "question", str)
    options = _field(entry, "options", list)
    if len(options) < 2 or len(options) > len(LETTERS) or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"'options' must be 2..{len(LETTERS)} non-empty strings, got {options!r}")
    _distinct(options)
    gt = entry.get("gt")
    if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < len(options):
        raise ValueError(f"'gt' must be an option index in 0..{len(options) - 1}, got {gt!r}")
    return question, options, gt


def _forward_probe(task: str, entry: dict, probe: dict, k: int) -> tuple[str, list[str], int]:
    """OVO-Bench's forward-active probe -> (question, options, answer index)."""
    if task == "REC":
        activity = _field(entry, "activity", str)
        count = probe.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"test_info[{k}].count must be an int >= 0, got {count!r}")
        if count > REC_COUNT_LIMIT:
            raise ValueError(f"test_info[{k}].count {count} is implausible: the options are the counts "
                             f"0..max({REC_MAX_COUNT}, count), one letter each, so at most {REC_COUNT_LIMIT}")
        options = [str(c) for c in range(max(REC_MAX_COUNT, count) + 1)]
        return REC_QUESTION.format(activity=activity), options, count
    kind = probe.get("type")
    if kind not in (0, 1) or isinstance(kind, bool):
        raise ValueError(f"test_info[{k}].type must be 0 or 1, got {kind!r}")
    if task == "SSR":
        question = SSR_QUESTION.format(step=_field(probe, "step", str, f"test_info[{k}].step"))
    else:
        question = CRR_QUESTION.format(question=_field(entry, "question", str))
    return question, list(YES_NO), 0 if kind == 1 else 1


# ------------------------------------------------------------------ StreamingBench

def read_streamingbench(data: list) -> Annotations:
    ann = Annotations(STREAMINGBENCH, entries=len(data))
    for i, entry in enumerate(data):
        try:
            if not isinstance(entry, dict):
                _not_an_entry(entry)
            video = _field(entry, "video_path", str)
            questions = _field(entry, "questions", list)
            if not questions:
                raise ValueError("'questions' is empty")
        except ValueError as e:
            ann.problems.append(Problem(i, str(e)))
            continue
        for j, q in enumerate(questions):
            try:
                ann.events.append(_streamingbench_question(i, j, video, q))
            except ValueError as e:
                ann.problems.append(Problem(i, f"question {j}: {e}"))
    return ann


def _not_an_entry(entry: Any) -> None:
    if isinstance(entry, list):
        raise ValueError("a list of entries (StreamingBench's sequential-QA layout) is not supported; "
                         "flatten it to {video_path, questions} objects")
    raise ValueError(f"expected an object, got {type(entry).__name__}")


def _streamingbench_question(i: int, j: int, video: str, q: Any) -> Event:
    if not isinstance(q, dict):
        raise ValueError(f"expected an object, got {type(q).__name__}")
    task = _field(q, "task_type", str)
    question = _field(q, "question", str)
    t = parse_timestamp(_field(q, "time_stamp", str))
    if "options" not in q:
        raise ValueError("no 'options': open-ended and proactive questions are not supported")
    raw = _field(q, "options", list)
    if len(raw) < 2 or len(raw) > len(LETTERS) or not all(isinstance(o, str) for o in raw):
        raise ValueError(f"'options' must be 2..{len(LETTERS)} strings, got {raw!r}")
    options = [_LETTER_PREFIX.sub("", o, count=1).strip() for o in raw]
    if not all(options):
        raise ValueError(f"an option is empty: {raw!r}")
    _distinct(options)
    answer = _field(q, "answer", str).strip().rstrip(".").upper()
    if len(answer) != 1 or answer not in LETTERS[:len(options)]:
        raise ValueError(f"'answer' must be one of {', '.join(LETTERS[:len(options)])}, got {q['answer']!r}")
    return Event(STREAMINGBENCH, f"{i}.{j}", video, t, question, tuple(options), LETTERS.index(answer), task,
                 category_of(STREAMINGBENCH, task), i)


# ------------------------------------------------------------------ field checks

def _field(obj: dict, key: str, kind: type, name: Optional[str] = None):
    name = name or key
    if key not in obj:
        raise ValueError(f"missing '{name}'")
    value = obj[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ValueError(f"'{name}' must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _distinct(options: list[str]) -> None:
    dupes = sorted({o for o in options if options.count(o) > 1})
    if dupes:
        raise ValueError(f"duplicate options {dupes}: each option must be distinct to be scored")


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"'{name}' must be a number of seconds >= 0, got {value!r}")
    return float(value)
