"""open_video on live sources: an MJPEG stream served by an http.server thread on 127.0.0.1.

Read through OpenCV's FFMPEG backend; each handler sends a bounded number of frames and stops
when the client goes away. Frames carry their index as stripes (``test_sources.coded_frame``), so
a test can tell which frame was delivered: a slow consumer gets the newest, drops are counted,
disconnects raise ``ConnectionError`` naming the source, reconnects are bounded, passwords are
masked in messages.
"""
from __future__ import annotations

import http.server
import re
import threading
import time

import cv2
import pytest

from model.sources import VideoSourceWarning, open_video
from tests.test_sources import code_of, coded_frame


class MJPEGServer:
    """multipart/x-mixed-replace JPEG frames of ``coded_frame(512 * connection + i)`` at ``rate`` fps.

    Serves ``per_connection`` frames per connection to at most ``connections`` clients (503 after);
    the frames numbered in ``corrupt`` are sent as bytes that are not a JPEG (the multipart framing intact).
    """

    def __init__(self, rate: float, per_connection: int, connections: int = 1, corrupt=()):
        self.sent, self.served = 0, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                conn, server.served = server.served, server.served + 1
                if conn >= connections:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(per_connection):
                        jpg = cv2.imencode(".jpg", coded_frame(512 * conn + i))[1].tobytes()
                        if i in corrupt:
                            jpg = b"\x00not a jpeg" * (len(jpg) // 11)
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                                         + jpg + b"\r\n")
                        self.wfile.flush()
                        server.sent = 512 * conn + i + 1
                        time.sleep(1.0 / rate)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow  # a live source at real time
def test_live_stream_slow_consumer_gets_the_newest_frame_and_drops_are_counted():
    with MJPEGServer(rate=50, per_connection=250) as server:
        with open_video(server.url, fps=None, timeout_s=5) as video:
            next(video)
            for _ in range(3):
                time.sleep(0.4)  # a slow consumer: ~20 frames arrive meanwhile
                sent = server.sent
                t, frame = next(video)
                assert sent - 6 <= code_of(frame) <= server.sent, (code_of(frame), sent)  # the newest, not the oldest
            assert video.frames_dropped >= 30 and video.frames_delivered == 4
            unaccounted = video.frames_read - video.frames_delivered - video.frames_dropped - len(video._buffer)
            assert unaccounted in (0, 1)  # 1: a frame read by the thread but not yet in the buffer
            assert video.timestamp_source == "wall_clock" and 20 < video.source_fps < 70
            assert 1.0 < t < 2.5
        assert not video._thread.is_alive()


def test_live_stream_sampled_and_limited_by_max_seconds():
    with MJPEGServer(rate=50, per_connection=250) as server:
        with open_video(server.url, fps=10, max_seconds=0.6, timeout_s=5) as video:
            got = [(t, code_of(f)) for t, f in video]  # ends by itself, no error
    ts, codes = [t for t, _ in got], [c for _, c in got]
    assert len(got) == 6 and ts[-1] < 0.6  # instants 0, 0.1, ..., 0.5
    assert all(abs(t - k / 10) < 0.04 for k, t in enumerate(ts)), ts  # the frame that arrived nearest k/10 s
    assert all(b > a for a, b in zip(codes, codes[1:]))


def test_live_disconnect_raises_connection_error_naming_the_source():
    with MJPEGServer(rate=200, per_connection=30) as server:
        got = []
        with pytest.raises(ConnectionError, match=re.escape(server.url) + ".*pass reconnect=N"):
            with pytest.warns(VideoSourceWarning, match="disconnected"):
                with open_video(server.url, fps=None, buffer_frames=64, timeout_s=5) as video:
                    for _, frame in video:
                        got.append(code_of(frame))
    assert got == list(range(30))  # every frame yielded before the error stays with the caller


def test_a_corrupt_frame_is_counted_as_damaged_and_reading_goes_on():
    with MJPEGServer(rate=200, per_connection=30, corrupt={5, 6, 20}) as server:
        got = []
        with pytest.raises(ConnectionError, match="disconnected at .* after 27 frames; pass reconnect=N"):
            with pytest.warns(VideoSourceWarning) as rec:
                with open_video(server.url, fps=None, buffer_frames=64, timeout_s=5) as video:
                    for _, frame in video:
                        got.append(code_of(frame))
    assert got == [i for i in range(30) if i not in (5, 6, 20)]  # the frames after the damage too
    assert video.frames_lost == 3 and video.frames_read == 27 and video.reconnects == 0
    damaged = [p for p in video.problems if "damaged" in p]
    assert len(damaged) == 2 and damaged[0].startswith("2 frames between t=") and damaged[1].startswith("1 frame ")
    assert all("reading went on" in p for p in damaged)
    assert [str(w.message).split(": ", 1)[1] for w in rec] == damaged + [p for p in video.problems if "disconnected" in p]


def test_live_reconnect_then_give_up():
    with MJPEGServer(rate=200, per_connection=20, connections=2) as server:
        got = []
        with pytest.raises(ConnectionError, match="2 reconnect attempts failed"):
            with pytest.warns(VideoSourceWarning, match="disconnected") as rec:
                with open_video(server.url, fps=None, buffer_frames=64, reconnect=2, reconnect_delay_s=0.05,
                                timeout_s=5) as video:
                    for _, frame in video:
                        got.append(code_of(frame))
    assert video.reconnects == 1 and server.served == 4  # 2 connections served, 2 refused attempts
    assert got == list(range(20)) + list(range(512, 532))
    assert [str(w.message).split(": ", 1)[1] for w in rec] == [p for p in video.problems if "disconnected" in p]
    assert len(rec) == 2 and "after 20 frames" in str(rec[0].message) and "after 40 frames" in str(rec[1].message)
    assert any("reconnected (attempt 1 of 2)" in p for p in video.problems)


def test_unopenable_live_sources_raise_connection_error():
    with MJPEGServer(rate=50, per_connection=1, connections=0) as server:
        with pytest.raises(ConnectionError, match="Cannot open video stream " + re.escape(server.url)):
            open_video(server.url, timeout_s=2)
    with pytest.raises(ConnectionError, match="camera 97"):
        open_video(97)


SECRET = "hunter2"


def with_secrets(url: str) -> str:
    """``url`` with a password in its authority and in query parameters (the server ignores both)."""
    scheme, rest = url.split("://")
    return (f"{scheme}://admin:{SECRET}@{rest}?user=a&password={SECRET}&api_key={SECRET}&Access_Token={SECRET}"
            f"&X-Amz-Signature={SECRET}&fps=5")


def test_url_secrets_are_masked():
    from model.sources import masked_url

    assert masked_url("rtsp://admin:secret@10.0.0.2:554/live") == "rtsp://admin:***@10.0.0.2:554/live"
    for plain in ("http://host/x.mjpg", "http://host/x.mjpg?user=bob&fps=5&keyframes", "clip.mp4", "dir/a?password=b.mp4"):
        assert masked_url(plain) == plain  # nothing secret (a path is not a URL)
    assert masked_url("http://h/s?user=a&password=x") == "http://h/s?user=a&password=***"
    assert masked_url("rtsp://h/s?PWD=x&passwd=y") == "rtsp://h/s?PWD=***&passwd=***"
    assert masked_url("https://h/s?api_key=x&access_token=y&client_secret=z&auth=w") == \
        "https://h/s?api_key=***&access_token=***&client_secret=***&auth=***"
    assert masked_url("https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab&X-Amz-Expires=60") == \
        "https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    assert masked_url("https://h/cb#access_token=x&state=1") == "https://h/cb#access_token=***&state=1"
    assert masked_url("http://u:p@h/s?token=t#sig=s") == "http://u:***@h/s?token=***#sig=***"
    assert "x" not in masked_url("http://[::1/s?password=x").split("://", 1)[1]  # unparsable: hidden whole


def test_url_secrets_never_reach_messages_warnings_or_the_terminal(capfd):
    with MJPEGServer(rate=200, per_connection=10) as server:
        url = with_secrets(server.url)
        shown = []
        with pytest.raises(ConnectionError) as disconnect:
            with pytest.warns(VideoSourceWarning) as rec:
                with open_video(url, fps=None, buffer_frames=64, timeout_s=5) as video:
                    shown += [repr(video), video.source, video._thread.name]
                    assert len([f for _, f in video]) == 10
        shown += [str(disconnect.value), repr(video), *video.problems, *(str(w.message) for w in rec)]
    with MJPEGServer(rate=50, per_connection=1, connections=0) as refusing:
        with pytest.raises(ConnectionError) as refused:
            open_video(with_secrets(refusing.url), timeout_s=2)
    shown.append(str(refused.value))
    out, err = capfd.readouterr()  # OpenCV's and FFmpeg's own logs too
    assert all(SECRET not in text for text in shown + [out, err]), [t for t in shown + [out, err] if SECRET in t]
    assert "admin:***@" in str(disconnect.value) and "password=***&api_key=***" in str(refused.value)
