"""The results folder: one JSONL line per (event, mode), written as soon as it is answered.

    OUT/run.json       the settings the results were made with (checked when a run resumes)
    OUT/results.jsonl  {"event_id", "mode", "benchmark", "video", "t", "task", "category",
                        "answer_index", "n_options", "frames", "ingest_frames", "ingest_s",
                        "choice"|"choice_norm"|"letter"|"generate": {"index", "correct", "s", ...},
                        "memory_mib", "parity"?: {...}}

A run that stops (crash, Ctrl-C, ``--limit``) leaves every answered event in the JSONL; the next
run with the same OUT skips them. A half-written last line (a kill during a write) is dropped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = "results.jsonl"
RUN = "run.json"
# Settings that change answers: results made with other values cannot be mixed in one folder.
RESULT_SETTINGS = ("benchmark", "fps", "window_frames", "generate_tokens", "model")


class ResultStore:
    def __init__(self, out_dir: str | os.PathLike, settings: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS
        self._check_settings(settings)
        self.records = self._load()
        self.done = {(r["mode"], r["event_id"]) for r in self.records}

    def append(self, record: dict) -> None:
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

    # ------------------------------------------------------------------ internals
    def _check_settings(self, settings: dict) -> None:
        run = self.dir / RUN
        if run.exists():
            old = json.loads(run.read_text())
            changed = [k for k in RESULT_SETTINGS if k in old and old.get(k) != settings.get(k)]
            if changed:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise ValueError(f"{self.dir} holds results made with other settings ({diff}); "
                                 "use another --out, or the same settings to resume")
        run.write_text(json.dumps(settings, indent=2, default=_jsonable))

    def _load(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        records, keep = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # the last line, without its newline: a write that was cut off
                    print(f"{self.path}: dropping a half-written last line")
                    self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
                    break
                raise ValueError(f"{self.path} line {n} is not JSON; fix or remove it to resume") from None
            keep.append(line)
        return records


def _jsonable(value):
    """numpy/torch scalars and infinities to plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
