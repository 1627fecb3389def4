"""open_video: files sampled by timestamp, damaged media reported, realtime pacing, iterables.

Every frame carries its source index as 10 black/white stripes (robust to mp4v/JPEG), so a test
can tell which source frame was delivered. Live sources (a loopback MJPEG stream):
``test_sources_live.py``.
"""
from __future__ import annotations

import re
import warnings

import cv2
import numpy as np
import pytest

from model.sources import VideoSourceWarning, open_video
from model.video_io import load_frames, read_video

H, W, BITS = 96, 160, 10


def coded_frame(i: int) -> np.ndarray:
    """A grey frame whose stripe b is white when bit b of i is set (RGB = BGR: no channel order issue)."""
    f = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if (i >> b) & 1:
            f[:, b * 16:(b + 1) * 16] = 255
    return f


def code_of(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if frame[H // 2, b * 16 + 8].mean() > 128)


def write_video(path, fps: float, n: int, fourcc: str = "mp4v") -> str:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(n):
        writer.write(coded_frame(i))
    writer.release()
    return str(path)


def test_opencv_has_ffmpeg():
    """The file and stream tests below read through this backend."""
    assert re.search(r"FFMPEG:\s+YES", cv2.getBuildInformation())


# ---------------------------------------------------------------- files sampled by timestamp

@pytest.mark.parametrize("src_fps", [23.976, 29.97, 10.0])
def test_file_sampled_to_2fps_by_timestamp(tmp_path, src_fps):
    """Each k/2 s instant gets the source frame nearest to it: timestamp within half a source frame, pixels of that frame.

    22 s is long enough for nearest and at-or-after (or every n-th frame) to differ at 23.976 and 29.97 fps.
    """
    n = int(round(src_fps * 22))
    path = write_video(tmp_path / f"v{src_fps}.mp4", src_fps, n)
    with open_video(path, fps=2.0) as video:
        got = [(t, code_of(f), f.shape, f.dtype) for t, f in video]
    assert [shape for *_, shape, _ in got] == [(H, W, 3)] * 44 and got[0][3] == np.uint8
    for k, (t, code, *_) in enumerate(got):
        assert abs(t - k / 2) <= 0.5 / src_fps + 1e-6, (k, t)
        assert code == round(k / 2 * src_fps), (k, t, code)  # the nearest source frame...
        assert abs(t - code / src_fps) < 1e-3  # ...and its own presentation time
    if src_fps != 10.0:
        codes = [code for _, code, *_ in got]
        assert codes != [int(np.ceil(k / 2 * src_fps)) for k in range(44)]  # not at-or-after
        assert codes != [k * round(src_fps / 2) for k in range(44)]  # not every n-th frame
    assert (video.frames_delivered, video.frames_read, video.frames_lost) == (44, n, 0)
    assert video.source_fps == pytest.approx(src_fps, rel=1e-3) and video.timestamp_source == "pos_msec"
    assert video.problems == []


def test_file_every_frame_and_max_seconds(tmp_path):
    path = write_video(tmp_path / "v.mp4", 29.97, 90)
    with open_video(path, fps=None) as video:
        codes = [code_of(f) for _, f in video]
    assert codes == list(range(90))
    with open_video(path, fps=None, max_seconds=1.0) as video:
        ts = [t for t, _ in video]
    assert len(ts) == 30 and ts[-1] < 1.0  # frame 30 is at 1.001 s
    with open_video(path, fps=2.0, max_seconds=1.0) as video:
        assert [round(t, 4) for t, _ in video] == [0.0, 0.5005]


def test_file_is_decoded_as_it_goes(tmp_path):
    """Taking one frame decodes about one frame, whatever the file's length."""
    path = write_video(tmp_path / "long.mp4", 30.0, 150)
    for fps in (None, 2.0):
        with open_video(path, fps=fps) as video:
            next(video)
            assert video.frames_read <= 2, (fps, video.frames_read)


def test_sampling_picks_the_nearest_frame_over_a_long_stream():
    """Over 60 s at 23.976 fps, nearest-frame and at-or-after-frame sampling differ; nearest is what we get."""
    src = 24000 / 1001
    frames = [np.full((2, 2, 3), i % 256, np.uint8) for i in range(int(60 * src))]
    got = list(open_video(frames, fps=2.0, source_fps=src))
    assert len(got) == 120
    indices = [round(t * src) for t, _ in got]
    assert indices == [round(k / 2 * src) for k in range(120)]
    assert any(i != int(np.ceil(k / 2 * src)) for k, i in enumerate(indices))  # not at-or-after
    assert all(f[0, 0, 0] == i % 256 for (_, f), i in zip(got, indices))


def test_iterable_of_timestamped_pairs_with_jitter():
    rng = np.random.default_rng(0)
    ts = np.cumsum(rng.uniform(0.02, 0.05, 200))  # irregular timestamps, about 28 fps
    pairs = [(float(t), np.full((2, 2, 3), i % 256, np.uint8)) for i, t in enumerate(ts)]
    with open_video(iter(pairs), fps=4.0) as video:
        got = list(video)
    assert video.timestamp_source == "given"
    for t, _ in got:
        k = round(t * 4)
        nearest = min(ts, key=lambda s: abs(s - k / 4))
        assert t == nearest, (t, k / 4, nearest)
    assert len({round(t * 4) for t, _ in got}) == len(got)  # one frame per instant


def test_iterable_errors_are_actionable():
    frame = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(TypeError, match="source_fps"):
        list(open_video([frame, frame]))  # bare frames need their rate
    with pytest.raises(TypeError, match="without source_fps"):
        list(open_video([(0.0, frame)], source_fps=10))
    with pytest.raises(ValueError, match="timestamps must increase"):
        list(open_video([(0.0, frame), (0.0, frame)]))
    with pytest.raises(TypeError, match="RGB uint8 HxWx3"):
        list(open_video([frame.astype(np.float32)], source_fps=10))
    with pytest.raises(ValueError, match="fps"):
        open_video([frame], fps=0, source_fps=10)
    with pytest.raises(ValueError, match="source_fps is only"):
        open_video("clip.mp4", source_fps=30)
    with pytest.raises(TypeError, match="source must be"):
        open_video(3.5)


# ---------------------------------------------------------------- bad and broken media

def test_missing_and_non_video_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot open video: .*missing\.mp4: no such file"):
        open_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 20)
    with pytest.raises(ValueError, match=r"Cannot open video: .*notes\.mp4"):
        open_video(text)
    with pytest.raises(ValueError, match="directory"):
        open_video(tmp_path)
    with pytest.raises(ValueError, match="Cannot open video.*VIDEO_PATH"):
        read_video(tmp_path / "missing.mp4")


@pytest.mark.parametrize("fps", [1e308, float("nan"), float("inf"), -2.0, 0, 5000, 0.001, "2", True])
def test_an_absurd_fps_is_refused_naming_fps_and_the_range(tmp_path, fps):
    path = write_video(tmp_path / "v.mp4", 10.0, 5)
    with pytest.raises(ValueError, match=r"fps must be a number of frames per second between 0\.01 and 1000"
                                         r" \(or None for every frame\), got"):
        open_video(path, fps=fps)
    assert len(list(open_video(path, fps=1000))) == 5 and len(list(open_video(path, fps=0.01))) == 1  # the bounds


@pytest.mark.parametrize("option", [dict(timeout_s=1e308), dict(timeout_s=float("inf")), dict(timeout_s=0),
                                    dict(reconnect_delay_s=float("inf")), dict(reconnect_delay_s=float("nan"))])
def test_absurd_live_timeouts_are_refused_naming_them(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        open_video("http://127.0.0.1:9/never-opened.mjpg", **option)


def test_a_url_of_another_scheme_is_refused_without_its_secrets():
    with pytest.raises(ValueError, match=r"ftp://admin:\*\*\*@host/v\.mp4\?token=\*\*\*: no such file") as e:
        open_video("ftp://admin:hunter2@host/v.mp4?token=hunter2")
    assert "hunter2" not in str(e.value)


def test_corrupt_bytes_mid_file_deliver_the_rest_and_warn_once(tmp_path):
    """VOP headers of frames 60-62 and 100 are overwritten: each damaged run is warned once, with where and how
    many frames; every other frame is delivered at its own timestamp."""
    path = write_video(tmp_path / "clip.mp4", 29.97, 120)
    data = bytearray(open(path, "rb").read())
    vops = [m.start() for m in re.finditer(b"\x00\x00\x01\xb6", bytes(data))]  # one MPEG-4 VOP per frame
    assert len(vops) == 120
    for k in (60, 61, 62, 100):
        data[vops[k]:vops[k] + 12] = b"\xff" * 12
    open(path, "wb").write(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_video(path, fps=None) as video:
            got = [(t, code_of(f)) for t, f in video]
    messages = [str(w.message) for w in caught if issubclass(w.category, VideoSourceWarning)]
    assert len(messages) == 2, messages
    assert "3 frames between t=1.969 s and t=2.102 s could not be decoded" in messages[0] and path in messages[0]
    assert "1 frame between t=3.303 s and t=3.370 s could not be decoded" in messages[1]
    assert video.problems == [m.split(": ", 1)[1] for m in messages]
    assert (video.frames_lost, video.frames_delivered, video.frames_read) == (4, 116, 116)
    indices = [round(t * 29.97) for t, _ in got]
    assert indices == [i for i in range(120) if i not in (60, 61, 62, 100)]  # the frames that decoded, at their times
    assert [c for _, c in got[:60]] == list(range(60))  # before the damage: exact
    assert [c for _, c in got[-8:]] == list(range(112, 120))  # after the next keyframe: exact again


def test_truncated_file_delivers_what_exists_and_reports_the_loss(tmp_path):
    """An AVI cut where frame 40 starts: its header still promises 60; frames 0-39 come out, the loss is warned once."""
    path = write_video(tmp_path / "clip.avi", 29.97, 60)
    data = open(path, "rb").read()
    vops = [m.start() for m in re.finditer(b"\x00\x00\x01\xb6", data)]  # one MPEG-4 VOP per frame
    open(path, "wb").write(data[: vops[40]])
    with pytest.warns(VideoSourceWarning, match=r"20 of the 60 frames the container promises could not be decoded") as rec:
        with open_video(path, fps=None) as video:
            got = [(t, code_of(f)) for t, f in video]
    assert len(rec) == 1 and "t=1.301 s" in str(rec[0].message) and path in str(rec[0].message)
    assert [c for _, c in got] == list(range(40)) and [round(t * 29.97) for t, _ in got] == list(range(40))
    assert (video.frame_count, video.frames_delivered, video.frames_lost) == (60, 40, 20)
    # An mp4 cut short loses its index (the moov box comes last): it cannot be opened at all.
    mp4 = write_video(tmp_path / "clip.mp4", 29.97, 60)
    cut = open(mp4, "rb").read()
    open(mp4, "wb").write(cut[: len(cut) // 2])
    with pytest.raises(ValueError, match="Cannot open video"):
        open_video(mp4)


# ---------------------------------------------------------------- realtime pacing

class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def time(self):
        return self.now

    def sleep(self, s):
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


def test_realtime_paces_a_file_and_drops_when_the_consumer_falls_behind(tmp_path):
    path = write_video(tmp_path / "v.mp4", 10.0, 30)
    clock = FakeClock()
    with open_video(path, fps=None, realtime=True, clock=clock.time, sleep=clock.sleep) as video:
        for i in range(10):  # on time: each frame released at start + t
            t, frame = next(video)
            assert clock.now - 100.0 == pytest.approx(t) and code_of(frame) == i
        assert clock.sleeps == pytest.approx([0.1] * 9)
        clock.now += 0.35  # the consumer works 0.35 s after frame 9 (t=0.9): frames 1.0 and 1.1 are stale
        t, frame = next(video)
        assert (round(t, 3), code_of(frame), video.frames_dropped) == (1.2, 12, 2)
        assert len(clock.sleeps) == 9  # late: no sleep
        t, frame = next(video)
        assert (round(t, 3), code_of(frame)) == (1.3, 13) and clock.sleeps[-1] == pytest.approx(0.05)
    with open_video(path, fps=None, clock=clock.time, sleep=clock.sleep) as video:
        assert len(list(video)) == 30 and len(clock.sleeps) == 10  # not realtime: never sleeps


# ---------------------------------------------------------------- video_io on top of open_video

def test_read_video_and_load_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", 29.97, 45)
    frames, fps = read_video(path, seconds=1.0)
    assert fps == pytest.approx(29.97) and [code_of(f) for f in frames] == list(range(30))
    frames, fps = load_frames(None, 0.5, fps=10, size=64)
    assert fps == 10 and len(frames) == 5 and frames[0].shape == (64, 64, 3)
