"""The runner: one pass per video, every mode, every event, one JSONL line each.

    ann = read_annotations("ovo", "ovo_bench_new.json")
    result = run_benchmark(engine, ann, video_root="videos/", out_dir="eval-out",
                           config=EvalConfig(modes=("stream", "window"), parity=5))
    write_report("eval-out", result)

Per video: decode once at ``fps`` (up to its latest question), sort its events by time, and
for each mode in turn: reset the engine (keeping its memory: cache buffers and CUDA graphs serve every
video and mode, so no answer waits for a graph capture after the warm-up), advance to each event's time (the stream mode appends
only the frames that arrived since the last question), answer with every scorer (each call
rolls back), append the record. Events already in ``OUT/results.jsonl`` are skipped, so an
interrupted run resumes where it stopped (the stream mode re-ingests the video up to the
first unanswered event). Only answers made with the same answer settings (``answer_settings``:
model, weights, dtype, fps, each mode's settings, scorers, prompts, versions) are resumed; the
folder is locked while a run writes it (results.py).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import transformers
from tqdm.auto import tqdm

from ..arguments import check_fps
from ..config import StreamConfig
from ..timing import MIB, device_info
from .events import Annotations, Event, Problem
from .modes import frames_up_to, make_mode, parse_modes
from .prompts import prompts_fingerprint
from .results import QUESTION_FIELDS, ResultStore
from .scoring import SCORERS, answer_event, parity_check
from .videos import decode_video, resolve_video, video_candidates


BUDGET_FIELDS = ("cache_budget_tokens", "video_window_seconds", "sink_frames", "recall_grids")


@dataclass
class EvalConfig:
    fps: float = 2.0
    modes: tuple[str, ...] = ("stream", "window")
    window_frames: int = 16  # window mode: frames re-prefilled per question
    chunk_frames: int = 8  # stream mode: frames per append_frames call
    parity: int = 0  # stream-mode events (the first K) also answered by the native offline path
    generate_tokens: int = 0  # > 0: also answer by generation (max_new_tokens), matched to an option
    progress: bool = True
    budget: Optional[dict] = None  # bounded mode: StreamConfig budget fields (cache_budget_tokens, ...)

    def __post_init__(self):
        self.modes = tuple(parse_modes(self.modes if isinstance(self.modes, str) else list(self.modes)))
        self.fps = check_fps(self.fps)  # finite, within the engine's range
        for name in ("parity", "generate_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.budget is not None:
            StreamConfig().replace(**self.budget)  # unknown or invalid budget fields raise here
        for name in self.modes:  # validates window_frames / chunk_frames / the budget of bounded mode
            make_mode(name, self.chunk_frames, self.window_frames, self.budget)


@dataclass
class RunResult:
    """What ``run_benchmark`` returns; ``write_report`` turns it into the report."""

    settings: dict
    records: list[dict]  # every record in the JSONL (earlier runs included)
    events: list[Event]
    problems: list[Problem]  # skipped annotation entries and videos
    new_records: int = 0  # answered by this run
    decode_s: float = 0.0
    wall_s: float = 0.0
    completed: bool = False
    decoded: dict = field(default_factory=dict)  # video -> frames decoded
    parity_done: int = 0  # records with a parity check (earlier runs included)


def answer_settings(engine, config: EvalConfig, benchmark: str, model_description: str = "") -> dict:
    """Every setting that changes an answer: the results folder's resume key (``OUT/run.json``, "answer").

    Not in it: what changes no answer (parity checks, --limit, the video root, progress bars, the card).
    """
    modes = {}
    for name in config.modes:
        described = make_mode(name, config.chunk_frames, config.window_frames, config.budget).describe()
        described.pop("mode")
        if name == "bounded":  # the budget as the bounded engine gets it (defaults filled in)
            bounded = engine.config.replace(**config.budget)
            described.update({k: getattr(bounded, k) for k in (*BUDGET_FIELDS, *config.budget)})
        modes[name] = described
    return {
        "benchmark": benchmark,
        "model": model_description,
        "weights": weights_fingerprint(engine.model),
        "dtype": str(engine.model.dtype).replace("torch.", ""),
        "device": engine.model.device.type,
        "stream_config": asdict(engine.config),  # the engine's own settings (kernels, graphs, chunking)
        "fps": config.fps,
        "modes": modes,
        "scorers": [s for s in SCORERS if s != "generate"] + (["generate"] if config.generate_tokens else []),
        "generate_tokens": config.generate_tokens,
        "prompts": prompts_fingerprint(),
        "versions": {"library": library_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def weights_fingerprint(model) -> str:
    """A hash of the first 256 values of every weight tensor: tells checkpoints (and random seeds)
    apart without reading every weight."""
    with torch.no_grad():
        head = torch.cat([p.detach().reshape(-1)[:256].float() for p in model.parameters()])
    return hashlib.sha256(head.cpu().numpy().tobytes()).hexdigest()[:16]


def is_random_weights(engine, model_description: str = "") -> bool:
    """Whether the model answering has random weights: ``load_engine`` says "random-weight ..."; a
    model built from a config alone (not ``from_pretrained``) has no ``name_or_path``."""
    return model_description.startswith("random") or getattr(engine.model.config, "name_or_path", None) == ""


def library_version() -> str:
    """This library's version: its pyproject.toml in a source checkout, else the installed package's."""
    pyproject = os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")
    if os.path.isfile(pyproject):
        with open(pyproject, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version("qwen-video-stream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_benchmark(engine, annotations: Annotations, video_root: Optional[str | os.PathLike], out_dir: str | os.PathLike,
                  config: Optional[EvalConfig] = None, model_description: str = "",
                  on_record: Optional[Callable[[dict], None]] = None, force: bool = False) -> RunResult:
    """Answer every event of ``annotations`` in every mode of ``config``; resumable (see module doc).

    ``on_record(record)`` is called after each record is written (progress hooks; an exception
    raised there stops the run, and the next run resumes after that record). Ctrl-C stops the
    run too, but returns the result (``completed=False``) so that the report can still be written.
    ``out_dir`` holding answers made with other answer settings raises ValueError naming them;
    ``force=True`` sets those answers aside instead and starts again.
    """
    config = config or EvalConfig()
    answer = answer_settings(engine, config, annotations.benchmark, model_description)
    settings = {"benchmark": annotations.benchmark, "video_root": str(video_root), "model": model_description,
                "random_weights": is_random_weights(engine, model_description), "dtype": answer["dtype"],
                **{k: v for k, v in asdict(config).items() if k != "progress"}, "device": device_info()}
    questions = {e.event_id: dict(zip(QUESTION_FIELDS, (e.video, e.t_seconds, e.task, e.answer_index, len(e.options))))
                 for e in annotations.events}
    with ResultStore(out_dir, answer, settings, questions, force) as store:
        return _run(engine, annotations, video_root, config, settings, store, on_record)


def _run(engine, annotations: Annotations, video_root, config: EvalConfig, settings: dict, store: ResultStore,
         on_record) -> RunResult:
    result = RunResult(settings, store.records, list(annotations.events), list(annotations.problems),
                       parity_done=sum("parity" in r for r in store.records))
    for p in annotations.problems:
        print(f"skipped annotation {p}")
    t0 = time.perf_counter()
    by_video = _group_by_video(annotations.events)
    total = len(annotations.events) * len(config.modes)
    done = sum(store.is_done(m, e.event_id) for e in annotations.events for m in config.modes)
    overall = tqdm(total=total, initial=done, desc="all events", unit="answer", disable=not config.progress)
    warmed = False
    engines = {}  # mode -> the engine it runs on, made and warmed once (a bounded mode has its own)
    try:
        for video, events in by_video.items():
            pending = {m: [e for e in events if not store.is_done(m, e.event_id)] for m in config.modes}
            n_pending = sum(len(v) for v in pending.values())
            if not n_pending:
                continue
            frames = _decode(video, video_root, config.fps, pending, result)
            if frames is None:
                overall.update(n_pending)
                continue
            if not warmed:
                warmed = _warm_up(engine, events[0], frames[1], config)
            for name in config.modes:
                if pending[name]:
                    if name not in engines:
                        mode_engine = make_mode(name, config.chunk_frames, config.window_frames,
                                                config.budget).engine_for(engine)
                        if mode_engine is not engine:
                            _warm_up(mode_engine, events[0], frames[1], config)
                        engines[name] = mode_engine
                    _run_mode(engines[name], name, pending[name], frames, config, store, result, on_record, overall)
        result.completed = True
    except KeyboardInterrupt:  # Ctrl-C: keep what is answered, report it, resume later
        print("\ninterrupted: answers so far are in the JSONL; run the same command again to resume",
              file=sys.stderr)
    finally:
        overall.close()
        result.wall_s = time.perf_counter() - t0
    return result


def _group_by_video(events: list[Event]) -> dict[str, list[Event]]:
    """video -> its events sorted by time (ties keep annotation order); videos in first-appearance order."""
    groups: dict[str, list[Event]] = {}
    for e in events:
        groups.setdefault(e.video, []).append(e)
    return {v: sorted(evs, key=lambda e: e.t_seconds) for v, evs in groups.items()}


def _warm_up(engine, event: Event, frames: list, config: EvalConfig) -> bool:
    """One unrecorded question on the first frames, so that the first mode's timings exclude
    one-time costs (kernel selection, allocator growth, CUDA graph capture)."""
    engine.reset(keep_memory=True)
    engine.append_frames(frames[:2], fps=config.fps)
    answer_event(engine, event, config.generate_tokens)
    engine.reset(keep_memory=True)
    return True


def _decode(video: str, root, fps: float, pending: dict, result: RunResult):
    """(timestamps, frames) up to the latest pending event, or None (a Problem is recorded)."""
    path = resolve_video(video, root)
    if path is None:
        tried = ", ".join(str(p) for p in video_candidates(video, root))
        return _video_problem(result, video, f"video file not found (tried {tried})")
    until = max(e.t_seconds for evs in pending.values() for e in evs)
    t0 = time.perf_counter()
    try:
        timestamps, frames = decode_video(path, fps, until)
    except (ValueError, OSError, RuntimeError) as e:
        return _video_problem(result, video, f"cannot decode {path}: {e}")
    result.decode_s += time.perf_counter() - t0
    if not frames:
        return _video_problem(result, video, f"no frame decoded from {path}")
    result.decoded[video] = len(frames)
    return timestamps, frames


def _video_problem(result: RunResult, video: str, reason: str) -> None:
    problem = Problem(None, reason, video)
    result.problems.append(problem)
    print(f"skipped {problem}")
    return None


def _run_mode(engine, name: str, events: list[Event], decoded, config: EvalConfig, store: ResultStore,
              result: RunResult, on_record, overall) -> None:
    timestamps, frames = decoded
    mode = make_mode(name, config.chunk_frames, config.window_frames, config.budget)
    mode.start_video(engine)
    cuda = engine.model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.model.device)
    label = os.path.basename(events[0].video)
    bar = tqdm(total=len(events), desc=f"{label} [{name}]", unit="q", leave=False, disable=not config.progress)
    try:
        for event in events:
            n_seen = frames_up_to(timestamps, event.t_seconds)
            ingest = mode.advance(engine, frames, n_seen, config.fps)
            record = {**_event_fields(event), "mode": name, **ingest}
            record.update(answer_event(engine, event, config.generate_tokens))
            if name == "stream" and result.parity_done < config.parity:
                record["parity"] = _parity(engine, event, record, mode.view(frames, n_seen), config.fps)
                result.parity_done += 1
            record["memory_mib"] = memory_mib(cuda, engine)
            store.append(record)
            result.new_records += 1
            bar.update()
            overall.update()
            if on_record is not None:
                on_record(record)
    finally:
        bar.close()


def _event_fields(e: Event) -> dict:
    return {"event_id": e.event_id, "benchmark": e.benchmark, "video": e.video, "t": e.t_seconds, "task": e.task,
            "category": e.category, "answer_index": e.answer_index, "n_options": len(e.options)}


def _parity(engine, event: Event, record: dict, frames: list, fps: float) -> dict:
    try:
        return parity_check(engine, event, record, frames, fps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": f"out of memory on the offline path ({len(frames)} frames)", "failed": False}


def memory_mib(cuda: bool, engine=None) -> dict:
    """GPU: peak allocated since the video's mode pass began (cache buffers kept from earlier modes and
    videos included); CPU: resident set now and the process peak. ``cache``: the engine's live cache now."""
    cache = {"cache": round(engine.stats()["cache_bytes"] / MIB, 3)} if engine is not None else {}
    if cuda:
        return {"gpu_peak_allocated": round(torch.cuda.max_memory_allocated() / MIB, 1), **cache}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        rss = peak
    return {"rss": round(rss, 1), "rss_peak": round(peak, 1), **cache}
