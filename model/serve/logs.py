"""Structured logs: one JSON object per line (time, level, message, and the record's ``fields``).

    log.info("session created", extra={"fields": {"event": "session_created", "session": sid}})

User text (questions, choices) is never logged, only its length; the API key never is.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", stream: TextIO = sys.stderr) -> None:
    """JSON lines for the server's logger and uvicorn's (its access log is replaced by the server's own)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    for name in ("model.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
