"""The same session over plain HTTP: frames by POST, questions answered as server-sent events.

The answers equal the WebSocket's and the engine's; limits and bad frames are 4xx responses
naming them; a client that drops an event stream mid-answer leaves the session as it was.
"""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # a real uvicorn server on loopback per module (run: pytest tests/test_serve_*.py)
pytest.importorskip("fastapi")  # the server's dependencies (requirements.txt)
httpx = pytest.importorskip("httpx")

from model import VideoStreamInference  # noqa: E402
from model.serve.app import build_app  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.protocol import Limits, SessionBounds, encode_frame, parse_settings  # noqa: E402
from model.serve.sessions import stream_config  # noqa: E402
from model.serve.testing import ServerThread  # noqa: E402
from model.testing import synthetic_frames  # noqa: E402

CONFIG = ServerConfig(limits=Limits(max_message_bytes=100_000))
FRAMES = synthetic_frames(8, 56, 84, seed=7)


@pytest.fixture(scope="module")
def url(tiny):
    with ServerThread(build_app(*tiny, CONFIG, "tiny")) as url:
        yield url


def sse(response) -> list[dict]:
    """Parse a text/event-stream body: each event's name must equal its data's type."""
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def post_frames(url, sid, frames, start=0, fmt="png"):
    body = b"".join(encode_frame(f, (start + k) / 2, fmt) for k, f in enumerate(frames))
    return httpx.post(f"{url}/v1/sessions/{sid}/frames", content=body,
                      headers={"content-type": "application/octet-stream"})


def test_frames_and_questions_over_http_equal_the_engine(url, tiny):
    sid = httpx.post(f"{url}/v1/sessions", json={"fps": 2.0}).json()["id"]
    first = post_frames(url, sid, FRAMES[:4])
    assert first.status_code == 200 and first.json()["queued"] == 4 and first.json()["skipped"] == 0
    post_frames(url, sid, FRAMES[4:], start=4)
    for _ in range(500):
        if httpx.get(f"{url}/v1/sessions/{sid}").json()["status"]["frames_ingested"] == 8:
            break
    r = httpx.post(f"{url}/v1/sessions/{sid}/questions", json={"text": "What happened?", "max_new_tokens": 8,
                                                                "id": "h1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    deltas, done = events[:-1], events[-1]
    assert all(e["type"] == "response.text.delta" and e["id"] == "h1" for e in deltas)
    assert done["type"] == "response.done" and "".join(e["delta"] for e in deltas) == done["text"]
    choice = sse(httpx.post(f"{url}/v1/sessions/{sid}/questions",
                            json={"text": "Which?", "choices": ["red", "green"]}))[-1]

    engine = VideoStreamInference(*tiny, config=stream_config(CONFIG, parse_settings({}, SessionBounds())))
    engine.append_frames(FRAMES[:4], fps=2.0)
    engine.append_frames(FRAMES[4:], fps=2.0)
    assert done["token_ids"] == engine.ask("What happened?", max_new_tokens=8).token_ids
    assert choice["type"] == "response.choice"
    assert choice["scores"] == engine.ask_choice("Which?", ["red", "green"]).scores


def test_http_errors_name_the_problem(url):
    sid = httpx.post(f"{url}/v1/sessions").json()["id"]
    too_big = httpx.post(f"{url}/v1/sessions/{sid}/frames", content=b"\0" * 100_001)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    bad = httpx.post(f"{url}/v1/sessions/{sid}/frames", content=b"not frames at all, no header")
    assert bad.status_code == 400 and "header" in bad.json()["error"]["message"]
    for body, code in [({"text": ""}, "bad_question"), ({"text": "q", "choices": "ab"}, "bad_question"),
                       ({"question": "q"}, "bad_question"), ([1], "bad_question")]:
        r = httpx.post(f"{url}/v1/sessions/{sid}/questions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.json())
    nojson = httpx.post(f"{url}/v1/sessions/{sid}/questions", content=b"{x")
    assert nojson.status_code == 400 and nojson.json()["error"]["code"] == "bad_json"
    assert httpx.post(f"{url}/v1/sessions/nope/frames", content=b"").status_code == 404
    assert httpx.get(f"{url}/v1/sessions/{sid}").json()["status"]["frames_received"] == 0


def test_dropping_the_event_stream_mid_answer_leaves_the_session_as_it_was(url, tiny):
    sid = httpx.post(f"{url}/v1/sessions").json()["id"]
    post_frames(url, sid, FRAMES[:4])
    for _ in range(500):
        if httpx.get(f"{url}/v1/sessions/{sid}").json()["status"]["frames_ingested"] == 4:
            break
    with httpx.Client() as client:
        with client.stream("POST", f"{url}/v1/sessions/{sid}/questions",
                           json={"text": "Tell me everything.", "max_new_tokens": 512}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one delta read, then the connection closes
    for _ in range(500):
        status = httpx.get(f"{url}/v1/sessions/{sid}").json()["status"]
        if status["questions_pending"] == 0:
            break
    assert status["questions_answered"] == 0  # the answer was cancelled, not completed
    done = sse(httpx.post(f"{url}/v1/sessions/{sid}/questions", json={"text": "What happened?",
                                                                       "max_new_tokens": 6}))[-1]
    engine = VideoStreamInference(*tiny, config=stream_config(CONFIG, parse_settings({}, SessionBounds())))
    engine.append_frames(FRAMES[:4], fps=2.0)
    assert done["token_ids"] == engine.ask("What happened?", max_new_tokens=6).token_ids


def test_frames_are_sampled_at_the_session_fps(url):
    """A client sending 10 fps to a 2 fps session: the first frame at or after each half second is kept."""
    sid = httpx.post(f"{url}/v1/sessions", json={"fps": 2.0}).json()["id"]
    frames = synthetic_frames(20, 56, 84, seed=8)
    body = b"".join(encode_frame(f, k / 10, "png") for k, f in enumerate(frames))
    counts = httpx.post(f"{url}/v1/sessions/{sid}/frames", content=body).json()
    assert counts["frames"] == 20 and counts["queued"] == 4 and counts["skipped"] == 16  # t = 0, 0.5, 1.0, 1.5
