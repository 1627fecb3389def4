"""Ray Serve with 2 local CPU replicas (one Ray cluster for the whole module: Ray starts slowly).

- sessions land on both replicas and ``GET /v1/sessions`` lists them all, each with its replica;
- session affinity holds over 50 requests per session (status, frames, questions by HTTP with the
  ``x-session-id`` header) and for a WebSocket opened with that header: every frame reaches the
  session's replica, and answers equal the engine's on the same frames;
- killing one replica makes its sessions answer 410 "session lost" (their WebSocket closes, no
  request hangs) while the other replica's sessions, WebSocket included, keep working.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
import websockets

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from model import VideoStreamInference  # noqa: E402
from model.serve.client import SessionClient, ws_url  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.protocol import SessionBounds, encode_frame, parse_settings  # noqa: E402
from model.serve.sessions import stream_config  # noqa: E402
from model.testing import synthetic_frames  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "ray-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRAMES = synthetic_frames(8, 56, 84, seed=11)


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reports: nothing leaves this machine
    # Ray Serve gives its HTTP proxy 5 s to come up, too little on 2 busy cores (it is killed and serve.start fails);
    # the cluster's processes inherit these from this one.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    # address="local": always a new cluster of our own, even where one is already running on this machine
    # (a `ray start` left by someone else would otherwise be joined, and num_cpus refused).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_USAGE_STATS_ENABLED": "0"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from model.serve.ray_app import build_app

        serve.run(build_app({"device": "cpu", "replicas": 2, "idle_timeout": 600, "api_key": KEY, "memory_gib": 0.25}), name="vsq",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def owner(sid: str) -> str:
    return sid.rsplit("-", 1)[0]


def sessions_on_both(url: str) -> dict[str, str]:
    """Create sessions until both replicas hold one -> {replica: session id}."""
    found = {}
    for _ in range(40):
        r = httpx.post(f"{url}/v1/sessions", json={"fps": 2.0}, headers=AUTH, timeout=30)
        assert r.status_code == 201, (r.status_code, r.text)
        sid = r.json()["id"]
        if found.setdefault(owner(sid), sid) != sid:  # a second one on a replica: deleted (each replica's memory is
            # 0.25 GiB, about 30 sessions: the tests must not fill it)
            assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=header(sid), timeout=30).status_code in (200, 204)
        if len(found) == 2:
            return found
    raise AssertionError(f"40 new sessions all went to {list(found)}")


def header(sid: str) -> dict:
    return {"x-session-id": sid, **AUTH}


def reference(question: str, frames, max_new: int = 6) -> list[int]:
    from model.testing import build_tiny_model

    engine = VideoStreamInference(*build_tiny_model(seed=0),
                                  config=stream_config(ServerConfig(), parse_settings({}, SessionBounds())))
    engine.append_frames(frames[:4], fps=2.0)
    engine.append_frames(frames[4:], fps=2.0)
    return engine.ask(question, max_new_tokens=max_new).token_ids


def test_sessions_on_both_replicas_are_listed_across_them(cluster):
    url = cluster
    both = sessions_on_both(url)
    assert httpx.get(f"{url}/v1/sessions", timeout=30).status_code == 401  # the key reached every replica
    listed = httpx.get(f"{url}/v1/sessions", headers=AUTH, timeout=30).json()["sessions"]
    by_id = {s["id"]: s for s in listed}
    for replica, sid in both.items():
        assert sid in by_id and by_id[sid]["replica"] == replica
    assert {s["replica"] for s in listed} == set(both)
    info = httpx.get(f"{url}/v1/info", headers=AUTH, timeout=30).json()
    assert info["route_header"] == "x-session-id"


def test_affinity_holds_over_50_requests_per_session_and_on_the_websocket(cluster):
    url = cluster
    both = sessions_on_both(url)
    with httpx.Client(base_url=url, timeout=30) as http:
        for replica, sid in both.items():
            codes, frames_sent = [], 0
            for i in range(50):
                if i % 10 == 9:
                    r = http.post(f"/v1/sessions/{sid}/questions", json={"text": "Now?", "max_new_tokens": 2},
                                  headers=header(sid))
                    codes.append(r.status_code)
                    assert '"response.done"' in r.text, r.text
                elif i % 2:
                    r = http.post(f"/v1/sessions/{sid}/frames", headers=header(sid),
                                  content=encode_frame(FRAMES[frames_sent % 8], frames_sent / 2.0, "png"))
                    codes.append(r.status_code)
                    frames_sent += 1
                else:
                    r = http.get(f"/v1/sessions/{sid}", headers=header(sid))
                    codes.append(r.status_code)
                    assert r.json()["id"] == sid
            assert codes == [200] * 50, (replica, codes)
            status = http.get(f"/v1/sessions/{sid}", headers=header(sid)).json()["status"]
            assert status["frames_received"] == frames_sent  # every frame reached the session's replica
            assert status["questions_answered"] == 5

    async def websocket(sid: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            sid = (await http.post("/v1/sessions", json={}, headers=AUTH)).json()["id"]
        async with SessionClient(ws_url(url, sid), api_key=KEY, session_header=True) as s:
            assert s.hello["id"] == sid
            await s.send_frames([(k / 2, FRAMES[k]) for k in range(4)])
            await s.send_frames([(k / 2, FRAMES[k]) for k in range(4, 8)])
            await s.wait_ingested(8)
            return await s.ask("What happened?", max_new_tokens=6)

    reply = asyncio.run(websocket(next(iter(both.values()))))
    assert reply.final["type"] == "response.done"
    assert reply.final["token_ids"] == reference("What happened?", FRAMES)


def test_a_killed_replica_loses_its_sessions_and_spares_the_others(cluster):
    url = cluster
    both = sessions_on_both(url)
    (victim, lost), (survivor, kept) = list(both.items())

    async def run():
        async with SessionClient(ws_url(url, lost), api_key=KEY, session_header=True) as doomed, \
                SessionClient(ws_url(url, kept), api_key=KEY, session_header=True) as alive:
            await alive.send_frames([(k / 2, FRAMES[k]) for k in range(4)])
            await alive.wait_ingested(4)
            ray.kill(ray.get_actor(f"SERVE_REPLICA::vsq#StreamServer#{victim}", namespace="serve"), no_restart=True)
            t0 = time.monotonic()
            with pytest.raises((ConnectionError, websockets.ConnectionClosed)):  # it closes; it does not hang
                while True:
                    await doomed.next_status(timeout=30)
                    await asyncio.sleep(0.1)
            closed_after = time.monotonic() - t0
            await alive.send_frames([(k / 2, FRAMES[k]) for k in range(4, 8)])
            await alive.wait_ingested(8)
            answer = await alive.ask("What happened?", max_new_tokens=6)
        return closed_after, answer

    closed_after, answer = asyncio.run(run())
    assert closed_after < 10
    assert answer.final["token_ids"] == reference("What happened?", FRAMES)

    deadline, codes = time.monotonic() + 90, []
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            r = http.get(f"/v1/sessions/{lost}", headers=header(lost))
            assert time.monotonic() - t0 < 30
            codes.append(r.status_code)
            if r.status_code == 410:
                break
            time.sleep(0.5)
        assert codes[-1] == 410 and r.json()["error"]["code"] == "session_lost", codes
        assert http.get(f"/v1/sessions/{kept}", headers=header(kept)).json()["status"]["frames_ingested"] == 8
        sse = http.post(f"/v1/sessions/{kept}/questions", json={"text": "What happened?", "max_new_tokens": 6},
                        headers=header(kept)).text
        done = json.loads(sse.strip().split("\n\n")[-1].split("data: ", 1)[1])
        assert done["token_ids"] == answer.final["token_ids"]
        listed = {s["id"] for s in http.get("/v1/sessions", headers=AUTH).json()["sessions"]}
        assert kept in listed and lost not in listed
