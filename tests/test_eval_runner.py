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

    spy.calls = 0  # a third run has nothing left to do
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
    assert summary["modes"]["window"]["latency_with_prefill_s"]["p50"] > 0
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


def test_the_benchmarks_miniature_generator_writes_both_formats(tmp_path):
    """benchmarks/make_minibench.py (the GPU row's benchmark): videos that decode, annotations that read."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_minibench", Path(__file__).parents[1] / "benchmarks" / "make_minibench.py")
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
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


@pytest.mark.slow
def test_resets_keep_the_engines_memory_so_a_second_pass_captures_and_allocates_nothing(bench, engine, tmp_path):
    from model.cuda_graphs import GraphRunner
    engine._stream.runner = GraphRunner(engine.model, engine.kv, engine.config, capture=False)  # counts captures
    ann = read_annotations("ovo", bench / "ovo.json")
    config = _config(modes=("stream", "window", "reprefill"))
    first = run_benchmark(engine, ann, bench / "videos_root", tmp_path / "one", config)
    captures, allocations = engine._stream.runner.captures, engine.kv.cache.allocations
    second = run_benchmark(engine, ann, bench / "videos_root", tmp_path / "two", config)
    assert first.completed and second.completed and captures > 0
    assert engine._stream.runner.captures == captures and engine.kv.cache.allocations == allocations
    answers = lambda r: [(x["event_id"], x["mode"], x["choice"]["scores"], x["letter"]["scores"]) for x in r.records]  # noqa: E731
    assert answers(first) == answers(second)  # a kept-memory reset changes no answer
    assert all(x["memory_mib"]["cache"] > 0 for x in second.records), [(x["mode"], x["memory_mib"]) for x in second.records]
