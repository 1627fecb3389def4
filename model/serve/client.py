"""A small asyncio client of the server (the tests and ``benchmarks/bench_serve.py`` use it).

    async with httpx.AsyncClient(base_url=url) as http:
        sid = await create_session(http, fps=2)
    async with SessionClient(ws_url(url, sid)) as s:
        await s.send_frames([(0.0, rgb0), (0.5, rgb1)])        # (capture time, HxWx3 uint8)
        reply = await s.ask("What is happening?")               # text deltas, then the done event
        print(reply.text, reply.final["ttft_s"], reply.client_ttft_s)

Under Ray Serve pass ``session_header=True``: the WebSocket handshake then carries
``x-session-id`` so it reaches the replica that holds the session.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .protocol import encode_frame

SUBPROTOCOL = "vsq.v1"
SESSION_HEADER = "x-session-id"


def ws_url(base_url: str, sid: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/sessions/SID/stream."""
    parts = urlsplit(base_url)
    return urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, f"/v1/sessions/{sid}/stream", "", ""))


def auth_headers(api_key: Optional[str] = None, sid: Optional[str] = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if sid is not None:
        headers[SESSION_HEADER] = sid
    return headers


async def create_session(http, api_key: Optional[str] = None, **settings) -> str:
    """POST /v1/sessions with ``settings`` on an ``httpx.AsyncClient`` -> the session id (raises on refusal)."""
    r = await http.post("/v1/sessions", json=settings, headers=auth_headers(api_key))
    r.raise_for_status()
    return r.json()["id"]


@dataclass
class Reply:
    """A question's events as the client saw them."""

    id: str
    sent: float  # time.perf_counter() when the question was sent
    deltas: list[str] = field(default_factory=list)
    final: Optional[dict] = None  # response.done / response.choice / response.cancelled / error
    first_event_at: Optional[float] = None  # perf_counter of the first delta (or of the final event)

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def client_ttft_s(self) -> Optional[float]:
        return None if self.first_event_at is None else self.first_event_at - self.sent


class SessionClient:
    """One session over one WebSocket: frames out, questions out, events in (dispatched by question id)."""

    def __init__(self, url: str, api_key: Optional[str] = None, session_header: bool = False,
                 max_size: int = 2**24, open_timeout: float = 30.0):
        sid = url.rstrip("/").split("/")[-2]
        self.url, self.sid = url, sid
        self.headers = auth_headers(None, sid if session_header else None)
        self.subprotocols = [SUBPROTOCOL] + ([f"bearer.{api_key}"] if api_key else [])
        self.max_size, self.open_timeout = max_size, open_timeout
        self.hello: Optional[dict] = None
        self.status: Optional[dict] = None  # the latest status event
        self.statuses: list[dict] = []  # every status event received
        self.status_times: list[float] = []  # time.perf_counter() of each status event's arrival
        self.errors: list[dict] = []  # error events not tied to a question (bad frames, ...)
        self.closed: Optional[dict] = None  # the server's "closed" event, if it sent one
        self._replies: dict[str, tuple[Reply, asyncio.Queue]] = {}
        self._status_waiters: list[asyncio.Future] = []
        self._n = 0
        self.disconnected = False  # the connection has closed (the server's "closed" event says why, if it sent one)

    async def __aenter__(self) -> "SessionClient":
        import websockets

        self.ws = await websockets.connect(self.url, additional_headers=self.headers, subprotocols=self.subprotocols,
                                           max_size=self.max_size, open_timeout=self.open_timeout)
        self.hello = json.loads(await self.ws.recv())
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                event = json.loads(message)
                kind, qid = event.get("type"), event.get("id")
                if qid in self._replies and kind != "session":
                    reply, queue = self._replies[qid]
                    if reply.first_event_at is None:
                        reply.first_event_at = time.perf_counter()
                    queue.put_nowait(event)
                elif kind == "status":
                    self.status = event
                    self.statuses.append(event)
                    self.status_times.append(time.perf_counter())
                    for waiter in self._status_waiters:
                        waiter.done() or waiter.set_result(event)
                    self._status_waiters.clear()
                elif kind == "closed":
                    self.closed = event
                elif kind == "error":
                    self.errors.append(event)
        finally:
            self.disconnected = True
            for waiter in self._status_waiters:
                waiter.done() or waiter.set_exception(ConnectionError("the connection closed"))
            self._status_waiters.clear()
            for reply, queue in self._replies.values():
                if reply.final is None:
                    queue.put_nowait({"type": "error", "id": reply.id, "code": "disconnected",
                                      "message": "the connection closed before the answer ended"})

    async def send_frames(self, frames: Sequence[tuple[float, np.ndarray]], fmt: str = "raw") -> None:
        """Send frames as one message: (capture time in seconds, HxWx3 uint8 RGB) each."""
        await self.ws.send(b"".join(encode_frame(rgb, t, fmt) for t, rgb in frames))

    async def send_raw(self, message) -> None:
        await self.ws.send(message)

    async def start(self, text: str, choices: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None,
                    qid: Optional[str] = None) -> Reply:
        """Send a question; its events collect in the returned ``Reply`` (``await client.finish(reply)``)."""
        self._n += 1
        qid = qid or f"c{self._n}"
        msg = {"type": "question", "id": qid, "text": text}
        if choices is not None:
            msg["choices"] = list(choices)
        if max_new_tokens is not None:
            msg["max_new_tokens"] = max_new_tokens
        reply = Reply(qid, time.perf_counter())
        self._replies[qid] = (reply, asyncio.Queue())
        await self.ws.send(json.dumps(msg))
        return reply

    async def finish(self, reply: Reply, timeout: float = 120.0) -> Reply:
        """Wait for a started question's final event."""
        queue = self._replies[reply.id][1]

        async def collect():
            while reply.final is None:
                event = await queue.get()
                if event["type"] == "response.text.delta":
                    reply.deltas.append(event["delta"])
                else:
                    reply.final = event

        await asyncio.wait_for(collect(), timeout)  # Python 3.10 has no asyncio.timeout
        return reply

    async def ask(self, text: str, choices: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None,
                  qid: Optional[str] = None, timeout: float = 120.0) -> Reply:
        return await self.finish(await self.start(text, choices, max_new_tokens, qid), timeout)

    async def next_status(self, timeout: float = 30.0) -> dict:
        """Ask for a status event now and return it."""
        if self.disconnected:
            raise ConnectionError("the connection closed")
        waiter = asyncio.get_running_loop().create_future()
        self._status_waiters.append(waiter)
        await self.ws.send(json.dumps({"type": "status"}))
        return await asyncio.wait_for(waiter, timeout)

    async def wait_ingested(self, frames: int, timeout: float = 60.0) -> dict:
        """Poll status until ``frames`` frames are in the engine (or more) -> that status."""
        async def poll():
            while True:
                status = await self.next_status()
                if status["frames_ingested"] + status["frames_dropped"] + status["frames_failed"] >= frames:
                    return status
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(poll(), timeout)
