"""Admission control: what a session will need in memory, and whether the server has it.

A session is bounded (every session has a token budget), so its cache never holds more than
the budget plus one call's tokens (plus the grids a question recalls). Its need is that many
tokens times the bytes of K/V one token takes in this model, plus a fixed overhead for the
activations of its calls; on CPU the recall slab (host memory) counts too. The server has a
memory budget (``--memory-gib``; on a GPU by default 90% of what is free after loading the
model). A session that would not fit is refused with a reason and a time to retry, before any
allocation: never an out-of-memory.

On a pooled server (``ServerConfig.pooled``, the default) the sessions' caches are pages of one
``KVPool`` allocated when the server starts, as large as the memory budget: a session needs its
capacity in whole pages of the pool, and the budget is the pool. Activations are the scheduler's,
one batch at a time for all sessions, so no per-session overhead is counted; what the budget
leaves of the GPU (10% of its free memory by default) holds them.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

from .protocol import Limits, SessionSettings

GIB = 2**30


class AdmissionRefused(Exception):
    """A session that does not fit: ``reason`` for the client, ``retry_after_s`` for its Retry-After header."""

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s


@dataclass(frozen=True)
class MemoryModel:
    """What one token and one call cost in this model (read once from the model and its processor)."""

    kv_bytes_per_token: int  # K and V of every layer, in the model's dtype
    grid_tokens: int  # tokens of one 2-frame grid at the processor's largest frame size
    overhead_bytes: int  # per session: activations of its calls, buffers of the runner
    max_question_tokens: int  # the longest question the engine accepts (StreamConfig.max_question_tokens)
    choice_chunk_tokens: int  # choice tokens per scoring forward (StreamConfig.choice_chunk_tokens)
    device_is_host: bool  # CPU: the recall slab lives in the same memory as the cache

    @classmethod
    def of(cls, model, video_max_pixels: int, factor: int, overhead_bytes: int, max_question_tokens: int,
           choice_chunk_tokens: int) -> "MemoryModel":
        text = getattr(model.config, "text_config", model.config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.dtype.itemsize
        return cls(per_token, max(1, video_max_pixels // factor**2), overhead_bytes, max_question_tokens,
                   choice_chunk_tokens, model.device.type != "cuda")

    def capacity_tokens(self, settings: SessionSettings, limits: Limits) -> int:
        """The cache capacity a session needs: its budget + its largest call + the grids a question recalls."""
        question = min(self.max_question_tokens, 4 * limits.max_question_chars) + 64  # + the chat template's tokens
        chunk = math.ceil(settings.chunk_frames / 2) * self.grid_tokens + 8
        largest_call = max(chunk, question + limits.max_new_tokens, question + self.choice_chunk_tokens)
        return settings.cache_budget_tokens + largest_call + settings.recall_grids * self.grid_tokens

    def pool_tokens(self, settings: SessionSettings, limits: Limits, page: int) -> int:
        """The most slots of a ``KVPool`` a pooled session holds: its capacity in whole pages of ``page`` slots (a
        stream takes a new page only when every page it owns is full, so it never owns more)."""
        return -(-self.capacity_tokens(settings, limits) // page) * page

    def session_bytes(self, settings: SessionSettings, limits: Limits, recall_host_tokens: int) -> int:
        cache = self.capacity_tokens(settings, limits) * self.kv_bytes_per_token
        host = recall_host_tokens * self.kv_bytes_per_token if settings.recall_grids and self.device_is_host else 0
        return cache + host + self.overhead_bytes


class Admission:
    """The server's memory budget and who holds what of it (thread-safe)."""

    def __init__(self, budget_bytes: int, max_sessions: int, retry_after_s: int, cuda_device=None):
        self.budget_bytes, self.max_sessions, self.retry_after_s = budget_bytes, max_sessions, retry_after_s
        self._cuda_device = cuda_device
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def reserve(self, sid: str, need: int, retry_after_s: Optional[int] = None) -> None:
        """Hold ``need`` bytes for session ``sid``, or raise ``AdmissionRefused`` saying why."""
        retry = retry_after_s or self.retry_after_s
        with self._lock:
            if len(self._held) >= self.max_sessions:
                raise AdmissionRefused(f"the server holds its maximum of {self.max_sessions} sessions", retry)
            used = sum(self._held.values())
            if used + need > self.budget_bytes:
                raise AdmissionRefused(
                    f"a session with these settings needs {need / GIB:.3f} GiB; {(self.budget_bytes - used) / GIB:.3f}"
                    f" GiB of the server's {self.budget_bytes / GIB:.3f} GiB budget is free (lower "
                    "cache_budget_tokens, or retry when a session ends)", retry)
            if self._cuda_device is not None:
                import torch

                dev = self._cuda_device
                # what the device has free, plus what PyTorch's allocator holds unused (a closed session's cache)
                free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
                if need > free:
                    raise AdmissionRefused(f"a session needs {need / GIB:.3f} GiB and the GPU has {free / GIB:.3f} "
                                           "GiB free", retry)
            self._held[sid] = need

    def release(self, sid: str) -> None:
        with self._lock:
            self._held.pop(sid, None)
