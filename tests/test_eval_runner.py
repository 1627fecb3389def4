"""The streaming-benchmark runner (model.eval) on a miniature benchmark (``tests/minibench.py``).

Three synthetic videos with known events (shapes appearing at known times), annotations in
both formats (forward probes with several realtime entries, several questions at one
timestamp, a malformed entry, a missing video): the runner completes, writes the report,
resumes after an interruption without redoing events, and in parity mode every streamed
choice equals the offline (native) choice in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model import VideoStreamInference
from model.eval import EvalConfig, read_annotations, run_benchmark, write_report
from model.eval.__main__ import main as cli_main
from model.eval.scoring import parity_check
from tests.minibench import OVO_EVENTS, write_minibench


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_minibench(tmp_path_factory.mktemp("minibench"))


@pytest.fixture
def engine(tiny):
    return VideoStreamInference(*tiny)


class Spy:
    """Counts the engine's answering calls (to prove that resumed events are not recomputed)."""

    def __init__(self, engine):
        self.calls = 0
        original = engine.ask_choice

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        engine.ask_choice = counted


class Stop(Exception):
    pass


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _config(**kw) -> EvalConfig:
    return EvalConfig(**{"fps": 2.0, "modes": ("stream", "window"), "window_frames": 3, "chunk_frames": 3,
                         "progress": False, **kw})


# ------------------------------------------------------------------ the runner

@pytest.mark.slow
def test_ovo_run_completes_reports_and_resumes_without_redoing_events(bench, engine, tiny, tmp_path):
    ann = read_annotations("ovo", bench / "ovo.json")
    root = bench / "videos_root"
    out = tmp_path / "resumed"

    def stop_after(n):
        count = [0]

        def hook(record):
            count[0] += 1
            if count[0] == n:
                raise Stop()
        return hook

    with pytest.raises(Stop):  # interrupted in the middle of the first video's stream pass
        run_benchmark(engine, ann, root, out, _config(), "tiny", on_record=stop_after(2))
    first = _lines(out)
    assert len(first) == 2 and {r["mode"] for r in first} == {"stream"}
    jsonl = out / "results.jsonl"
    jsonl.write_bytes(jsonl.read_bytes().rstrip(b"\n"))  # the last newline lost (an editor, a copy)

    spy = Spy(engine)
    result = run_benchmark(engine, ann, root, out, _config(), "tiny")
    records = _lines(out)
    answerable = OVO_EVENTS - 1  # the missing video's question cannot be answered
    keys = [(r["mode"], r["event_id"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * answerable, "each event once per mode"
    assert records[:2] == first, "answered events are kept as they were"
    warm_up = 2  # one unrecorded question (2 scorer calls) before the first timed one
    assert spy.calls == warm_up + 2 * (2 * answerable - 2), "only the unanswered events were asked (2 calls each)"
    assert result.completed and result.new_records == 2 * answerable - 2
    resumed = next(r for r in records[2:] if r["mode"] == "stream")
    assert resumed["ingest_frames"] == resumed["frames"] == 5, "the stream re-ingests the video up to t=2.0"
    assert [p.video for p in result.problems if p.index is None] == ["ovo/missing.mp4"]

    window = {r["event_id"]: r for r in records if r["mode"] == "window"}
    assert window["3#2"]["frames"] == 3 and window["4#0"]["frames"] == 2, "window: the last N frames only"
    stream = {r["event_id"]: r for r in records if r["mode"] == "stream"}
    assert stream["3#2"]["frames"] == 8 and stream["0"]["frames"] == stream["1"]["frames"] == 5
    assert stream["1"]["ingest_frames"] + stream["0"]["ingest_frames"] == 5, "one ingest for two questions at t=2"

    # the resumed results equal an uninterrupted run's (streaming is exact whatever the chunking)
    fresh = run_benchmark(VideoStreamInference(*tiny), ann, root, tmp_path / "fresh",
                          _config(modes="stream", chunk_frames=8), "tiny")
    fresh_by_key = {(r["mode"], r["event_id"]): r for r in fresh.records}
    for r in (r for r in records if r["mode"] == "stream"):
        f = fresh_by_key[(r["mode"], r["event_id"])]
        for scorer in ("choice", "choice_norm", "letter"):
            assert r[scorer]["index"] == f[scorer]["index"], (r["event_id"], scorer)
            assert np.allclose(r[scorer]["scores"], f[scorer]["scores"], atol=1e-4, rtol=0)

    spy.calls = 0  # a third run has nothing left to do (a torn last line, a write cut off, is dropped)
    jsonl.write_bytes(jsonl.read_bytes() + jsonl.read_bytes()[:40])
    again = run_benchmark(engine, ann, root, out, _config(), "tiny")
    assert again.new_records == 0 and spy.calls == 0 and len(_lines(out)) == 2 * answerable

    paths = write_report(out, result)
    summary = json.loads(Path(paths["json"]).read_text())
    for mode in ("stream", "window"):
        m = summary["modes"][mode]
        assert m["answered"] == answerable and m["expected"] == OVO_EVENTS
        acc = m["accuracy"]["letter"]
        assert set(acc["categories"]) == {"real-time", "backward", "forward"}
        assert acc["tasks"]["REC"]["n"] == 3 and acc["tasks"]["CRR"]["n"] == 4
        assert acc["categories"]["forward"]["tasks"] == 3
        cats = [c["acc"] for c in acc["categories"].values()]
        assert acc["overall"] == pytest.approx(np.mean(cats))
        rb = [acc["categories"][c]["acc"] for c in ("real-time", "backward")]
        assert acc["realtime_backward"] == pytest.approx(np.mean(rb))
        assert m["latency_s"]["choice"]["n"] == answerable and m["latency_s"]["letter"]["p95"] > 0
        assert m["ingest"]["frames_per_s"] > 0 and m["memory_mib"]
    assert summary["modes"]["window"]["latency_with_prefill_s"]["choice"]["p50"] > 0
    assert {(p["index"], p["video"]) for p in summary["problems"]} == {(7, None), (None, "ovo/missing.mp4")}
    md = Path(paths["markdown"]).read_text()
    assert "| **forward** |" in md and "| REC | 3 |" in md and "entry 7:" in md and "real-time + backward" in md
    png = Path(paths["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    with pytest.raises(ValueError, match="other settings.*fps"):  # resuming with other settings is refused
        run_benchmark(engine, ann, root, out, _config(fps=1.0), "tiny")


@pytest.mark.slow
def test_parity_streamed_choices_equal_offline_choices_in_fp32(bench, engine, tmp_path):
    ann = read_annotations("streamingbench", bench / "sb.json")
    out = tmp_path / "sb-parity"
    result = run_benchmark(engine, ann, bench / "videos_root", out, _config(modes="stream,reprefill", parity=100),
                           "tiny")
    reprefill = {r["event_id"]: r for r in _lines(out) if r["mode"] == "reprefill"}
    records = [r for r in _lines(out) if r["mode"] == "stream"]
    assert len(records) == len(reprefill) == len(ann.events) == 4 and all("parity" in r for r in records)
    for r in records:  # one full prefill per question answers as the stream does
        full = reprefill[r["event_id"]]
        assert full["frames"] == full["ingest_frames"] == r["frames"] and "parity" not in full
        for scorer in ("choice", "letter"):
            assert full[scorer]["index"] == r[scorer]["index"]
            assert np.allclose(full[scorer]["scores"], r[scorer]["scores"], atol=1e-4, rtol=0)
    for r in records:
        p = r["parity"]
        assert p["dtype"] == "float32" and p["same_choice"] and not p["failed"], (r["event_id"], p)
        assert p["choice"]["offline_index"] == r["choice"]["index"]
        assert p["letter"]["offline_index"] == r["letter"]["index"]
        assert p["choice"]["max_abs_score_diff"] < 1e-3 and p["letter"]["max_abs_score_diff"] < 1e-3
        assert p["max_abs_logit_diff"] < 1e-3 and p["frames"] == r["frames"]
    assert {r["frames"] for r in records} == {3, 5, 6}  # t = 1, 2, 3 s at 2 fps
    summary = write_report(out, result)["summary"]
    assert summary["parity"]["events"] == 4 and summary["parity"]["failed"] == 0
    assert summary["modes"]["stream"]["accuracy"]["choice"]["overall"] == pytest.approx(
        100 * np.mean([r["choice"]["correct"] for r in records]))

    # the check can fail: a streamed record that chose another option is caught
    r = records[0]
    event = next(e for e in ann.events if e.event_id == r["event_id"])
    wrong = {**r, "choice": {**r["choice"], "index": (r["parity"]["choice"]["offline_index"] + 1) % 4}}
    frames_seen = _decoded_frames(bench / "videos_root" / "videos/sb0.mp4", event.t_seconds)
    verdict = parity_check(engine, event, wrong, frames_seen, 2.0)
    assert verdict["choice"]["offline_index"] == r["parity"]["choice"]["offline_index"]
    assert not verdict["choice"]["same_choice"] and not verdict["same_choice"]
    assert verdict["failed"] == (verdict["choice"]["offline_margin"] > 1e-3)
    assert verdict["choice"]["max_abs_score_diff"] < 1e-3, "recomputed offline scores equal the first ones"


def _decoded_frames(path: Path, until: float) -> list:
    from model.eval.videos import decode_video

    return decode_video(path, 2.0, until)[1]


@pytest.mark.slow
def test_cli_runs_a_benchmark_and_names_a_missing_model(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("QWEN_MODEL_PATH", raising=False)
    torch.manual_seed(0)
    args = ["--benchmark", "streamingbench", "--annotations", str(bench / "sb.json"), "--device", "cpu",
            "--video-root", str(bench / "videos_root"), "--out", str(tmp_path / "cli"), "--no-progress"]
    assert cli_main(args + ["--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    monkeypatch.setenv("QWEN_MODEL_PATH", str(tmp_path / "env-model"))
    assert cli_main(args) == 2 and "env-model" in capsys.readouterr().err
    monkeypatch.delenv("QWEN_MODEL_PATH")
    assert cli_main(args + ["--modes", "bounded"]) == 2 and "bounded" in capsys.readouterr().err

    assert cli_main(args + ["--limit", "3", "--generate", "2", "--window-frames", "2"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "RANDOM WEIGHTS" in captured.out  # banner, and in the report
    records = _lines(tmp_path / "cli")
    assert len(records) == 6 and all("generate" in r and "text" in r["generate"] for r in records)
    summary = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert summary["completed"] and "generate" in summary["modes"]["stream"]["latency_s"]
    assert all((tmp_path / "cli" / f).exists() for f in ("report.md", "report.png", "run.json"))

    # random weights say so in the report's title and the plot's; the window's latency bar includes its re-prefill
    from model.eval.report import plot
    assert "RANDOM WEIGHTS: accuracy meaningless" in (tmp_path / "cli" / "report.md").read_text().splitlines()[0]
    fig = plot(summary, tmp_path / "plot.png")
    assert "RANDOM WEIGHTS: accuracy meaningless" in fig.get_suptitle()
    latency = fig.axes[1]
    assert [t.get_text() for t in latency.get_xticklabels()] == ["stream", "window\n(incl. re-prefill)"]
    stream_p50, _, window_p50, window_p95 = [1e-3 * bar.get_height() for bar in latency.patches]
    window = summary["modes"]["window"]
    assert window_p50 == pytest.approx(window["latency_with_prefill_s"]["letter"]["p50"])
    assert window_p95 == pytest.approx(window["latency_with_prefill_s"]["letter"]["p95"])
    assert window_p50 > window["latency_s"]["letter"]["p50"], "the re-prefill is counted"
    assert stream_p50 == pytest.approx(summary["modes"]["stream"]["latency_s"]["letter"]["p50"])

    # the same folder with another setting is refused, naming it; --force sets the old answers aside
    made = (tmp_path / "cli" / "results.jsonl").read_text()
    assert cli_main(args + ["--limit", "3", "--generate", "2", "--window-frames", "3"]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if not line.startswith("!")]
    assert len(error) == 1 and "modes.window.window_frames: 2 -> 3" in error[0] and "--force" in error[0], err
    assert (tmp_path / "cli" / "results.jsonl").read_text() == made
    assert cli_main(args + ["--limit", "1", "--generate", "2", "--window-frames", "3", "--force"]) == 0
    assert len(_lines(tmp_path / "cli")) == 2 and [p.name for p in (tmp_path / "cli").glob("replaced-*")]


@pytest.mark.slow
def test_bounded_mode_streams_under_a_budget_on_its_own_engine(bench, engine, tmp_path):
    ann = read_annotations("ovo", bench / "ovo.json")
    config = _config(modes=("stream", "bounded"), budget={"video_window_seconds": 1.0, "sink_frames": 0})
    result = run_benchmark(engine, ann, bench / "videos_root", tmp_path / "bounded", config, "tiny")
    records = _lines(tmp_path / "bounded")
    bounded = {r["event_id"]: r for r in records if r["mode"] == "bounded"}
    stream = {r["event_id"]: r for r in records if r["mode"] == "stream"}
    assert result.completed and bounded.keys() == stream.keys()
    assert all(r["kept_video_s"] <= 1.0 for r in bounded.values())
    assert any(r["evicted_s"] > 0 for r in bounded.values()), "the budget never evicted: the test tests nothing"
    assert engine.config.video_window_seconds is None, "the runner's engine keeps its own settings"
    paths = write_report(tmp_path / "bounded", result)
    assert "bounded" in paths["summary"]["modes"] and "bounded" in Path(paths["markdown"]).read_text()
    assert any(r["evicted_s"] == 0 for r in bounded.values())
    for key, r in bounded.items():  # before any eviction a bounded stream answers as the full stream (other kernels)
        if r["evicted_s"] == 0:
            assert max(abs(a - b) for a, b in zip(r["choice"]["scores"], stream[key]["choice"]["scores"])) <= 1e-4, key


def _make_minibench():
    """benchmarks/make_minibench.py as a module (benchmarks/ is no package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_minibench",
                                                  Path(__file__).parents[1] / "benchmarks" / "make_minibench.py")
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    return mb


def test_the_benchmarks_miniature_generator_writes_both_formats(tmp_path):
    """benchmarks/make_minibench.py (the GPU row's benchmark): videos that decode, annotations that read."""
    mb = _make_minibench()
    assert mb.main(["--out", str(tmp_path), "--videos", "2", "--seconds", "8", "--size", "64", "--every", "4"]) == 0
    ovo = read_annotations("ovo", tmp_path / "ovo.json")
    sb = read_annotations("streamingbench", tmp_path / "sb.json")
    # per video: questions at 4 s (two at one timestamp), REC probes at 2 and 6 s; one malformed entry each
    assert len(ovo.events) == 2 * (2 + 2) and [p.index for p in ovo.problems] == [6]
    assert len(sb.events) == 2 and [p.index for p in sb.problems] == [2]
    assert sorted(ovo.videos()) == ["videos/mini0.mp4", "videos/mini1.mp4"]
    cap = cv2.VideoCapture(str(tmp_path / "videos" / "mini1.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 8 * mb.VIDEO_FPS
    cap.release()


def _shapes_on_screen(video: Path, t: float, fps: int) -> int:
    """Coloured blobs on the grey background of ``video``'s frame at ``t`` seconds."""
    cap = cv2.VideoCapture(str(video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, round(t * fps))
    ok, frame = cap.read()
    cap.release()
    assert ok, (video, t)
    mask = (np.abs(frame.astype(int) - 40).max(axis=2) > 60).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    return int(sum(stats[1:, cv2.CC_STAT_AREA] > 20))


def test_the_miniature_generator_counts_what_is_on_screen_and_asks_short_videos_too(tmp_path):
    """issue 20: --seconds 20 wrote no StreamingBench question; counting answers wrapped at 4."""
    mb = _make_minibench()
    assert mb.main(["--out", str(tmp_path / "short"), "--videos", "1", "--seconds", "20", "--size", "64"]) == 0
    assert len(read_annotations("streamingbench", tmp_path / "short" / "sb.json").events) >= 1
    assert len(read_annotations("ovo", tmp_path / "short" / "ovo.json").events) >= 3

    out = tmp_path / "long"
    assert mb.main(["--out", str(out), "--videos", "1", "--seconds", "40", "--every", "10", "--size", "192"]) == 0
    sb = read_annotations("streamingbench", out / "sb.json")
    counts = [int(e.answer) for e in sb.events]
    assert len(counts) == 3 and max(counts) >= 4, counts  # the test would not see a wrap at 4 otherwise
    assert counts == [_shapes_on_screen(out / "videos" / "mini0.mp4", e.t_seconds, mb.VIDEO_FPS) for e in sb.events]
    rec = [e for e in read_annotations("ovo", out / "ovo.json").events if e.task == "REC"]
    assert [int(e.answer) for e in rec] == [_shapes_on_screen(out / "videos" / "mini0.mp4", e.t_seconds, mb.VIDEO_FPS)
                                            for e in rec]

    for bad in (["--seconds", "20", "--every", "20"], ["--seconds", "600"]):  # no question time; shapes off screen
        with pytest.raises(SystemExit):
            mb.main(["--out", str(tmp_path / "bad")] + bad)


@pytest.mark.slow
def test_resets_keep_the_engines_memory_so_a_second_pass_captures_and_allocates_nothing(bench, engine, tmp_path):
    from model import StreamConfig, VideoStreamInference
    from tests.conftest import captures
    engine = VideoStreamInference(engine.model, engine.processor, config=StreamConfig(emulate_graphs=True))
    ann = read_annotations("ovo", bench / "ovo.json")
    config = _config(modes=("stream", "window", "reprefill"))
    first = run_benchmark(engine, ann, bench / "videos_root", tmp_path / "one", config)
    captured, allocations = captures(engine), engine.kv.cache.allocations
    second = run_benchmark(engine, ann, bench / "videos_root", tmp_path / "two", config)
    assert first.completed and second.completed and captured > 0
    assert captures(engine) == captured and engine.kv.cache.allocations == allocations
    answers = lambda r: [(x["event_id"], x["mode"], x["choice"]["scores"], x["letter"]["scores"]) for x in r.records]  # noqa: E731
    assert answers(first) == answers(second)  # a kept-memory reset changes no answer
    assert all(x["memory_mib"]["cache"] > 0 for x in second.records), [(x["mode"], x["memory_mib"]) for x in second.records]


# ------------------------------------------------------------------ the results folder (issue 20)

def test_a_folder_answered_with_other_settings_is_refused_naming_them_or_set_aside_with_force(bench, engine,
                                                                                            tmp_path):
    ann = read_annotations("ovo", bench / "ovo.json", limit=2)
    root, out = bench / "videos_root", tmp_path / "budget"
    at = lambda tokens: _config(modes="bounded", budget={"cache_budget_tokens": tokens})  # noqa: E731
    assert run_benchmark(engine, ann, root, out, at(1500), "tiny").new_records == 2
    made = (out / "results.jsonl").read_text()
    with pytest.raises(ValueError, match=r"modes\.bounded\.cache_budget_tokens: 1500 -> 900.*--force"):
        run_benchmark(engine, ann, root, out, at(900), "tiny")
    assert (out / "results.jsonl").read_text() == made, "a refused run writes nothing"
    assert json.loads((out / "run.json").read_text())["answer"]["modes"]["bounded"]["cache_budget_tokens"] == 1500

    forced = run_benchmark(engine, ann, root, out, at(900), "tiny", force=True)
    assert forced.completed and forced.new_records == 2 and len(_lines(out)) == 2, "answered again at 900"
    assert json.loads((out / "run.json").read_text())["answer"]["modes"]["bounded"]["cache_budget_tokens"] == 900
    aside = list(out.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "results.jsonl").read_text() == made, "the 1500 answers are kept aside"
    assert run_benchmark(engine, ann, root, out, at(900), "tiny").new_records == 0, "same settings: resumed"


def test_the_resume_key_holds_every_setting_that_changes_an_answer(tiny):
    import copy
    from model.eval.results import settings_diff
    from model.eval.runner import answer_settings

    base = _config(modes="stream,window,bounded", budget={"video_window_seconds": 1.0})
    key = answer_settings(VideoStreamInference(*tiny), base, "ovo", "tiny")
    changed = {  # setting -> the dotted names the diff must give
        "fps": (dict(fps=1.0), "fps"),
        "chunk": (dict(chunk_frames=4), "modes.stream.chunk_frames"),
        "window": (dict(window_frames=4), "modes.window.window_frames"),
        "budget": (dict(budget={"video_window_seconds": 2.0}), "modes.bounded.video_window_seconds"),
        "sink": (dict(budget={"video_window_seconds": 1.0, "sink_frames": 4}), "modes.bounded.sink_frames"),
        "recall": (dict(budget={"video_window_seconds": 1.0, "recall_grids": 1}), "modes.bounded.recall_grids"),
        "generate": (dict(generate_tokens=3), "scorers"),
        "modes": (dict(modes="stream,bounded"), "modes.window"),
    }
    for what, (kw, name) in changed.items():
        diff = settings_diff(key, answer_settings(VideoStreamInference(*tiny), _config(**{**vars(base), **kw}),
                                                  "ovo", "tiny"))
        assert any(d.startswith(name + ":") for d in diff), (what, diff)
    assert settings_diff(key, answer_settings(VideoStreamInference(*tiny), _config(**{**vars(base), "parity": 3}),
                                              "ovo", "tiny")) == [], "parity checks change no answer"
    assert [d.split(":")[0] for d in settings_diff(key, answer_settings(VideoStreamInference(*tiny), base,
                                                                        "streamingbench", "other"))] \
        == ["benchmark", "model"]
    other = copy.deepcopy(tiny[0])
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    assert [d.split(":")[0] for d in settings_diff(key, answer_settings(VideoStreamInference(other, tiny[1]), base,
                                                                        "ovo", "tiny"))] == ["weights"]
    diff = settings_diff(key, answer_settings(VideoStreamInference(other.to(torch.float64), tiny[1]), base,
                                              "ovo", "tiny"))
    assert {d.split(":")[0] for d in diff} == {"weights", "dtype"}
    assert {"prompts", "versions", "stream_config", "device"} <= key.keys()


def test_a_changed_annotation_file_under_the_same_event_ids_is_refused(tmp_path):
    from model.eval.results import ResultsFolderError, ResultStore
    record = {"event_id": "0.0", "mode": "stream", "video": "a.mp4", "t": 2.0, "task": "Counting",
              "answer_index": 1, "n_options": 4}
    same = {"0.0": {k: record[k] for k in ("video", "t", "task", "answer_index", "n_options")}}
    with ResultStore(tmp_path, {"fps": 2.0}, questions=same) as store:
        store.append(record)
    with ResultStore(tmp_path, {"fps": 2.0}, questions=same) as store:
        assert store.is_done("stream", "0.0")
    moved = {"0.0": {**same["0.0"], "t": 3.0}}
    with pytest.raises(ResultsFolderError, match=r"event '0\.0' was answered for another question \(t 2\.0 -> 3\.0\)"):
        ResultStore(tmp_path, {"fps": 2.0}, questions=moved)
    (tmp_path / "run.json").unlink()
    with pytest.raises(ResultsFolderError, match="run.json is missing"):
        ResultStore(tmp_path, {"fps": 2.0}, questions=same)


def test_a_torn_last_line_is_dropped_and_a_missing_newline_added_before_appending(tmp_path, capsys):
    from model.eval.results import ResultStore
    path = tmp_path / "results.jsonl"
    rec = lambda eid: {"event_id": eid, "mode": "stream", "t": 1.0}  # noqa: E731
    with ResultStore(tmp_path, {}) as store:
        store.append(rec("a"))
        store.append(rec("b"))
    path.write_bytes(path.read_bytes()[:-1])  # "b" without its newline
    with ResultStore(tmp_path, {}) as store:
        assert [r["event_id"] for r in store.records] == ["a", "b"]
        store.append(rec("c"))
    assert "missing newline" in capsys.readouterr().out
    path.write_bytes(path.read_bytes() + b'{"event_id": "d", "mo')  # a kill during a write
    with ResultStore(tmp_path, {}) as store:
        assert [r["event_id"] for r in store.records] == ["a", "b", "c"]
        store.append(rec("d"))
    assert "dropping a half-written last line" in capsys.readouterr().out
    assert [json.loads(line)["event_id"] for line in path.read_text().splitlines()] == ["a", "b", "c", "d"]


@pytest.mark.slow  # two runner processes
def test_one_run_at_a_time_per_folder_and_a_dead_runs_lock_does_not_block(bench, engine, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    out = tmp_path / "locked"
    ann = read_annotations("streamingbench", bench / "sb.json", limit=1)
    refused = []

    def second_run(record):  # while the run writes the folder, another one on it is refused
        with pytest.raises(ValueError, match=rf"{out} is in use by another run \(pid {os.getpid()}"):
            run_benchmark(engine, ann, bench / "videos_root", out, _config(modes="stream"), "tiny")
        refused.append(record["event_id"])

    result = run_benchmark(engine, ann, bench / "videos_root", out, _config(modes="stream"), "tiny",
                           on_record=second_run)
    assert result.completed and refused == ["0.0"] and len(_lines(out)) == 1, "no duplicate was written"

    from model.eval.results import ResultsFolderError, ResultStore
    held = tmp_path / "held"  # a run in another process, killed while it holds its folder
    script = ("import sys, time\nfrom model.eval.results import ResultStore\n"
              "s = ResultStore(sys.argv[1], {})\nprint('held', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(held)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ResultsFolderError, match=rf"pid {holder.pid}\b"):
            ResultStore(held, {})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with ResultStore(held, {}) as store:  # the kernel released the dead process's lock: no wait, no cleanup
        assert store.records == []
