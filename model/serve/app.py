"""The FastAPI application: sessions over HTTP and WebSocket, health, metrics and the browser page.

``create_app(registry, metrics)`` serves one ``SessionRegistry``; under Ray Serve each replica
serves its own, and ``cluster`` (``ray_app.RayCluster``) lists sessions across replicas and
names the header that routes a session's requests to its replica. Every error reaches the
client as ``{"error": {"code", "message"}}`` (HTTP) or an ``error`` event (WebSocket); an
exception in one request is that request's error, never the server's or another session's.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from .admission import AdmissionRefused
from .metrics import ServerMetrics
from .protocol import ProtocolError, error_event, parse_json, parse_settings
from .runner import QuestionJob
from .sessions import Session, SessionError, SessionRegistry

log = logging.getLogger("model.serve")
STATIC = Path(__file__).parent / "static"
SUBPROTOCOL = "vsq.v1"  # what a WebSocket client offers; "bearer.KEY" beside it carries the API key
OUTBOX = 4096  # events waiting to be sent to one WebSocket; a client that stops reading is disconnected


class LocalCluster:
    """A plain server: its sessions are all there is, and no header is needed to reach them."""

    route_header: Optional[str] = None

    def __init__(self, registry: SessionRegistry):
        self.registry = registry

    async def list_sessions(self) -> list[dict]:
        return [s.summary() for s in self.registry.sessions()]


def create_app(registry: SessionRegistry, metrics: ServerMetrics, cluster: Any = None,
               description: str = "") -> FastAPI:
    config, limits = registry.config, registry.config.limits
    cluster = cluster or LocalCluster(registry)

    async def reaper():
        period = min(5.0, config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await registry.expire_idle()
            except Exception:  # noqa: BLE001 - the reaper must outlive any one failure
                log.exception("expiring idle sessions failed", extra={"fields": {"event": "reaper_failed"}})

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            await registry.close_all()

    app = FastAPI(title="Streaming video QA", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics = registry, metrics
    app.add_middleware(AccessLog)

    # ------------------------------------------------------------------ errors
    def error(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ProtocolError)
    async def _protocol(request, e: ProtocolError):
        return error({"too_large": 413, "busy": 429}.get(e.code, 400), e.code, str(e))

    @app.exception_handler(SessionError)
    async def _session(request, e: SessionError):
        return error(e.status, e.code, str(e))

    @app.exception_handler(AdmissionRefused)
    async def _admission(request, e: AdmissionRefused):
        metrics.refusals.inc()
        log.info("session refused", extra={"fields": {"event": "admission_refused", "reason": e.reason}})
        return error(503, "no_capacity", e.reason, {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("request failed", extra={"fields": {"event": "request_failed", "path": request.url.path}})
        return error(500, "internal", f"internal error ({type(e).__name__}); other sessions are unaffected")

    # ------------------------------------------------------------------ auth and lookup
    def authorized(headers, subprotocols=()) -> bool:
        if config.api_key is None:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), config.api_key.encode()):
            return True
        return any(p.startswith("bearer.") and hmac.compare_digest(p[7:].encode(), config.api_key.encode())
                   for p in subprotocols)

    def require_auth(request: Request) -> None:
        if not authorized(request.headers):
            raise SessionError(401, "unauthorized", "this server needs 'Authorization: Bearer <API key>'")

    def session_for(headers, sid: str) -> Session:
        session = registry.find(sid)
        if session is not None:
            return session
        header = cluster.route_header
        if header is not None and headers.get(header) != sid:
            raise SessionError(421, "misdirected", f"requests for a session must carry the header '{header}: {sid}' "
                                                   "so that they reach the replica that holds it")
        return registry.get(sid)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_message_bytes:
            raise ProtocolError("too_large", f"body of {declared} bytes exceeds the limit of "
                                             f"{limits.max_message_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_message_bytes:
                raise ProtocolError("too_large", f"body exceeds the limit of {limits.max_message_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request, empty_ok: bool = False) -> Any:
        body = await read_body(request)
        if empty_ok and not body.strip():
            return None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProtocolError("bad_json", f"body is not JSON: {e}") from None

    # ------------------------------------------------------------------ HTTP
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "sessions": len(registry), "device": str(registry.model.device), "model": description}

    @app.get("/metrics")
    async def get_metrics(request: Request):
        require_auth(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info(request: Request):
        require_auth(request)
        return {"limits": vars(limits), "bounds": vars(config.bounds), "route_header": cluster.route_header,
                "subprotocol": SUBPROTOCOL, "idle_timeout_s": config.idle_timeout_s, "device": str(registry.model.device),
                "memory_budget_bytes": registry.admission.budget_bytes, "model": description}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request):
        require_auth(request)
        settings = parse_settings(await read_json(request, empty_ok=True), config.bounds)
        session = await registry.create(settings)
        metrics.sessions_total.inc()
        return JSONResponse({"id": session.id, "settings": settings.to_json(), "memory_bytes": session.memory_bytes,
                             "stream": f"/v1/sessions/{session.id}/stream"}, status_code=201,
                            headers={"x-session-id": session.id})

    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        require_auth(request)
        return {"sessions": await cluster.list_sessions()}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        require_auth(request)
        session = session_for(request.headers, sid)
        session.touch()
        body = {**session.summary(), "status": session.status(), "stats": session.runner.stats()}
        return JSONResponse(json.loads(json.dumps(body, default=str)))

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        require_auth(request)
        session = session_for(request.headers, sid)
        await registry.delete(session.id)
        return {"id": sid, "deleted": True, "freed_bytes": session.memory_bytes}

    @app.post("/v1/sessions/{sid}/frames")
    async def post_frames(sid: str, request: Request):
        require_auth(request)
        session = session_for(request.headers, sid)
        counts = await receive_frames(session, await read_body(request), metrics)
        return {**counts, "status": session.status()}

    @app.post("/v1/sessions/{sid}/questions")
    async def post_question(sid: str, request: Request):
        require_auth(request)
        session = session_for(request.headers, sid)
        msg = await read_json(request)
        if not isinstance(msg, dict):
            raise ProtocolError("bad_question", "a question must be a JSON object")
        job = session.ask({"type": "question", **msg})

        async def events():
            try:
                async for event in job.events():
                    if event["type"] == "error":
                        metrics.errors.labels(event["code"]).inc()
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            finally:
                job.cancel()  # the client went away mid-answer: stop decoding, roll the answer back
                session.touch()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ WebSocket
    @app.websocket("/v1/sessions/{sid}/stream")
    async def stream(ws: WebSocket, sid: str):
        offered = ws.scope.get("subprotocols") or []
        chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None
        if not authorized(ws.headers, offered):
            metrics.errors.labels("unauthorized").inc()
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        try:
            session = session_for(ws.headers, sid)
        except SessionError as e:
            await ws.accept(subprotocol=chosen)
            await ws.send_json(error_event(e.code, str(e)))
            await ws.close(code=4000 + e.status)
            return
        await ws.accept(subprotocol=chosen)
        conn = Connection(ws, session, limits, metrics)
        previous = session.attach(conn)
        if previous is not None:
            await previous.close_for("replaced by a newer connection to this session", code=4409)
        await conn.run(config.status_interval_s)

    return app


async def receive_frames(session: Session, data: bytes, metrics: ServerMetrics) -> dict:
    """A frames message into ``session``, counted by fate (received, skipped; rejected when refused)."""
    before = session.frames_rejected
    try:
        counts = await session.receive_frames(data)
    except ProtocolError:
        metrics.frames.labels("rejected").inc(session.frames_rejected - before)
        raise
    metrics.frames.labels("received").inc(counts["frames"])
    metrics.frames.labels("skipped").inc(counts["skipped"])
    return counts


class Connection:
    """One WebSocket attached to a session: a receive loop, a send loop, a status ticker, its questions."""

    def __init__(self, ws: WebSocket, session: Session, limits, metrics: ServerMetrics):
        self.ws, self.session, self.limits, self.metrics = ws, session, limits, metrics
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()  # events, then None: close
        self.jobs: dict[str, QuestionJob] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closing: Optional[tuple[int, str]] = None

    def send(self, event: dict) -> None:
        """Queue an event for the client (event loop thread)."""
        if self.closing is not None:
            return
        if event.get("type") == "error":
            self.metrics.errors.labels(event["code"]).inc()
        if self.outbox.qsize() >= OUTBOX:
            self._close(1008, "the client does not read its events")
            return
        self.outbox.put_nowait(event)

    def _close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            self.outbox.put_nowait(None)

    def send_threadsafe(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.send, event)
        except RuntimeError:  # the loop has stopped
            pass

    async def close_for(self, reason: str, code: int = 4410) -> None:
        """Close this connection (the session ended, or a newer connection took over)."""
        if self.closing is None:
            self.outbox.put_nowait({"type": "closed", "code": code, "reason": reason})
            self._close(code, reason)

    async def run(self, status_interval_s: float) -> None:
        s = self.session
        self.send({"type": "session", "id": s.id, "settings": s.settings.to_json(), "status": s.status()})
        sender = asyncio.create_task(self._sender())
        ticker = asyncio.create_task(self._ticker(status_interval_s))
        try:
            await self._receiver()
        finally:
            for job in self.jobs.values():
                job.cancel()  # the client is gone: stop its answers; the session stays as it was
            for task in (*self.tasks, ticker):
                task.cancel()
            self._close(1000, "")
            await asyncio.gather(sender, return_exceptions=True)
            s.detach(self)

    async def _receiver(self) -> None:
        while self.closing is None:
            try:
                msg = await self.ws.receive()
            except RuntimeError:  # receive after the socket closed
                return
            if msg["type"] == "websocket.disconnect":
                return
            self.session.touch()
            try:
                if msg.get("bytes") is not None:
                    await receive_frames(self.session, msg["bytes"], self.metrics)
                elif msg.get("text") is not None:
                    self._message(msg["text"])
            except ProtocolError as e:
                self.send(error_event(e.code, str(e)))
            except SessionError as e:
                self.send(error_event(e.code, str(e)))
                return
            except Exception as e:  # noqa: BLE001 - one message's failure is its error event, not the connection's
                log.exception("message failed", extra={"fields": {"event": "message_failed", "session": self.session.id}})
                self.send(error_event("internal", f"the message failed ({type(e).__name__}); the session is unchanged"))

    def _message(self, text: str) -> None:
        msg = parse_json(text, self.limits)
        kind = msg["type"]
        if kind == "question":
            qid = msg.get("id")
            if isinstance(qid, str) and qid in self.jobs:
                raise ProtocolError("bad_question", f"question id {qid!r} is still being answered")
            try:
                job = self.session.ask(msg)
            except ProtocolError as e:
                self.send(error_event(e.code, str(e), qid if isinstance(qid, str) else None))
                return
            self.jobs[job.question.id] = job
            task = asyncio.create_task(self._pump(job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif kind == "cancel":
            job = self.jobs.get(msg.get("id"))
            if job is None:
                raise ProtocolError("bad_question", f"no question {msg.get('id')!r} on this connection")
            job.cancel()
        elif kind == "status":
            self.send(self.session.status())
        else:
            raise ProtocolError("bad_json", f"unknown message type {kind!r}; known: question, cancel, status")

    async def _pump(self, job: QuestionJob) -> None:
        async for event in job.events():
            self.send(event)
        if self.jobs.get(job.question.id) is job:
            del self.jobs[job.question.id]  # answered: a connection holds only its open questions
        self.session.touch()

    async def _ticker(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self.send(self.session.status())

    async def _sender(self) -> None:
        try:
            while True:
                event = await self.outbox.get()
                if event is None:
                    break
                await self.ws.send_text(json.dumps(event))
            code, reason = self.closing or (1000, "")
            await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # noqa: BLE001 - the socket went away while sending: the receive loop ends too
            pass


class AccessLog:
    """Pure ASGI middleware: one JSON log line per HTTP request (method, path, status, milliseconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info("request", extra={"fields": {"event": "request", "method": scope["method"], "path": scope["path"],
                                                  "status": status[0],
                                                  "ms": round(1000 * (time.perf_counter() - t0), 2)}})


def build_app(model, processor, config, description: str = "", id_prefix: str = "", cluster_factory=None) -> FastAPI:
    """The whole server over one loaded model: metrics, the session registry and the app.

    cluster_factory(registry) -> the cluster hooks (Ray Serve); None: a plain server.
    """
    metrics = ServerMetrics()
    registry = SessionRegistry(model, processor, config, observer=metrics, id_prefix=id_prefix)
    metrics.watch(registry)
    cluster = cluster_factory(registry) if cluster_factory is not None else None
    return create_app(registry, metrics, cluster, description)
