"""The server end to end on a real loopback uvicorn: create, stream, ask, delete.

- answers over the WebSocket equal ``engine.ask`` / ``ask_choice`` on the same frames in the same
  chunks (token ids, choice scores), bounded streams with eviction included, and the done event
  says what the question saw;
- 8 sessions streamed and asked concurrently each equal the same stream run alone;
- deleting a session closes its engine and frees its cache (weak references die, admission
  memory is returned), and its id then answers "ended".

Each test runs on a pooled server (the default: sessions' K/V in one pool, their forwards batched by
its scheduler; choice scores equal to 1e-4 in fp32, since a batched forward sums in another order)
and on one with an engine per session (``pooled=False``: scores bit-identical).
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref

import pytest

pytestmark = pytest.mark.slow  # a real uvicorn server on loopback per module (run: pytest tests/test_serve_*.py)
pytest.importorskip("fastapi")  # the server's dependencies (requirements.txt)
httpx = pytest.importorskip("httpx")

from model import VideoStreamInference  # noqa: E402
from model.serve.app import build_app  # noqa: E402
from model.serve.client import SessionClient, create_session, ws_url  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.protocol import SessionBounds, parse_settings  # noqa: E402
from model.serve.sessions import stream_config  # noqa: E402
from model.serve.testing import ServerThread  # noqa: E402
from model.testing import synthetic_frames  # noqa: E402

CONFIG = ServerConfig()
QUESTION = "What is moving across the screen?"
CHOICES = ["a red circle", "a green square", "nothing at all"]


@pytest.fixture(scope="module", params=[True, False], ids=["pooled", "engine-per-session"])
def server(tiny, request):
    app = build_app(*tiny, dataclasses.replace(CONFIG, pooled=request.param), "tiny")
    with ServerThread(app) as url:
        yield url, app


def same_scores(got: list[float], want: list[float], app) -> bool:
    """Choice scores of a session equal the engine's alone: exactly with an engine per session, to 1e-4 pooled."""
    if app.state.registry.pool is None:
        return got == want
    return got == pytest.approx(want, rel=1e-5, abs=1e-4)


def reference(tiny, settings: dict, chunks: list[list], questions: list[tuple]) -> list:
    """The same stream on a plain engine: the session's StreamConfig, the same chunks, the same questions."""
    engine = VideoStreamInference(*tiny, config=stream_config(CONFIG, parse_settings(settings, SessionBounds())))
    fps = settings.get("fps", 2.0)
    for chunk in chunks:
        engine.append_frames(chunk, fps=fps)
    out = []
    for text, choices, max_new in questions:
        out.append(engine.ask_choice(text, choices) if choices else engine.ask(text, max_new_tokens=max_new))
    out.append(engine.stats())
    engine.close()
    return out


async def stream_session(url: str, settings: dict, frames: list, chunk: int, questions: list[tuple]):
    """Create a session, send ``frames`` in messages of ``chunk`` (times k / fps), wait until ingested, ask."""
    fps = settings.get("fps", 2.0)
    async with httpx.AsyncClient(base_url=url) as http:
        sid = await create_session(http, **settings)
    async with SessionClient(ws_url(url, sid)) as s:
        assert s.hello["type"] == "session" and s.hello["id"] == sid
        for i in range(0, len(frames), chunk):
            await s.send_frames([(k / fps, frames[k]) for k in range(i, min(i + chunk, len(frames)))])
            await asyncio.sleep(0)
        status = await s.wait_ingested(len(frames))
        replies = [await s.ask(text, choices, max_new) for text, choices, max_new in questions]
    return sid, status, replies


def test_create_stream_ask_delete_equals_the_engine(server, tiny):
    url, app = server
    frames = synthetic_frames(10, 56, 84, seed=1)
    settings = {"fps": 2.0, "chunk_frames": 4}
    questions = [(QUESTION, None, 8), (QUESTION, CHOICES, None)]
    sid, status, (text, choice) = asyncio.run(stream_session(url, settings, frames, 4, questions))
    assert status["frames_ingested"] == 10 and status["frames_dropped"] == 0 and status["queued_frames"] == 0
    assert status["ingest_lag_s"] == 0.0 and status["newest_frame_s"] == 4.5
    want_text, want_choice, want_stats = reference(tiny, settings, [frames[0:4], frames[4:8], frames[8:10]], questions)

    done = text.final
    assert done["type"] == "response.done", done
    assert done["token_ids"] == want_text.token_ids and done["text"] == want_text.text == text.text
    assert done["tokens"] == len(want_text.token_ids) and done["finish_reason"] == want_text.finish_reason
    assert 0 < done["engine_ttft_s"] <= done["ttft_s"] <= done["total_s"]
    assert text.client_ttft_s >= done["ttft_s"] - done["queue_s"] > 0
    seen = done["seen"]
    assert seen["frames"] == 10 and seen["until_s"] == 4.5 and seen["not_ingested_frames"] == 0
    assert seen["video_seconds"] == want_stats["video_seconds"] and seen["evicted_seconds"] == 0.0
    assert seen["recalled"] == [] and "question start" in seen["as_of"]

    got = choice.final
    assert got["type"] == "response.choice", got
    assert same_scores(got["scores"], want_choice.scores, app) and got["best"] == want_choice.best
    assert same_scores(got["normalized_scores"], want_choice.normalized_scores, app) and got["choices"] == CHOICES

    info = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert info["id"] == sid and info["stats"]["cache_tokens"] == want_stats["cache_tokens"]
    assert info["status"]["questions_answered"] == 2 and info["settings"]["fps"] == 2.0
    assert sid in [s["id"] for s in httpx.get(f"{url}/v1/sessions").json()["sessions"]]

    r = httpx.delete(f"{url}/v1/sessions/{sid}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    gone = httpx.get(f"{url}/v1/sessions/{sid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_ended"
    assert sid not in [s["id"] for s in httpx.get(f"{url}/v1/sessions").json()["sessions"]]
    assert httpx.delete(f"{url}/v1/sessions/{sid}").status_code == 404


def test_a_bounded_session_evicts_and_still_equals_the_engine(server, tiny):
    url, app = server
    frames = synthetic_frames(24, 56, 84, seed=2)
    settings = {"fps": 2.0, "cache_budget_tokens": 60, "sink_frames": 2, "recall_grids": 1}
    questions = [(QUESTION, None, 6), (QUESTION, CHOICES, None)]
    _, status, (text, choice) = asyncio.run(stream_session(url, settings, frames, 4, questions))
    chunks = [frames[i:i + 4] for i in range(0, 24, 4)]
    want_text, want_choice, want_stats = reference(tiny, settings, chunks, questions)
    assert want_stats["evicted_seconds"] > 0, "the budget must evict for this test to mean anything"
    seen = text.final["seen"]
    assert seen["evicted_seconds"] == want_stats["evicted_seconds"]
    assert seen["kept_video_seconds"] == want_stats["kept_video_seconds"]
    assert text.final["token_ids"] == want_text.token_ids
    assert text.final["seen"]["recalled"] == [[g.start_s, g.end_s] for g in want_text.recalled] != []
    assert same_scores(choice.final["scores"], want_choice.scores, app)
    assert status["evicted_seconds"] == want_stats["evicted_seconds"]


def test_eight_concurrent_sessions_each_equal_themselves_alone(server, tiny):
    url, app = server
    pool = app.state.registry.pool
    if pool is not None:
        pool.scheduler.reset_stats()
    n = 8
    videos = [synthetic_frames(12, 56, 84, seed=10 + i) for i in range(n)]
    settings = [{"fps": [1.0, 2.0, 4.0][i % 3], "cache_budget_tokens": [4096, 70][i % 2]} for i in range(n)]
    questions = [[(f"Session {i}: {QUESTION}", None, 6), (f"Session {i}?", CHOICES[: 2 + i % 2], None)]
                 for i in range(n)]

    async def all_sessions():
        return await asyncio.gather(*(stream_session(url, settings[i], videos[i], 4, questions[i]) for i in range(n)))

    results = asyncio.run(all_sessions())
    assert len({sid for sid, _, _ in results}) == n
    for i, (sid, status, (text, choice)) in enumerate(results):
        want_text, want_choice, want_stats = reference(tiny, settings[i], [videos[i][k:k + 4] for k in (0, 4, 8)],
                                                       questions[i])
        assert status["frames_ingested"] == 12 and status["frames_dropped"] == 0
        assert text.final["token_ids"] == want_text.token_ids, f"session {i}"
        assert same_scores(choice.final["scores"], want_choice.scores, app), f"session {i}"
        assert text.final["seen"]["cache_tokens"] == want_stats["cache_tokens"], f"session {i}"
    if pool is not None:  # the sessions' forwards ran through the pool's scheduler, several per batch
        stats = pool.stats()
        assert stats["lm_segments"] > stats["lm_batches"] > 0, stats
        assert httpx.get(f"{url}/metrics").text.count("vsq_pool_lm_segments_total") >= 1


def test_deleting_a_session_closes_its_engine_and_frees_its_memory(server):
    url, app = server
    registry = app.state.registry
    frames = synthetic_frames(6, 56, 84, seed=3)
    before = registry.admission.reserved_bytes
    pool = registry.pool
    free_before = pool.free_pages if pool is not None else None
    sid, _, _ = asyncio.run(stream_session(url, {"fps": 2.0}, frames, 6, [(QUESTION, None, 2)]))
    engine = registry.get(sid).runner.engine
    assert registry.admission.reserved_bytes > before
    if pool is None:  # its own K/V buffers: they die with the session
        buffers = [weakref.ref(t) for kv in engine.kv.cache.buffers for t in kv]
        assert buffers and all(b() is not None for b in buffers)
    else:  # pages of the shared pool: they go back to it
        owned = engine.stats()["pool_pages_owned"]
        assert owned > 0 and pool.free_pages == free_before - owned
    assert httpx.delete(f"{url}/v1/sessions/{sid}").status_code == 200
    gc.collect()
    if pool is None:
        assert all(b() is None for b in buffers), "a deleted session's K/V buffers are still alive"
    else:
        assert pool.free_pages == free_before, "a deleted session's pages did not go back to the pool"
    assert engine.stats()["cache_reserved_bytes"] == 0
    with pytest.raises(ValueError, match="closed"):
        engine.ask("Still there?")
    assert registry.admission.reserved_bytes == before
    del engine


def test_healthz_and_metrics(server):
    url, app = server
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    # a session's frames and a question first, so that every counter has a row (whatever ran before)
    asyncio.run(stream_session(url, {"fps": 2.0}, synthetic_frames(4, 56, 84, seed=8), 4, [(QUESTION, None, 1)]))
    text = httpx.get(f"{url}/metrics").text
    names = ["vsq_sessions ", "vsq_frames_total{fate=\"ingested\"}", "vsq_question_ttft_seconds_bucket",
             "vsq_ingest_queue_frames", "vsq_memory_reserved_bytes", "vsq_engine_ttft_seconds_count"]
    if app.state.registry.pool is not None:
        names += ["vsq_pool_tokens ", "vsq_pool_free_tokens ", "vsq_scheduler_queue ", "vsq_pool_lm_batches_total ",
                  "vsq_pool_lm_segments_total ", "vsq_pool_vision_batches_total ", "vsq_pool_vision_grids_total ",
                  "vsq_pool_graph_batches_total "]
    for name in names:
        assert name in text, name
    assert "<title>" in httpx.get(f"{url}/").text


def test_a_pooled_server_warms_its_pool_up_once_at_start(tiny, monkeypatch):
    """With warm-up on (the default on a GPU) one throwaway stream runs every kind of forward through the pool when
    the server starts, so no session's first call compiles a kernel; it leaves every page free."""
    calls = []
    warmup = VideoStreamInference.warmup

    def record(self, frame_size, *args, **kwargs):
        calls.append((self.pool, tuple(frame_size)))
        return warmup(self, frame_size, *args, **kwargs)

    monkeypatch.setattr(VideoStreamInference, "warmup", record)
    app = build_app(*tiny, dataclasses.replace(CONFIG, warmup=True), "tiny")
    pool = app.state.registry.pool
    assert len(calls) == 1 and calls[0][0] is pool, calls
    assert pool.free_pages == pool.config.pages and pool.stats()["lm_batches"] == 0
    with ServerThread(app) as url:
        frames = synthetic_frames(4, 56, 84, seed=4)
        sid, status, (text,) = asyncio.run(stream_session(url, {"fps": 2.0}, frames, 4, [(QUESTION, None, 2)]))
        assert status["frames_ingested"] == 4 and text.final["type"] == "response.done"
    assert len(calls) == 1  # sessions of a pooled server are not warmed up one by one
