"""ChunkInfo: what one ``append_frames``/``append_image`` call encoded (its return value)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkInfo:
    """What one ``append_frames``/``append_image`` call encoded."""

    chunk: int  # index of this call in the stream
    frames: int  # frames passed in
    frames_encoded: int  # frames that went into the cache (a held odd frame waits for its pair)
    pending: bool  # an odd frame is held
    tokens_added: int  # tokens this call appended to the transcript
    cache_len: int  # tokens in the cache after it (a bounded stream: the kept ones, after eviction)
    encode_s: float

    def __str__(self) -> str:
        return f"Chunk {self.chunk} encoded ({self.frames} frame(s), cache_len={self.cache_len})"
