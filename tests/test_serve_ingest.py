"""Ingest under load: questions do not wait for queued frames, a full queue drops the oldest, deletes interrupt.

- a question asked behind a long queue of frames is answered from the frames ingested when it
  started (its done event says how many and how many were still queued), and equals the engine
  on exactly those frames;
- when frames arrive faster than they are ingested, the oldest queued ones are dropped and
  counted (status and the POST's answer), and the stream holds the newest, consistently;
- deleting a session in the middle of an answer ends the answer, closes the socket with the
  reason, and frees the session's memory.
"""
from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.slow  # a real uvicorn server on loopback per module (run: pytest tests/test_serve_*.py)
pytest.importorskip("fastapi")  # the server's dependencies (requirements.txt)
httpx = pytest.importorskip("httpx")

from model import VideoStreamInference  # noqa: E402
from model.serve.app import build_app  # noqa: E402
from model.serve.client import SessionClient, create_session, ws_url  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.protocol import Limits, SessionBounds, encode_frame, parse_settings  # noqa: E402
from model.serve.sessions import stream_config  # noqa: E402
from model.serve.testing import ServerThread  # noqa: E402
from model.testing import synthetic_frames  # noqa: E402

CONFIG = ServerConfig(limits=Limits(max_queued_frames=32, max_new_tokens=512))
FRAMES = synthetic_frames(32, 224, 224, seed=12)


@pytest.fixture(scope="module")
def server(tiny):
    app = build_app(*tiny, CONFIG, "tiny")
    with ServerThread(app) as url:
        yield url, app


def engine_on(tiny, frames, chunk: int, settings: dict):
    engine = VideoStreamInference(*tiny, config=stream_config(CONFIG, parse_settings(settings, SessionBounds())))
    for i in range(0, len(frames), chunk):
        engine.append_frames(frames[i:i + chunk], fps=settings.get("fps", 2.0))
    return engine


def test_a_question_is_answered_from_what_is_ingested_at_its_arrival(server, tiny):
    url, _ = server
    settings = {"fps": 2.0, "chunk_frames": 1}

    async def run():
        async with httpx.AsyncClient(base_url=url) as http:
            sid = await create_session(http, **settings)
        async with SessionClient(ws_url(url, sid)) as s:
            await s.send_frames([(k / 2, FRAMES[k]) for k in range(32)])  # 32 appends of one frame queued
            while (await s.next_status())["frames_ingested"] < 2:  # ask once ingest is under way
                pass
            reply = await s.ask("What is there now?", max_new_tokens=6)
            return reply, await s.wait_ingested(32)

    reply, status = asyncio.run(run())
    seen = reply.final["seen"]
    assert seen["not_ingested_frames"] > 0, "the question waited for the whole queue"
    assert seen["frames"] >= 2 and seen["frames"] + seen["not_ingested_frames"] == 32
    assert seen["until_s"] == (seen["frames"] - 1) / 2
    assert status["frames_ingested"] == 32 and status["frames_dropped"] == 0
    want = engine_on(tiny, FRAMES[:seen["frames"]], 1, settings).ask("What is there now?", max_new_tokens=6)
    assert reply.final["token_ids"] == want.token_ids


def test_a_full_queue_drops_the_oldest_frames_and_says_so(tiny):
    config = ServerConfig(limits=Limits(max_queued_frames=4))
    with ServerThread(build_app(*tiny, config, "tiny")) as url:
        sid = httpx.post(f"{url}/v1/sessions", json={"fps": 2.0, "chunk_frames": 4}).json()["id"]
        frames = FRAMES[:20]
        body = b"".join(encode_frame(f, k / 2, "png") for k, f in enumerate(frames))
        counts = httpx.post(f"{url}/v1/sessions/{sid}/frames", content=body).json()
        assert counts["queued"] == 20 and counts["dropped"] == 16  # one message: only the newest 4 can wait
        for _ in range(500):
            status = httpx.get(f"{url}/v1/sessions/{sid}").json()["status"]
            if status["frames_ingested"] == 4:
                break
        assert status["frames_dropped"] == 16 and status["ingested_until_s"] == 9.5 and status["ingest_lag_s"] == 0
        assert "vsq_frames_total{fate=\"dropped\"} 16.0" in httpx.get(f"{url}/metrics").text
        sse = httpx.post(f"{url}/v1/sessions/{sid}/questions", json={"text": "Now?", "max_new_tokens": 6}).text
        assert '"frames": 4' in sse
        want = engine_on(tiny, frames[16:], 4, {"fps": 2.0}).ask("Now?", max_new_tokens=6)
        assert f'"token_ids": {want.token_ids}' in sse


def test_deleting_a_session_mid_answer_ends_it_and_frees_the_memory(server):
    url, app = server
    registry = app.state.registry

    async def run():
        async with httpx.AsyncClient(base_url=url) as http:
            sid = await create_session(http)
            async with SessionClient(ws_url(url, sid)) as s:
                await s.send_frames([(k / 2, FRAMES[k]) for k in range(4)])
                await s.wait_ingested(4)
                reserved = registry.admission.reserved_bytes
                reply = await s.start("Tell me everything.", max_new_tokens=512)
                while not (await s._replies[reply.id][1].get())["type"] == "response.text.delta":
                    pass
                deleted = await http.delete(f"/v1/sessions/{sid}")
                await s.finish(reply, timeout=30)
                for _ in range(100):
                    if s.closed is not None:
                        break
                    await asyncio.sleep(0.02)
                return deleted, reply, s.closed, reserved, sid

    deleted, reply, closed, reserved, sid = asyncio.run(run())
    assert deleted.status_code == 200
    assert reply.final["type"] in ("response.cancelled", "error")
    assert closed["code"] == 4410 and closed["reason"] == "deleted"
    assert registry.admission.reserved_bytes == reserved - deleted.json()["freed_bytes"]
    assert sid not in {s.id for s in registry.sessions()}
