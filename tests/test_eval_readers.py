"""The benchmark runner's readers (OVO-Bench, StreamingBench), their errors, and answer matching.

Both formats are normalised into events (forward probes, several questions at one timestamp);
malformed entries are reported by index, never fatal; bad files, timestamps and settings are
actionable errors. Data: ``tests/minibench.py``.
"""
from __future__ import annotations

import json

import pytest

from model.eval import EvalConfig, read_annotations
from model.eval.events import parse_timestamp
from model.eval.prompts import LETTERS, match_option
from tests.minibench import OVO_ANNOTATIONS, OVO_EVENTS, write_minibench


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_minibench(tmp_path_factory.mktemp("minibench"))


def test_readers_normalise_both_formats_and_report_malformed_entries(bench):
    ovo = read_annotations("ovo", bench / "ovo.json")
    assert len(ovo.events) == OVO_EVENTS and ovo.entries == len(OVO_ANNOTATIONS)
    assert [(p.index, "gt" in p.reason) for p in ovo.problems] == [(7, True)]
    ev = {e.event_id: e for e in ovo.events}
    rec = [ev[f"3#{k}"] for k in range(3)]
    assert [e.t_seconds for e in rec] == [1.0, 2.5, 3.5] and [e.answer for e in rec] == ["1", "2", "2"]
    assert rec[0].options == tuple(str(c) for c in range(11)) and rec[0].category == "forward"
    assert [ev["4#0"].answer, ev["4#1"].answer] == ["No", "Yes"] and "yellow square" in ev["4#0"].question
    assert ev["5#1"].options == ("Yes", "No") and ev["5#1"].answer == "Yes" and ev["5#1"].probe == 1
    assert (ev["0"].category, ev["1"].category, ev["2"].category) == ("backward", "real-time", "real-time")
    assert [(ev[f"8#{k}"].t_seconds, ev[f"8#{k}"].answer) for k in (0, 1)] == [(1.0, "square"), (2.5, "square")]
    assert ev["8#0"].options == ("circle", "square") and ev["8#1"].entry_index == 6
    assert ev["0"].answer == "red" and ev["0"].t_seconds == 2.0 and ev["0"].entry_index == 0

    sb = read_annotations("streamingbench", bench / "sb.json")
    assert [e.event_id for e in sb.events] == ["0.0", "0.1", "1.0", "1.1"]
    reasons = sorted((p.index, p.reason.split(":")[0]) for p in sb.problems)
    assert reasons == [(0, "question 2"), (2, "expected an object, got str")]
    first = sb.events[0]
    assert first.options == ("A square.", "A circle.", "A triangle.", "Nothing.") and first.answer_index == 1
    assert first.t_seconds == 2.0 and sb.events[2].t_seconds == 1.0 and first.video == "./videos/sb0.mp4"
    assert [e.category for e in sb.events] == ["real-time", "real-time", "omni-source", "contextual"]
    assert len(read_annotations("ovo", bench / "ovo.json", limit=4).events) == 4


def test_reader_and_config_errors_are_actionable(bench, tmp_path):
    with pytest.raises(ValueError, match="annotation file not found"):
        read_annotations("ovo", tmp_path / "nope.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_annotations("streamingbench", tmp_path / "obj.json")
    with pytest.raises(ValueError, match="unknown benchmark"):
        read_annotations("mvbench", bench / "ovo.json")
    assert parse_timestamp("01:02:03.5") == 3723.5 and parse_timestamp("00:07") == 7.0
    for bad in ("1:75:00", "a:b", "", "1:2:3:4"):
        with pytest.raises(ValueError, match="time_stamp"):
            parse_timestamp(bad)
    with pytest.raises(ValueError, match="bounded mode needs a memory budget"):
        EvalConfig(modes="stream,bounded")
    with pytest.raises(ValueError, match="cache_budget_tokens must be"):
        EvalConfig(modes="bounded", budget={"cache_budget_tokens": -5})
    with pytest.raises(ValueError, match="unknown mode"):
        EvalConfig(modes="stream,cloud")
    with pytest.raises(ValueError, match="window_frames"):
        EvalConfig(window_frames=0)


def test_generated_answers_are_matched_to_options():
    opts = ["red", "dark red", "blue"]
    assert match_option("B", opts) == 1 and match_option("(C) blue", opts) == 2 and match_option("Answer: A", opts) == 0
    assert match_option("It is dark red.", opts) == 1 and match_option("no idea", opts) is None
    assert match_option("Yes.", ["Yes", "No"]) == 0 and match_option("3 times", [str(i) for i in range(11)]) == 3
    assert match_option("E", opts) is None


def test_malformed_timestamps_skip_their_question_only(tmp_path):
    """issue 20: "nan" was read as NaN (and aborted the run), "inf" as infinity, "-00:01" as 1 s."""
    stamps = ["nan", "inf", "-00:01", "00:00:1e1", "00:-1:05", "+5", "1_0", "00:00:02"]
    question = {"task_type": "Counting", "question": "How many?", "options": ["A. 0", "B. 1"], "answer": "A"}
    (tmp_path / "sb.json").write_text(json.dumps(
        [{"video_path": "v.mp4", "questions": [{**question, "time_stamp": s} for s in stamps]}]))
    sb = read_annotations("streamingbench", tmp_path / "sb.json")
    assert [(e.event_id, e.t_seconds) for e in sb.events] == [("0.7", 2.0)]
    assert [p.reason.split(":")[0] for p in sb.problems] == [f"question {j}" for j in range(len(stamps) - 1)]
    assert all("time_stamp" in p.reason for p in sb.problems)
    for bad in stamps[:-1]:
        with pytest.raises(ValueError, match="time_stamp"):
            parse_timestamp(bad)


def test_an_implausible_rec_count_skips_its_entry(tmp_path):
    """issue 20: a REC count of 1,000,000 became a 1,000,001-option question (the run stalled)."""
    def rec(i, count):
        return {"id": i, "task": "REC", "video": "v.mp4", "activity": "jump",
                "test_info": [{"realtime": 1.0, "count": 1}, {"realtime": 2.0, "count": count}]}
    limit = len(LETTERS) - 1  # options 0..count, one letter each
    (tmp_path / "ovo.json").write_text(json.dumps([rec(0, 1_000_000), rec(1, limit + 1), rec(2, limit)]))
    ovo = read_annotations("ovo", tmp_path / "ovo.json")
    assert [(p.index, "implausible" in p.reason and "test_info[1].count" in p.reason) for p in ovo.problems] \
        == [(0, True), (1, True)]
    assert [e.event_id for e in ovo.events] == ["2#0", "2#1"] and len(ovo.events[1].options) == len(LETTERS)


@pytest.mark.parametrize("flags, named", [
    (["--fps", "0"], "--fps"), (["--fps", "nan"], "--fps"), (["--fps", "inf"], "--fps"), (["--fps", "1e-9"], "--fps"),
    (["--window-frames", "0"], "--window-frames"), (["--chunk-frames", "-1"], "--chunk-frames"),
    (["--parity", "-1"], "--parity"), (["--generate", "x"], "--generate"), (["--limit", "0"], "--limit"),
    (["--modes", "bounded", "--budget-tokens", "-5"], "--budget-tokens"),
    (["--modes", "bounded", "--window-seconds", "0"], "--window-seconds"),
    (["--modes", "bounded", "--window-seconds", "nan"], "--window-seconds"),
    (["--modes", "bounded", "--budget-tokens", "900", "--sink-frames", "-1"], "--sink-frames"),
    (["--modes", "bounded", "--budget-tokens", "900", "--recall-grids", "-2"], "--recall-grids"),
    (["--modes", "stream,window", "--budget-tokens", "900"], "--budget-tokens"),  # would apply to nothing
])
def test_bad_cli_values_are_argparse_errors(flags, named, capsys):
    from model.eval.__main__ import parse_args
    base = ["--benchmark", "ovo", "--annotations", "a.json", "--video-root", "."]
    with pytest.raises(SystemExit) as stop:
        parse_args(base + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("python -m model.eval: error:") and named in err[-1], err
    assert parse_args(base + ["--modes", "stream,bounded", "--budget-tokens", "900", "--fps", "0.5"]).fps == 0.5
