"""The results folder: one JSONL line per (event, mode), written as soon as it is answered.

    OUT/run.json       {"answer": every setting that changes an answer (the resume key; see
                        runner.answer_settings), "run": the rest (device, parity, video root, ...)};
                        written when a run starts
    OUT/results.jsonl  {"event_id", "mode", "benchmark", "video", "t", "task", "category",
                        "answer_index", "n_options", "frames", "ingest_frames", "ingest_s",
                        "choice"|"choice_norm"|"letter"|"generate": {"index", "correct", "s", ...},
                        "memory_mib", "parity"?: {...}}
    OUT/lock           held (``flock``) by the run writing the folder, with its pid; the kernel
                       releases it when that process ends, however it ends

A run that stops (crash, Ctrl-C, ``--limit``) leaves every answered event in the JSONL; the next
run with the same OUT and the same answer settings skips them. Answers made with other settings
(or for other questions under the same event ids) are never mixed in: the run stops with an error
naming what differs, unless ``force`` sets them aside (to ``OUT/replaced-<time>/``) and starts
again. A half-written last line (a kill during a write) is dropped; a last record without its
newline gets one before anything is appended.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Optional

RESULTS = "results.jsonl"
RUN = "run.json"
LOCK = "lock"
# Record fields that say which question an event id was answered as (checked against the annotations).
QUESTION_FIELDS = ("video", "t", "task", "answer_index", "n_options")


class ResultsFolderError(ValueError):
    """The results folder cannot be used as it is: another run holds it, it holds answers made with
    other settings, or its JSONL is damaged (not at its end)."""


class ResultStore:
    """The results folder of one run: locked while open (``close()``, or use it as a context manager).

    ``answer``: the resume key (JSON-able; results made under another are refused, or set aside
    with ``force``). ``questions``: event id -> its QUESTION_FIELDS values in this run's
    annotations; an earlier record of that id for another question counts as other settings.
    """

    def __init__(self, out_dir: str | os.PathLike, answer: dict, settings: Optional[dict] = None,
                 questions: Optional[dict[str, dict]] = None, force: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS
        self._lock_fd: Optional[int] = None
        self._lock_fd = self._lock()
        try:
            answer = json.loads(json.dumps(answer, default=_jsonable))  # as it reads back from run.json
            records = self._load()
            differences = self._differences(answer, records, questions or {}) if records else []
            if differences and not force:
                raise ResultsFolderError(f"{self.dir} holds {len(records)} answers made with other settings "
                                         f"({'; '.join(differences)}); resume with the same settings, use another "
                                         "--out, or pass --force to set those answers aside and start again")
            if differences:
                self._set_aside(len(records), differences)
                records = []
            (self.dir / RUN).write_text(json.dumps({"answer": answer, "run": settings or {}}, indent=2,
                                                   default=_jsonable))
        except BaseException:
            self.close()
            raise
        self.records = records
        self.done = {(r["mode"], r["event_id"]) for r in self.records}

    def append(self, record: dict) -> None:
        assert self._lock_fd is not None, f"{self.dir}: the store is closed"
        key = (record["mode"], record["event_id"])
        if key in self.done:
            raise ValueError(f"event {key[1]!r} in mode {key[0]!r} is already in {self.path}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.done.add(key)

    def is_done(self, mode: str, event_id: str) -> bool:
        return (mode, event_id) in self.done

    def close(self) -> None:
        """Release the folder (the lock file stays; a lock is its flock, not its existence)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _lock(self) -> int:
        """An exclusive flock on OUT/lock, holding our pid; a second run on the folder gets an error at once."""
        path = self.dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ResultsFolderError(f"{self.dir} is in use by another run (pid {owner}, holding {path}); "
                                     "wait for it to end, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _differences(self, answer: dict, records: list[dict], questions: dict[str, dict]) -> list[str]:
        """What differs between the settings (and questions) of the records on disk and this run's."""
        run = self.dir / RUN
        try:
            old = json.loads(run.read_text()) if run.exists() else None
        except json.JSONDecodeError as e:
            return [f"{run} is not JSON ({e}): the settings of these answers are unknown"]
        if not isinstance(old, dict) or not isinstance(old.get("answer"), dict):
            why = "is missing" if old is None else "was written by an older runner"
            return [f"{run} {why}: the settings of these answers are unknown"]
        out = settings_diff(old["answer"], answer)
        for r in records:
            now = questions.get(r["event_id"])
            if now is not None:
                changed = [f"{k} {r.get(k)!r} -> {now[k]!r}" for k in QUESTION_FIELDS if r.get(k) != now[k]]
                if changed:
                    out.append(f"event {r['event_id']!r} was answered for another question ({', '.join(changed)}): "
                               "the annotation file changed")
                    break
        return out

    def _set_aside(self, n: int, differences: list[str]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, k = self.dir / f"replaced-{stamp}", 1
        while dest.exists():
            dest, k = self.dir / f"replaced-{stamp}-{k}", k + 1
        dest.mkdir()
        for name in (RESULTS, RUN):
            if (self.dir / name).exists():
                os.replace(self.dir / name, dest / name)
        print(f"--force: set aside {n} answers made with other settings ({'; '.join(differences)}) to {dest}")

    def _load(self) -> list[dict]:
        """The records on disk; repairs the end of the file (a torn last line, a missing last newline)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        *lines, last = data.split(b"\n")  # last: b"" when the file ends with a newline
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                raise ResultsFolderError(f"{self.path} line {n} is not a result record ({line[:60]!r}...); "
                                         "fix or remove it to resume")
            records.append(record)
        if last.strip():
            record = _record(last)
            if record is None:  # a write cut off: the record is answered again
                print(f"{self.path}: dropping a half-written last line ({len(last)} bytes)")
                os.truncate(self.path, len(data) - len(last))
            else:
                print(f"{self.path}: adding the missing newline after the last record")
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                records.append(record)
        return records


def settings_diff(old, new, name: str = "") -> list[str]:
    """["modes.bounded.cache_budget_tokens: 1500 -> 900", ...]: the settings that differ, by dotted name."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += settings_diff(old.get(key, _UNSET), new.get(key, _UNSET), f"{name}.{key}" if name else key)
        return out
    return [] if old == new else [f"{name}: {_show(old)} -> {_show(new)}"]


_UNSET = object()


def _show(value) -> str:
    return "(not set)" if value is _UNSET else repr(value)


def _record(line: bytes) -> Optional[dict]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "mode" in record and "event_id" in record else None


def _jsonable(value):
    """numpy/torch scalars and infinities to plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
