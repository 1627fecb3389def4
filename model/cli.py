"""python -m model SOURCE: stream a video file, camera or URL into the engine and ask about it.

    python -m model clip.mp4                                   # type questions while it streams
    python -m model 0                                          # camera 0
    python -m model rtsp://host/stream --model /path/to/Qwen2.5-VL-3B-Instruct
    python -m model clip.mp4 --questions q.jsonl --json out.json   # scripted, deterministic

Interactive: a question and Enter answers about "now", token by token; ``question | a | b | c``
scores the choices. At a terminal a file plays at real time (``--no-realtime``: as fast as it
decodes, as with piped input). The status line (stderr) shows video time, frames, dropped
frames, cache size and the last chunk's time. End of input (Ctrl-D) or Ctrl-C stops.
Scripted: ``{"t": seconds, "question": "...", "choices": [...]}`` per line; each question is
asked, in t order, when every frame with timestamp <= t (and no later one) is in the engine.
--json: {"meta": {...}, "questions": [...]}, rewritten after every answer (valid JSON at every
moment; meta.complete is false until the run has ended).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
from typing import Callable, Optional

# Nothing imported here loads torch or transformers: --help and argument errors answer at once,
# and the model (``loading.load_engine``) is imported only once the arguments are known to be good.
from .arguments import MAX_FPS, MIN_FPS, check_fps
from .config import BUDGET_STATS, StreamConfig, add_budget_arguments, budget_config
from .cli_questions import Question, parse_typed, read_questions
from .live import LiveStream
from .sources import URL_SCHEMES, masked_url, open_video

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a video file, a camera index (digits, e.g. 0) or a stream URL (rtsp://, http://...)")
    p.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint folder (default: $QWEN_MODEL_PATH; "
                                                  "neither: random weights, said loudly)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sampled from the source, by timestamp (default 2)")
    p.add_argument("--chunk", type=int, default=4, help="frames per append_frames call (default 4)")
    p.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=None,
                   help="pace a file at wall-clock speed (default: on when questions are typed at a terminal, "
                        "off for a --questions script or piped input; live sources always are real time)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop the source at this many seconds of video")
    p.add_argument("--questions", default=None, metavar="FILE.jsonl",
                   help='scripted questions, one JSON object a line: {"t": 4.0, "question": "...", "choices": [...]}')
    p.add_argument("--json", default=None, metavar="OUT", help="write the answers and run details to this JSON file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest free-text answer, in tokens (default 128)")
    add_budget_arguments(p)
    return p.parse_args(argv)


def parse_source(text: str):
    """A camera index for digits, else a path or URL; a path that does not exist is refused here."""
    if text.isdigit():
        return int(text)
    if not text.lower().startswith(URL_SCHEMES) and not os.path.exists(text):
        raise ValueError(f"Cannot open video: {masked_url(text)}: no such file (a camera is a number, a stream a URL)")
    return text


def _recalled_note(recalled) -> str:
    return "; recalled " + ", ".join(f"{r.start_s:.1f}-{r.end_s:.1f} s" for r in recalled) if recalled else ""


def ask(engine, q: Question, max_new_tokens: int, out) -> dict:
    """Answer ``q`` (choices scored, or text printed piece by piece to ``out``); the record's answer part."""
    if q.choices:
        r = engine.ask_choice(q.question, q.choices)
        scores = ", ".join(f"{c} {s:.2f}" for c, s in zip(r.choices, r.scores))
        out.write(f"A: {r.best}  (log p: {scores}; {r.total_s:.3f} s{_recalled_note(r.recalled)})\n")
        return {"answer": r.best, "index": r.index, "scores": r.scores, "normalized_scores": r.normalized_scores,
                "total_s": r.total_s, "recalled_s": [[x.start_s, x.end_s] for x in r.recalled]}
    out.write("A: ")
    with engine.ask_stream(q.question, max_new_tokens=max_new_tokens) as pieces:
        for piece in pieces:
            out.write(piece)
            out.flush()
    a = pieces.answer
    ttft = pieces.first_piece_s if pieces.first_piece_s is not None else a.ttft_s
    out.write(f"\n   (TTFT {ttft:.3f} s, {a.num_tokens} tokens in {a.total_s:.3f} s, {a.finish_reason}"
              f"{_recalled_note(a.recalled)})\n")
    return {"answer": a.text, "tokens": a.num_tokens, "finish_reason": a.finish_reason, "ttft_s": a.ttft_s,
            "recalled_s": [[x.start_s, x.end_s] for x in a.recalled],
            "first_piece_s": pieces.first_piece_s, "total_s": a.total_s}


def answer_record(engine, live: LiveStream, q: Question, max_new_tokens: int, out) -> dict:
    """Ask ``q`` with the stream paused, so the record states exactly what the question saw."""
    with live.paused() as p:
        stats = engine.stats()
        record = {"t": q.t, "question": q.question, "choices": q.choices, "video_s": p.video_s, "frames": p.frames,
                  "chunks": p.chunks, "after_end": q.t is not None and p.ended and q.t > p.video_s,
                  "cache_tokens": stats["cache_tokens"], "cache_bytes": stats["cache_bytes"],
                  **({k: stats[k] for k in BUDGET_STATS} if stats["bounded"] else {})}
        if q.line is not None:
            record = {"line": q.line, **({"id": q.id} if q.id is not None else {}), **record}
        try:
            record.update(ask(engine, q, max_new_tokens, out))
        except (TypeError, ValueError) as e:
            out.write(f"\nerror: {e}\n")
            record["error"] = str(e)
    out.flush()
    return record


def run_scripted(engine, live: LiveStream, questions: list[Question], args, answered: Callable) -> None:
    """Ingest in this thread up to each question's t, then ask it; a streaming error is not fatal."""
    for q in questions:
        with contextlib.suppress(Exception):  # kept in live.error and reported at the end; the rest
            live.advance(until_s=q.t)  # is asked on what the stream holds (records say after_end)
        p = live.progress
        print(f"[t={q.t:g}s | {p.frames} frames, video {p.video_s:.1f}s] Q: {q.question}"
              + (f"  {q.choices}" if q.choices else ""))
        answered(answer_record(engine, live, q, args.max_new_tokens, sys.stdout))


class StatusLine:
    """The status line on stderr. On a terminal it sits above the prompt and is redrawn in place
    every ``every`` s (not while an answer prints); elsewhere it is printed before each prompt."""

    def __init__(self, live: LiveStream, engine, stream, every: float = 0.5):
        self.live, self.engine, self.stream, self.every = live, engine, stream, every
        self.tty = stream.isatty()
        self._lock, self._quiet, self._done = threading.Lock(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)

    def text(self) -> str:
        p, st = self.live.progress, self.engine.stats()
        end = f" | stopped: {type(p.error).__name__}: {p.error}" if p.error else " | source ended" if p.ended else ""
        chunk = "-" if p.last_chunk_ms is None else f"{p.last_chunk_ms:.0f} ms"
        budget = (f" (budget {st['cache_budget_tokens'] or '-'} tok, kept {st['kept_video_seconds']:.1f}s, evicted "
                  f"{st['evicted_seconds']:.1f}s)" if st["bounded"] else "")
        return (f"video {p.video_s:.1f}s | frames {p.frames} | dropped {p.dropped} | cache {st['cache_tokens']} tok "
                f"{st['cache_bytes'] / 2 ** 20:.1f} MiB{budget} | chunk {chunk}{end}")

    def start(self) -> None:
        if self.tty:
            self._thread.start()

    def prompt(self) -> None:
        """The status, then the prompt on the next line; redraws resume."""
        sys.stdout.flush()
        with self._lock:
            self.stream.write(self.text() + ("\n> " if self.tty else "\n"))
            self.stream.flush()
            self._quiet.clear()

    def quiet(self) -> None:
        with self._lock:
            self._quiet.set()

    def stop(self) -> None:
        with self._lock:
            self._done.set()
            self.stream.write("\n" if self.tty else "")  # off the prompt line

    def _run(self) -> None:
        while not self._done.wait(self.every):
            with self._lock:
                if not self._quiet.is_set():  # save cursor, up a line, redraw, restore
                    width = shutil.get_terminal_size((100, 24)).columns - 1
                    self.stream.write(f"\x1b7\x1b[1A\r{self.text()[:width]}\x1b[K\x1b8")
                    self.stream.flush()


def run_interactive(engine, live: LiveStream, args, answered: Callable) -> None:
    """Stream in the background; answer each line read from stdin about "now" until end of input."""
    live.start()
    status = StatusLine(live, engine, sys.stderr)
    status.start()
    try:
        while True:
            status.prompt()
            line = sys.stdin.readline()
            status.quiet()
            if not line:
                return
            if not line.strip():
                continue
            try:
                q = parse_typed(line.rstrip("\n"))
            except (TypeError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            answered(answer_record(engine, live, q, args.max_new_tokens, sys.stdout))
    finally:
        status.stop()


class JsonOut:
    """The --json file: checked before the run, rewritten after every answer and at the end.

    Each write goes to a temporary file in the same folder, then replaces the file, so it is valid
    JSON at every moment and an interrupted run keeps every answer given so far; ``meta.complete``
    is true only in the final write.
    """

    def __init__(self, path: str):
        self.path, self.records = path, []
        self.describe: Callable[[], dict] = lambda: {}
        self.error: Optional[OSError] = None
        mask = os.umask(0)  # read once, before any thread runs: files get the user's usual mode
        os.umask(mask)
        self._mode = 0o666 & ~mask
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(21, "it is a folder")
            if os.path.exists(path):  # an existing file must be writable (it is replaced, not appended to)
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            fd, probe = tempfile.mkstemp(dir=self._folder)  # the folder takes new files
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"cannot write --json file {path}: {e.strerror or e}") from None

    @property
    def _folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write(complete=False)

    def write(self, complete: bool) -> bool:
        """Replace the file with the meta and every record so far; False (and said once) if it cannot be."""
        temporary = None
        try:
            fd, temporary = tempfile.mkstemp(dir=self._folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"meta": {**self.describe(), "complete": complete}, "questions": self.records}, f,
                          indent=2, default=str)
            os.chmod(temporary, self._mode)
            os.replace(temporary, self.path)
            temporary = None
            return True
        except OSError as e:
            if self.error is None:
                print(f"error: cannot write --json file {self.path}: {e.strerror or e}", file=sys.stderr)
            self.error = e
            return False
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


def run_meta(args, live: LiveStream, engine, description: str, skipped: list, error) -> dict:
    p, src = live.progress, live.source
    return {"source": src.source if src else masked_url(args.source), "source_fps": src.source_fps if src else None,
            "fps": live.fps, "chunk": live.chunk, "realtime": args.realtime, "max_seconds": args.max_seconds,
            "model": description, "max_new_tokens": args.max_new_tokens,
            "mode": "scripted" if args.questions else "interactive",
            "ingest": ("main thread; each question sees exactly the frames with timestamp <= t (record's frames)"
                       if args.questions else "background thread; each question sees the frames in at that moment"),
            "progress": {"video_s": p.video_s, "frames": p.frames, "chunks": p.chunks, "dropped": p.dropped,
                         "lost": p.lost, "ended": p.ended},
            "problems": list(src.problems) if src else [], "skipped_lines": skipped,
            "error": None if error is None else f"{type(error).__name__}: {error}", "stats": engine.stats()}


def check_numbers(args) -> Optional[StreamConfig]:
    """The numeric flags, checked before anything loads; the budget's ``StreamConfig`` (None: unbounded)."""
    try:
        check_fps(args.fps)
    except ValueError:
        raise ValueError(f"--fps must be between {MIN_FPS:g} and {MAX_FPS:g} frames per second, got {args.fps:g}"
                         ) from None
    for flag, value in (("--chunk", args.chunk), ("--max-seconds", args.max_seconds),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    config = budget_config(args)
    if config is None and args.recall_grids:
        raise ValueError("--recall-grids brings back evicted video: it needs --budget-tokens N or --window-seconds S")
    if config is None and args.sink_frames != StreamConfig.sink_frames:
        raise ValueError("--sink-frames is part of a memory budget: it needs --budget-tokens N or --window-seconds S")
    return config


def stdin_is_a_terminal() -> bool:
    with contextlib.suppress(AttributeError, ValueError):  # no stdin, or a closed one
        return sys.stdin.isatty()
    return False


def setup(args):
    """(source, questions, skipped, config, json_out) from the arguments alone (nothing loaded yet),
    or ValueError for bad input (exit 2). Fills in ``args.realtime`` when it was left to the default."""
    config = check_numbers(args)
    source = parse_source(args.source)
    json_out = JsonOut(args.json) if args.json else None
    questions, skipped = [], []
    if args.questions:
        questions, skipped = read_questions(args.questions, lambda m: print(f"warning: {m}", file=sys.stderr))
    if args.realtime is None:  # typing questions while a file plays: play it at its own speed
        args.realtime = not args.questions and stdin_is_a_terminal()
    return source, questions, skipped, config, json_out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source, questions, skipped, config, json_out = setup(args)
        from .loading import load_engine  # torch and transformers: only now

        engine, description = load_engine(args.model, args.dtype, args.device, config=config)
        video = open_video(source, fps=args.fps, realtime=args.realtime, max_seconds=args.max_seconds)
        live = LiveStream(engine, video, chunk=args.chunk)
    except (TypeError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if json_out is not None:
        json_out.describe = lambda: run_meta(args, live, engine, description, skipped, live.error)
    answered = json_out.add if json_out is not None else (lambda record: None)
    code = EXIT_OK
    try:
        (run_scripted(engine, live, questions, args, answered) if questions
         else run_interactive(engine, live, args, answered))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:  # also on an unexpected error: the stream stops (the --json file already holds every answer)
        with contextlib.suppress(Exception):  # reported below from live.error
            live.stop(timeout=10, flush=False)
    if live.error is not None:
        print(f"error: streaming stopped: {type(live.error).__name__}: {live.error}", file=sys.stderr)
        code = code or EXIT_FAILED
    print(f"done: {live.progress}", file=sys.stderr)
    if json_out is not None:
        if json_out.write(complete=True) and json_out.error is None:
            print(f"wrote {args.json} ({len(json_out.records)} answers)", file=sys.stderr)
        else:
            code = code or EXIT_FAILED
    return code
