"""Sessions cannot hurt the server: admission by memory, settings checked, idle timeout, the API key.

- a session that would not fit the memory budget is refused with 503, a reason and Retry-After,
  before anything is allocated; the sessions already admitted are untouched, and once one is
  deleted the refused one fits;
- the estimate is the session's budget tokens x the model's K/V bytes per token plus overhead,
  and the engine's reserved cache is within it;
- bad settings are 400s that name the setting; an idle session (connected or not) is closed and
  its memory returned; with ``--api-key`` every /v1 request, /metrics and the WebSocket need it.
"""
from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.slow  # a real uvicorn server on loopback per module (run: pytest tests/test_serve_*.py)
pytest.importorskip("fastapi")  # the server's dependencies (requirements.txt)
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from model.serve.app import build_app  # noqa: E402
from model.serve.client import SessionClient, create_session, ws_url  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.testing import ServerThread  # noqa: E402
from model.testing import synthetic_frames  # noqa: E402

MIB = 2**20


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "engine-per-session"])
def test_admission_refuses_what_does_not_fit_with_a_reason_and_retry_after(tiny, pooled):
    config = ServerConfig(memory_bytes=40 * MIB, session_overhead_bytes=4 * MIB, retry_after_s=7, pooled=pooled)
    app = build_app(*tiny, config, "tiny")
    registry = app.state.registry
    big = 50_000 if pooled else 30_000  # pooled: the session's pages of the pool, no per-session overhead
    need = registry._need_bytes(_settings({"cache_budget_tokens": big}))
    assert 20 * MIB < need < 40 * MIB  # one fits, two do not
    if pooled:  # the budget is the pool, allocated when the server starts
        pool = registry.pool  # its pages are the budget; with its scratch slots it stays within the memory given
        assert pool.capacity * pool.nbytes_per_token() == registry.admission.budget_bytes
        assert registry.admission.budget_bytes < pool.reserved_bytes() <= 40 * MIB
        free_pages = registry.pool.free_pages
    with ServerThread(app) as url:
        first = httpx.post(f"{url}/v1/sessions", json={"cache_budget_tokens": big})
        assert first.status_code == 201
        engine = registry.get(first.json()["id"]).runner.engine
        overhead = 0 if pooled else 4 * MIB
        assert engine.stats()["cache_reserved_bytes"] <= first.json()["memory_bytes"] - overhead
        refused = httpx.post(f"{url}/v1/sessions", json={"cache_budget_tokens": big})
        assert refused.status_code == 503
        err = refused.json()["error"]
        assert err["code"] == "no_capacity" and "needs" in err["message"] and "GiB" in err["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 7
        assert len(registry) == 1 and registry.admission.reserved_bytes == first.json()["memory_bytes"]
        small = httpx.post(f"{url}/v1/sessions", json={"cache_budget_tokens": 1000})
        assert small.status_code == 201  # a smaller session still fits beside the first
        assert httpx.delete(f"{url}/v1/sessions/{first.json()['id']}").status_code == 200
        assert httpx.post(f"{url}/v1/sessions", json={"cache_budget_tokens": big}).status_code == 201
        assert "vsq_admission_refusals_total 1.0" in httpx.get(f"{url}/metrics").text
    if pooled:  # the server stopped: every session's pages are back in the pool
        assert registry.pool.free_pages == free_pages


def test_a_full_pool_fails_the_call_not_the_session(tiny):
    """A pooled session that outgrows what admission gave it (an unbounded engine setting cannot be asked for by a
    client, so this is forced here on a tiny pool): its call fails with the pool's ValueError, commits nothing, and
    the session, the server and the other sessions go on."""
    config = ServerConfig(pool_tokens=16_384)
    app = build_app(*tiny, config, "tiny")
    registry = app.state.registry
    assert registry.pool.capacity == 16_384
    with ServerThread(app) as url:
        sid = httpx.post(f"{url}/v1/sessions", json={"cache_budget_tokens": 200}).json()["id"]
        hog_owner = registry.pool.new_owner()
        hog = registry.pool.take(registry.pool.free_pages, owner=hog_owner)  # everything the session has not taken
        frames = synthetic_frames(4, 56, 84, seed=5)

        async def run():
            async with SessionClient(ws_url(url, sid)) as s:
                await s.send_frames([(k / 2, frames[k]) for k in range(4)])
                await s.wait_ingested(4)
                for _ in range(200):  # the error event may trail the status that counts the failed frames
                    if s.errors:
                        break
                    await asyncio.sleep(0.01)
                registry.pool.give(hog, owner=hog_owner)
                await s.send_frames([(2 + k / 2, frames[k]) for k in range(4)])
                status = await s.wait_ingested(8)
                reply = await s.ask("What now?", None, 2)
                return list(s.errors), status, reply

        errors, status, reply = asyncio.run(run())
        assert len(errors) == 1 and errors[0]["code"] == "bad_frame", (errors, {k: status[k] for k in ("frames_failed", "frames_ingested", "frames_dropped")})
        assert "KV pool is full" in errors[0]["message"], errors
        assert status["frames_failed"] == 4 and status["frames_ingested"] == 4
        assert reply.final["type"] == "response.done" and reply.final["seen"]["frames"] == 4


def test_max_sessions(tiny):
    with ServerThread(build_app(*tiny, ServerConfig(max_sessions=2), "tiny")) as url:
        assert [httpx.post(f"{url}/v1/sessions").status_code for _ in range(3)] == [201, 201, 503]


def _settings(body: dict):
    from model.serve.protocol import SessionBounds, parse_settings

    return parse_settings(body, SessionBounds())


@pytest.mark.parametrize("body, words", [
    ({"fps": 0}, "fps must be"), ({"fps": 1000}, "fps must be"), ({"fps": "2"}, "fps must be"),
    ({"cache_budget_tokens": 10**9}, "cache_budget_tokens"), ({"cache_budget_tokens": 1.5}, "integer"),
    ({"recall_grids": 99}, "recall_grids"), ({"chunk_frames": 0}, "chunk_frames"),
    ({"frame_size": [10, 10]}, "frame_size"), ({"frame_size": "448x448"}, "frame_size"),
    ({"sink_frames": True}, "sink_frames"), ({"budget": 5}, "unknown session setting"),
    ({"cache_budget_tokens": 5}, "cache_budget_tokens"),  # the engine's own check: the budget cannot hold a frame
    ([1, 2], "JSON object"),
])
def test_bad_settings_are_400s_naming_the_setting(tiny, body, words):
    app = build_app(*tiny, ServerConfig(), "tiny")
    with ServerThread(app) as url:
        r = httpx.post(f"{url}/v1/sessions", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()
        assert len(app.state.registry) == 0 and app.state.registry.admission.reserved_bytes == 0
        bad = httpx.post(f"{url}/v1/sessions", content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_json"


@pytest.mark.slow  # waits out an idle timeout
def test_idle_sessions_are_closed_and_their_memory_returned(tiny):
    app = build_app(*tiny, ServerConfig(idle_timeout_s=0.6), "tiny")
    registry = app.state.registry
    frames = synthetic_frames(4, 56, 84, seed=6)

    async def run(url):
        async with httpx.AsyncClient(base_url=url) as http:
            quiet, connected, busy = [await create_session(http) for _ in range(3)]
            async with SessionClient(ws_url(url, connected)) as c, SessionClient(ws_url(url, busy)) as b:
                t0 = time.monotonic()
                while time.monotonic() - t0 < 2.0:  # busy keeps sending; the others say nothing
                    await b.send_frames([(time.monotonic() - t0, frames[0])])
                    await asyncio.sleep(0.1)
                closed = c.closed
            ended = (await http.get(f"/v1/sessions/{quiet}")).json()
            alive = (await http.get(f"/v1/sessions/{busy}")).status_code
        return closed, ended, alive

    with ServerThread(app) as url:
        closed, ended, alive = asyncio.run(run(url))
        assert closed is not None and closed["code"] == 4410 and "idle" in closed["reason"]
        assert ended["error"]["code"] == "session_ended" and "idle for more than 0.6 s" in ended["error"]["message"]
        assert alive == 200 and len(registry) == 1
        assert registry.admission.reserved_bytes == registry.sessions()[0].memory_bytes


def test_the_api_key_guards_every_session_request_and_the_socket(tiny):
    key = "test-key-0123456789"
    with ServerThread(build_app(*tiny, ServerConfig(api_key=key), "tiny")) as url:
        good = {"Authorization": f"Bearer {key}"}
        for method, path in [("POST", "/v1/sessions"), ("GET", "/v1/sessions"), ("GET", "/v1/info"),
                             ("GET", "/metrics"), ("GET", "/v1/sessions/abc"), ("DELETE", "/v1/sessions/abc"),
                             ("POST", "/v1/sessions/abc/frames"), ("POST", "/v1/sessions/abc/questions")]:
            for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": key}):
                r = httpx.request(method, f"{url}{path}", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, path, headers)
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/").status_code == 200
        sid = httpx.post(f"{url}/v1/sessions", headers=good).json()["id"]
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=good).status_code == 200

        async def sockets():
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with SessionClient(ws_url(url, sid)):
                    pass
            with pytest.raises(websockets.InvalidStatus):
                async with SessionClient(ws_url(url, sid), api_key="wrong-key-0123456789"):
                    pass
            async with SessionClient(ws_url(url, sid), api_key=key) as s:
                assert s.ws.subprotocol == "vsq.v1"
                return refused.value.response.status_code, s.hello["id"]

        status, hello = asyncio.run(sockets())
        assert status == 403 and hello == sid


def test_unknown_sessions(tiny):
    with ServerThread(build_app(*tiny, ServerConfig(), "tiny")) as url:
        r = httpx.get(f"{url}/v1/sessions/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

        async def socket():
            async with websockets.connect(ws_url(url, "nope")) as ws:
                event = await ws.recv()
                await ws.wait_closed()
                return event, ws.close_code

        event, code = asyncio.run(socket())
        assert '"not_found"' in event and code == 4404
