"""LiveStream: a source streamed into an engine by a thread (or up to a time) while questions are asked.

The reference for every check is a plain sequential engine fed the same frames in the same
chunks: the live stream must equal it bit for bit (cache, every state field, a question's logits).
"""
from __future__ import annotations

import threading

import pytest
import torch

from model import VideoStreamInference
from model.live import LiveStream
from model.sources import open_video
from model.synthetic import synthetic_frames, write_synthetic_video
from tests.conftest import assert_same_signature, signature

H, W = 112, 140
QUESTION = "What is happening now?"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """5 s at 10 fps: 10 frames at 2 fps (timestamps 0, 0.5, ... 4.5)."""
    return write_synthetic_video(tmp_path_factory.mktemp("live") / "clip.mp4", 5.0, 10.0, H, W)


def sampled(path, fps=2.0) -> list:
    with open_video(path, fps=fps) as src:
        return [frame for _, frame in src]


def reference(tiny, frames, sizes, fps=2.0) -> VideoStreamInference:
    """A sequential engine fed ``frames`` in chunks of ``sizes``."""
    assert sum(sizes) == len(frames)
    engine, i = VideoStreamInference(*tiny), 0
    for n in sizes:
        engine.append_frames(frames[i:i + n], fps=fps)
        i += n
    return engine


def chunked(n: int, chunk: int) -> list[int]:
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


def assert_same_stream(live_engine, ref_engine) -> None:
    assert live_engine.stream_state.frames_seen == ref_engine.stream_state.frames_seen
    assert live_engine.kv.get_seq_length() == ref_engine.kv.get_seq_length()
    assert_same_signature(signature(ref_engine), signature(live_engine))
    a, b = live_engine.ask(QUESTION, max_new_tokens=3), ref_engine.ask(QUESTION, max_new_tokens=3)
    assert torch.equal(a.first_logits, b.first_logits) and a.token_ids == b.token_ids


def gated_pairs(n: int, gate_after: int, gate: threading.Event, reached: threading.Event, error=None):
    """(t, frame) pairs at 2 fps; after ``gate_after`` frames, wait for ``gate``; then ``error`` if given."""
    frames = synthetic_frames(n, H, W, seed=1)
    for i, frame in enumerate(frames):
        if i == gate_after:
            reached.set()
            assert gate.wait(10), "the test never opened the gate"
        yield i / 2.0, frame
    if error is not None:
        raise error


def test_ingests_the_whole_file_while_questions_are_asked(tiny, video):
    engine = VideoStreamInference(*tiny)
    asked = 0
    with LiveStream(engine, video, chunk=4, fps=2.0) as live:
        while live.running:  # questions race the appends: the lock orders them
            engine.ask(QUESTION, max_new_tokens=2)
            engine.ask_choice("Which shape?", ["circle", "square", "triangle"])
            with engine.ask_stream("Describe it.", max_new_tokens=8) as pieces:
                next(pieces, None)  # break out early: rolled back
            asked += 1
        assert live.wait(10)
    p = live.progress
    assert (p.frames, p.chunks, p.dropped, p.video_s, p.ended, p.error) == (10, 3, 0, 4.5, True, None)
    assert p.last_chunk_ms is not None and p.last_chunk_ms > 0 and not p.running
    assert asked >= 1
    assert_same_stream(engine, reference(tiny, sampled(video), [4, 4, 2]))


def test_a_question_mid_stream_sees_exactly_the_chunks_appended(tiny):
    gate, reached = threading.Event(), threading.Event()
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, gated_pairs(10, 6, gate, reached), chunk=4, fps=2.0).start()
    try:
        assert reached.wait(10)
        frames = synthetic_frames(10, H, W, seed=1)
        mid = reference(tiny, frames[:4], [4])  # frames 5 and 6 wait in the unfinished chunk
        assert live.progress.frames == 4 and live.progress.video_s == 1.5
        assert_same_stream(engine, mid)
    finally:
        gate.set()
    assert live.wait(10) and live.stop() is True
    assert_same_stream(engine, reference(tiny, frames, [4, 4, 2]))


def test_stop_midway_leaves_a_consistent_stream(tiny, tmp_path):
    path = write_synthetic_video(tmp_path / "long.mp4", 20.0, 5.0, H, W)  # 40 frames at 2 fps
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, path, chunk=4).start()
    while live.progress.frames < 4 and live.running:
        engine.ask(QUESTION, max_new_tokens=1)
    assert live.stop(timeout=10) is True
    p = live.progress
    assert 4 <= p.frames < 40, "the stream should have been stopped midway"
    assert not p.running and p.error is None and live.source.closed
    assert engine.stream_state.frames_seen == p.frames and engine.stream_state.chunks == p.chunks
    frames = sampled(path)[:p.frames]
    assert_same_stream(engine, reference(tiny, frames, chunked(p.frames, 4)))
    with pytest.raises(RuntimeError, match="runs once"):
        live.start()


def test_paused_holds_the_appends_so_a_question_knows_what_it_saw(tiny, tmp_path):
    path = write_synthetic_video(tmp_path / "long.mp4", 20.0, 5.0, H, W)  # 40 frames at 2 fps
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, path, chunk=4).start()
    while live.progress.frames < 4 and live.running:
        threading.Event().wait(0.005)
    with live.paused() as p:
        engine.ask(QUESTION, max_new_tokens=1)
        threading.Event().wait(0.3)  # long enough for the thread to finish the file if it were not held
        assert live.progress.frames == p.frames == engine.stream_state.frames_seen < 40
        with pytest.raises(RuntimeError, match="paused"):
            live.stop()
    assert live.wait(30) and live.progress.frames == 40 and live.stop()


@pytest.mark.parametrize("flush, expected", [(True, [4, 3]), (False, [4])])
def test_stop_appends_the_unfinished_chunk_only_when_asked(tiny, flush, expected):
    gate, reached = threading.Event(), threading.Event()
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, gated_pairs(10, 6, gate, reached), chunk=4).start()
    assert reached.wait(10)
    threading.Timer(0.2, gate.set).start()  # frame 7 arrives after stop() was asked
    assert live.stop(timeout=10, flush=flush) is True
    assert_same_stream(engine, reference(tiny, synthetic_frames(10, H, W, seed=1)[:sum(expected)], expected))


def test_a_source_error_is_raised_by_stop_and_the_frames_before_it_stay(tiny):
    gate, reached = threading.Event(), threading.Event()
    gate.set()
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, gated_pairs(6, 99, gate, reached, ConnectionError("camera 0 disconnected")),
                      chunk=4).start()
    assert live.wait(10)
    assert isinstance(live.progress.error, ConnectionError) and live.progress.ended
    with pytest.raises(ConnectionError, match="disconnected"):
        live.stop()
    assert live.stop() is True and isinstance(live.error, ConnectionError)  # raised once, kept
    assert_same_stream(engine, reference(tiny, synthetic_frames(6, H, W, seed=1), [4, 2]))


def test_an_error_leaving_a_with_block_is_raised_there(tiny):
    bad = [(0.0, synthetic_frames(1, H, W)[0]), (0.5, "not a frame")]
    engine = VideoStreamInference(*tiny)
    with pytest.raises(TypeError, match="item 1 of the iterable"):
        with LiveStream(engine, bad, chunk=4) as live:
            live.wait(10)
    assert engine.stream_state.frames_seen == 1  # the frame before the bad one was appended


def test_an_engine_error_stops_the_stream_and_is_reported(tiny):
    tiny_frames = [(i / 2, synthetic_frames(1, 4, 4)[0]) for i in range(3)]  # below the processor minimum
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, tiny_frames, chunk=2).start()
    assert live.wait(10)
    assert isinstance(live.error, ValueError) and live.progress.frames == 0
    assert engine.stream_state.frames_seen == 0 and engine.kv.get_seq_length() == 0
    with pytest.raises(ValueError):
        live.stop()


def test_advance_appends_exactly_the_frames_up_to_a_time(tiny, video):
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, video, chunk=4)
    assert live.advance(until_s=1.0).frames == 3  # 0, 0.5, 1.0: one partial chunk
    assert live.advance(until_s=1.0).frames == 3  # nothing new up to the same time
    p = live.advance(until_s=3.2)  # 1.5 .. 3.0: 4 frames
    assert (p.frames, p.chunks, p.video_s, p.ended) == (7, 2, 3.0, False)
    p = live.advance()
    assert (p.frames, p.chunks, p.video_s, p.ended) == (10, 3, 4.5, True)
    assert live.advance(until_s=99).frames == 10 and live.stop() is True
    assert_same_stream(engine, reference(tiny, sampled(video), [3, 4, 3]))
    with pytest.raises(RuntimeError, match="runs once"):
        live.start()


def test_advance_raises_a_source_error_once(tiny):
    gate, reached = threading.Event(), threading.Event()
    gate.set()
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, gated_pairs(5, 99, gate, reached, ConnectionError("gone")), chunk=2)
    with pytest.raises(ConnectionError):
        live.advance(until_s=10)
    assert live.advance().frames == 5 and live.stop() is True and isinstance(live.error, ConnectionError)
    assert engine.stream_state.frames_seen == 5


def test_realtime_pacing_is_cut_short_by_stop(tiny, video):
    engine = VideoStreamInference(*tiny)
    live = LiveStream(engine, video, chunk=1, fps=0.25, realtime=True).start()  # frames at 0 s and 4 s
    while live.progress.frames == 0 and live.running:
        threading.Event().wait(0.01)
    assert live.stop(timeout=2.5) is True  # not 4 s: the pacing sleep is interrupted
    assert engine.stream_state.frames_seen == live.progress.frames >= 1


def test_bad_arguments_are_refused(tiny, video, tmp_path):
    engine = VideoStreamInference(*tiny)
    with pytest.raises(ValueError, match="chunk"):
        LiveStream(engine, video, chunk=0)
    with pytest.raises(TypeError, match="engine"):
        LiveStream(object(), video)
    with pytest.raises(ValueError, match="fps"):
        LiveStream(engine, video, fps=0)
    with pytest.raises(ValueError, match="missing.mp4"):
        LiveStream(engine, str(tmp_path / "missing.mp4")).start()
    with open_video(video, fps=None) as every_frame:
        with pytest.raises(ValueError, match="fps"):
            LiveStream(engine, every_frame)
    with open_video(video, fps=2.0) as src, pytest.raises(ValueError, match="realtime"):
        LiveStream(engine, src, realtime=True)
    live = LiveStream(engine, video).start()
    with pytest.raises(RuntimeError):
        live.start()
    with pytest.raises(RuntimeError, match="advance"):
        live.advance()
    assert live.stop(timeout=10)


def test_repr_masks_the_url_before_and_after_start(tiny):
    url = "rtsp://admin:hunter2@127.0.0.1:9/live?password=hunter2&api_key=hunter2"
    live = LiveStream(VideoStreamInference(*tiny), url)
    assert "hunter2" not in repr(live) and "admin:***@" in repr(live) and "password=***" in repr(live)
    with pytest.raises(ConnectionError) as e:
        live.start()
    assert "hunter2" not in str(e.value) and "hunter2" not in repr(live)


def test_start_inside_the_with_block_that_started_it_does_nothing(tiny, video):
    engine = VideoStreamInference(*tiny)
    with LiveStream(engine, video, chunk=4) as live:
        assert live.start() is live  # `with` started it: no second run, no error
        assert live.wait(30)
    p = live.progress
    assert (p.frames, p.chunks, p.ended, p.error) == (10, 3, True, None)  # streamed once
    assert_same_stream(engine, reference(tiny, sampled(video), [4, 4, 2]))
    with pytest.raises(RuntimeError, match="runs once"):  # after the block it has stopped
        live.start()
    started = LiveStream(VideoStreamInference(*tiny), video).start()
    with started:  # started by hand: `with` only stops it, and a second start() is still an error
        with pytest.raises(RuntimeError, match="runs once"):
            started.start()
