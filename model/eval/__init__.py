"""Streaming benchmark runner: OVO-Bench and StreamingBench through the streaming engine.

    from model.eval import EvalConfig, read_annotations, run_benchmark, write_report
    ann = read_annotations("ovo", "ovo_bench_new.json")         # events + skipped entries
    result = run_benchmark(engine, ann, "videos/", "eval-ovo", EvalConfig(parity=5))
    write_report("eval-ovo", result)                             # report.md / .json / .png

CLI: ``python -m model.eval --help``. Files: events (the normalised question), readers, prompts,
videos (locate + decode once), modes (stream, window, reprefill, bounded), scoring (scorers and
offline parity), results (resumable JSONL), runner, metrics, report.
"""
from .events import Annotations, Event, Problem
from .readers import read_annotations, read_ovo, read_streamingbench
from .report import write_report
from .runner import EvalConfig, RunResult, run_benchmark

__all__ = ["Annotations", "Event", "Problem", "read_annotations", "read_ovo", "read_streamingbench",
           "EvalConfig", "RunResult", "run_benchmark", "write_report"]
