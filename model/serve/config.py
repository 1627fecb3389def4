"""ServerConfig: every setting of the server, validated once (the CLI builds it from its flags).

Each session's engine gets ``stream`` (a ``StreamConfig``) with the session's own budget fields
replaced; message limits are ``protocol.Limits`` and the client-settable ranges
``protocol.SessionBounds``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import StreamConfig
from .protocol import Limits, SessionBounds

API_KEY = re.compile(r"^[A-Za-z0-9._~-]{8,256}$")  # also valid inside a WebSocket subprotocol ("bearer.KEY")


@dataclass(frozen=True)
class ServerConfig:
    limits: Limits = field(default_factory=Limits)
    bounds: SessionBounds = field(default_factory=SessionBounds)
    memory_bytes: Optional[int] = None  # sessions' memory budget; None: 90% of free GPU memory, or 1 GiB on CPU
    # Sessions share one KVPool (their K/V in its pages) and every forward runs on its scheduler, batched
    # with the other sessions' (README "Many streams"); False: each session its own engine, cache and CUDA graphs.
    pooled: bool = True
    pool_tokens: Optional[int] = None  # the pool's K/V slots; None: as many as the memory budget holds
    max_sessions: int = 64
    idle_timeout_s: float = 300.0  # a session with no message or request for this long is closed
    api_key: Optional[str] = None  # when set, every /v1 request and /metrics needs "Authorization: Bearer KEY"
    session_overhead_bytes: Optional[int] = None  # per session; None: 256 MiB on a GPU, 16 MiB on CPU
    recall_host_tokens: int = 16_384  # StreamConfig.recall_host_tokens of sessions that recall
    warmup: Optional[bool] = None  # warm the pool up at start (not pooled: each session at creation); None: on a GPU
    retry_after_s: int = 30  # Retry-After of a refused session when no idle session is about to expire
    status_interval_s: float = 1.0  # a WebSocket gets a status event this often
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        for name in ("limits", "bounds", "stream"):
            kind = {"limits": Limits, "bounds": SessionBounds, "stream": StreamConfig}[name]
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"ServerConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        for name in ("max_sessions", "recall_host_tokens", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("memory_bytes", "session_overhead_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ServerConfig.{name} must be None or an int >= 0, got {value!r}")
        for name in ("idle_timeout_s", "status_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ServerConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not API_KEY.match(self.api_key)):
            raise ValueError("the API key must be 8-256 characters of A-Z a-z 0-9 . _ ~ - (it travels in a "
                             "header and in a WebSocket subprotocol)")
        if not isinstance(self.pooled, bool):
            raise TypeError(f"ServerConfig.pooled must be True or False, got {self.pooled!r}")
        if self.pool_tokens is not None and (isinstance(self.pool_tokens, bool) or not isinstance(self.pool_tokens, int)
                                             or self.pool_tokens < 1):
            raise ValueError(f"ServerConfig.pool_tokens must be None or an int >= 1, got {self.pool_tokens!r}")
        if self.warmup is not None and not isinstance(self.warmup, bool):
            raise TypeError(f"ServerConfig.warmup must be None, True or False, got {self.warmup!r}")
