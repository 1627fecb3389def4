"""The wire protocol: frame messages, JSON messages, session settings, and the limits on each.

Frames (a WebSocket binary message, or the body of ``POST .../frames``) are one or more records,
each a 28-byte little-endian header and its payload::

    magic  b"VSF1"        4 bytes
    format u8             1 = JPEG or PNG (the payload is the file), 2 = raw RGB24 (H x W x 3, row-major)
    pad    3 bytes        zero
    t      float64        capture time in seconds (strictly increasing within a session)
    width  u32, height u32   the raw frame's size (0, 0 for JPEG/PNG: read from the file)
    length u32            payload bytes

JSON messages in (WebSocket text): ``{"type": "question", "text", "choices"?, "max_new_tokens"?, "id"?}``,
``{"type": "cancel", "id"}``, ``{"type": "status"}``. Everything here is plain checking: a bad value
raises ``ProtocolError`` (a ValueError) whose message names it; nothing touches a session.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np

MAGIC = b"VSF1"
FORMAT_ENCODED, FORMAT_RGB = 1, 2
HEADER = struct.Struct("<4sB3xdIII")  # magic, format, capture time, width, height, payload length
assert HEADER.size == 28, HEADER.size
QUESTION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ProtocolError(ValueError):
    """A message or setting that breaks the protocol or a limit; ``code`` names the kind for clients."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What one message may carry. Each is a server flag (``python -m model.serve --help``)."""

    max_message_bytes: int = 8 * 2**20  # a WebSocket message or an HTTP body
    max_frames_per_message: int = 64
    max_frame_pixels: int = 3840 * 2160  # checked from the header before any pixel is decoded
    max_question_chars: int = 2000
    max_choices: int = 16
    max_choice_chars: int = 200
    max_new_tokens: int = 512  # the most a question may ask for
    default_max_new_tokens: int = 128
    max_pending_questions: int = 4  # per session, queued behind the one being answered
    max_queued_frames: int = 32  # per session: beyond, the oldest queued frames are dropped (and counted)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be an int >= 1, got {value!r}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"Limits.default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                             f"max_new_tokens ({self.max_new_tokens})")


# ---------------------------------------------------------------- session settings


@dataclass(frozen=True)
class SessionBounds:
    """The server's defaults and ceilings for the settings a client may choose."""

    default_fps: float = 2.0
    max_fps: float = 30.0
    default_budget_tokens: int = 16_384
    max_budget_tokens: int = 65_536
    max_recall_grids: int = 16
    default_chunk_frames: int = 4
    max_chunk_frames: int = 16


@dataclass(frozen=True)
class SessionSettings:
    """A session's settings: every stream is bounded (a token budget always applies)."""

    fps: float
    cache_budget_tokens: int
    video_window_seconds: Optional[float] = None
    sink_frames: int = 2
    recall_grids: int = 0
    chunk_frames: int = 4  # frames per append_frames call at most (fewer when fewer are queued)
    frame_size: Optional[tuple[int, int]] = None  # (height, width) expected: the server may warm up for it

    def to_json(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _number(name: str, value, lo: float, hi: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ProtocolError("bad_settings", f"{name} must be {'an integer' if integer else 'a number'} in "
                                            f"[{lo}, {hi}], got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ProtocolError("bad_settings", f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def parse_settings(body: Any, bounds: SessionBounds) -> SessionSettings:
    """The JSON body of ``POST /v1/sessions`` (an object, possibly empty) -> checked ``SessionSettings``."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ProtocolError("bad_settings", f"session settings must be a JSON object, got {type(body).__name__}")
    known = {f.name for f in fields(SessionSettings)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ProtocolError("bad_settings", f"unknown session setting(s) {unknown}; known: {sorted(known)}")
    fps = _number("fps", body.get("fps", bounds.default_fps), 0.01, bounds.max_fps)
    budget = _number("cache_budget_tokens", body.get("cache_budget_tokens", bounds.default_budget_tokens),
                     1, bounds.max_budget_tokens, integer=True)
    window = body.get("video_window_seconds")
    if window is not None:
        window = _number("video_window_seconds", window, 0.5, 86_400.0)
    size = body.get("frame_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2):
            raise ProtocolError("bad_settings", f"frame_size must be [height, width], got {size!r}")
        size = tuple(_number(f"frame_size[{i}]", v, 28, 16_384, integer=True) for i, v in enumerate(size))
    return SessionSettings(
        fps=float(fps), cache_budget_tokens=budget, video_window_seconds=None if window is None else float(window),
        sink_frames=_number("sink_frames", body.get("sink_frames", 2), 0, 64, integer=True),
        recall_grids=_number("recall_grids", body.get("recall_grids", 0), 0, bounds.max_recall_grids, integer=True),
        chunk_frames=_number("chunk_frames", body.get("chunk_frames", bounds.default_chunk_frames), 1,
                             bounds.max_chunk_frames, integer=True),
        frame_size=size)


# ---------------------------------------------------------------- frames


@dataclass
class FrameRecord:
    """One frame as it arrived (still encoded)."""

    t: float
    format: int
    width: int
    height: int
    payload: memoryview = field(repr=False)


def parse_frames(data: bytes, limits: Limits) -> list[FrameRecord]:
    """Split a frames message into its records, checking every header before any pixel is decoded."""
    if len(data) > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds the limit of "
                                         f"{limits.max_message_bytes} bytes")
    view, out, at = memoryview(data), [], 0
    while at < len(data):
        where = f"frame {len(out)} (byte {at})"
        if len(out) == limits.max_frames_per_message:
            raise ProtocolError("limit", f"more than {limits.max_frames_per_message} frames in one message")
        if len(data) - at < HEADER.size:
            raise ProtocolError("bad_frame", f"{where}: {len(data) - at} bytes left, a frame header is {HEADER.size}")
        magic, fmt, t, width, height, length = HEADER.unpack_from(data, at)
        if magic != MAGIC:
            raise ProtocolError("bad_frame", f"{where}: header must start with {MAGIC!r}, got {bytes(magic)!r} "
                                             "(see the README's 'Serving' protocol)")
        if fmt not in (FORMAT_ENCODED, FORMAT_RGB):
            raise ProtocolError("bad_frame", f"{where}: format must be 1 (JPEG/PNG) or 2 (raw RGB), got {fmt}")
        if not math.isfinite(t) or t < 0:
            raise ProtocolError("bad_frame", f"{where}: capture time must be a finite number >= 0, got {t!r}")
        at += HEADER.size
        if fmt == FORMAT_RGB:
            check_frame_size(width, height, limits, where)
        if length > len(data) - at:
            raise ProtocolError("bad_frame", f"{where}: payload length {length} runs past the message's end "
                                             f"({len(data) - at} bytes left)")
        if fmt == FORMAT_RGB:
            if length != width * height * 3:
                raise ProtocolError("bad_frame", f"{where}: raw RGB of {width}x{height} needs {width * height * 3} "
                                                 f"bytes, got {length}")
        elif length == 0:
            raise ProtocolError("bad_frame", f"{where}: empty JPEG/PNG payload")
        out.append(FrameRecord(t, fmt, width, height, view[at:at + length]))
        at += length
    if not out:
        raise ProtocolError("bad_frame", "empty frames message")
    return out


def check_frame_size(width: int, height: int, limits: Limits, where: str) -> None:
    if width < 1 or height < 1:
        raise ProtocolError("bad_frame", f"{where}: frame size {width}x{height} (WxH) is empty")
    if width * height > limits.max_frame_pixels:
        raise ProtocolError("limit", f"{where}: {width}x{height} (WxH) is {width * height} pixels, over the limit "
                                     f"of {limits.max_frame_pixels}")


def decode_frame(rec: FrameRecord, limits: Limits, where: str) -> np.ndarray:
    """A record -> (H, W, 3) uint8 RGB. JPEG/PNG sizes are checked from the file header before decoding."""
    if rec.format == FORMAT_RGB:
        return np.frombuffer(rec.payload, np.uint8).reshape(rec.height, rec.width, 3).copy()
    from PIL import Image, UnidentifiedImageError

    try:
        try:
            img = Image.open(io.BytesIO(rec.payload))
        except Image.DecompressionBombError as e:  # PIL's own ceiling, far above ours: refused as a limit too
            raise ProtocolError("limit", f"{where}: image size over the limit of {limits.max_frame_pixels} pixels "
                                         f"({e})") from None
        if img.format not in ("JPEG", "PNG"):
            raise ProtocolError("bad_frame", f"{where}: payload is {img.format}, not JPEG or PNG")
        check_frame_size(img.width, img.height, limits, where)
        rgb = np.asarray(img.convert("RGB"))
    except ProtocolError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # what PIL raises on damaged files
        raise ProtocolError("bad_frame", f"{where}: not a decodable JPEG/PNG ({type(e).__name__}: {e})") from None
    return rgb


def encode_frame(frame: np.ndarray, t: float, fmt: str = "raw", quality: int = 90) -> bytes:
    """One frame record (the client side): ``fmt`` "raw" (lossless), "png" (lossless) or "jpeg"."""
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got shape {frame.shape}")
    h, w = frame.shape[:2]
    if fmt == "raw":
        payload, code, size = frame.tobytes(), FORMAT_RGB, (w, h)
    elif fmt in ("png", "jpeg"):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format=fmt.upper(), **({"quality": quality} if fmt == "jpeg" else {}))
        payload, code, size = buf.getvalue(), FORMAT_ENCODED, (0, 0)
    else:
        raise ValueError(f"fmt must be 'raw', 'png' or 'jpeg', got {fmt!r}")
    return HEADER.pack(MAGIC, code, float(t), size[0], size[1], len(payload)) + payload


# ---------------------------------------------------------------- JSON messages


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    choices: Optional[tuple[str, ...]]
    max_new_tokens: int


def parse_json(text: str | bytes, limits: Limits) -> dict:
    """A JSON message -> its object, which must have a string ``type``."""
    if len(text) > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {len(text)} bytes exceeds the limit of "
                                         f"{limits.max_message_bytes} bytes")
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_json", f"not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_json", 'a message must be a JSON object with a string "type"')
    return msg


def _text(name: str, value, limit: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_question", f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ProtocolError("bad_question", f"{name} is empty")
    if len(value) > limit:
        raise ProtocolError("limit", f"{name} has {len(value)} characters, over the limit of {limit}")
    return value


def parse_question(msg: dict, limits: Limits, default_id: str) -> Question:
    """A question object (WebSocket message or the body of ``POST .../questions``) -> ``Question``."""
    known = {"type", "id", "text", "choices", "max_new_tokens"}
    unknown = sorted(set(msg) - known)
    if unknown:
        raise ProtocolError("bad_question", f"unknown question field(s) {unknown}; known: {sorted(known)}")
    qid = msg.get("id", default_id)
    if not isinstance(qid, str) or not QUESTION_ID.match(qid):
        raise ProtocolError("bad_question", f"id must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {qid!r}")
    text = _text("text", msg.get("text"), limits.max_question_chars)
    choices = msg.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= limits.max_choices:
            raise ProtocolError("bad_question" if not isinstance(choices, list) or len(choices) < 2 else "limit",
                                f"choices must be a list of 2 to {limits.max_choices} strings, got "
                                f"{len(choices) if isinstance(choices, list) else type(choices).__name__}")
        choices = tuple(_text(f"choices[{i}]", c, limits.max_choice_chars) for i, c in enumerate(choices))
    max_new = msg.get("max_new_tokens", limits.default_max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= limits.max_new_tokens:
        raise ProtocolError("limit" if isinstance(max_new, int) and not isinstance(max_new, bool) else "bad_question",
                            f"max_new_tokens must be an integer in [1, {limits.max_new_tokens}], got {max_new!r}")
    return Question(qid, text, choices, max_new)


def error_event(code: str, message: str, qid: Optional[str] = None) -> dict:
    return {"type": "error", "id": qid, "code": code, "message": message}
