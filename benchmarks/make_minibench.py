"""Write a miniature streaming benchmark (issue 10's GPU row): synthetic videos with known events.

Each video shows coloured shapes that appear at known times on a grey background; the
annotations ask about them in both formats the runner reads (OVO-Bench and StreamingBench),
with questions spread over the whole video, several questions at one timestamp, forward
probes (``test_info``) and one malformed entry per format. A new shape appears every ``--every``/2
seconds (at most 30 per video, so that every one is on screen); counting questions are answered
by what is on screen at their time. With random weights the answers mean nothing; the point is
the runner's speed per mode on minutes of video:

    python benchmarks/make_minibench.py --out mini --videos 3 --seconds 120
    python -m model.eval --benchmark ovo --annotations mini/ovo.json --video-root mini \\
        --modes stream,window,reprefill,bounded --budget-tokens 16384 --out eval-mini-ovo
"""
from __future__ import annotations

import argparse
import json
import os
import random

import cv2
import numpy as np

SHAPES = ("square", "circle")
COLOURS = {"red": (0, 0, 255), "blue": (255, 0, 0), "green": (0, 200, 0), "yellow": (0, 220, 220)}
VIDEO_FPS = 10
MAX_SHAPES = 30  # 6 per row, 5 rows (slot k at column k % 6, row k // 6)


def write_video(path: str, seconds: float, size: int, events: list) -> None:
    """``events``: [(appears_at_s, shape, colour name)]; shape k is drawn from its time on, in slot k
    (at most MAX_SHAPES: every shape stays whole and apart from the others)."""
    assert len(events) <= MAX_SHAPES, f"{len(events)} shapes do not fit in a frame (at most {MAX_SHAPES})"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (size, size))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    r = size // 16
    for i in range(int(seconds * VIDEO_FPS)):
        img = np.full((size, size, 3), 40, np.uint8)
        for k, (at, shape, colour) in enumerate(events):
            if i / VIDEO_FPS >= at:
                x, y = r * 2 + (k % 6) * r * 2 * 1.3, r * 2 + (k // 6) * r * 3
                x, y = int(x), int(y)
                if shape == "square":
                    cv2.rectangle(img, (x - r, y - r), (x + r, y + r), COLOURS[colour], -1)
                else:
                    cv2.circle(img, (x, y), r, COLOURS[colour], -1)
        writer.write(img)
    writer.release()


def hms(t: float) -> str:
    t = int(t)
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"


def count_options(count: int, rng: random.Random) -> tuple[list[str], int]:
    """Four consecutive counts (from 0 up) holding ``count``, and the index of ``count`` among them."""
    start = max(0, count - rng.randrange(4))
    return [str(n) for n in range(start, start + 4)], count - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="minibench")
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--seconds", type=float, default=120.0, help="length of each video")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--every", type=float, default=None,
                   help="seconds between question times (default: 20, or half the video when shorter than 40 s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.videos < 1 or args.size < 32:
        p.error(f"--videos must be >= 1 and --size >= 32, got {args.videos} and {args.size}")
    if not (np.isfinite(args.seconds) and args.seconds > 0):
        p.error(f"--seconds must be a positive number, got {args.seconds}")
    every = min(20.0, args.seconds / 2) if args.every is None else args.every
    if not (np.isfinite(every) and 0 < every < args.seconds):
        p.error(f"--every must be positive and less than --seconds ({args.seconds:g}): questions are asked "
                f"every --every seconds from then on, so a video needs more than one --every; got {every:g}")
    # a new shape every every/2 seconds from min(2, every/2) on: each question time has one on screen
    appear = np.arange(min(2.0, every / 2), args.seconds, every / 2)
    if len(appear) > MAX_SHAPES:
        p.error(f"{len(appear)} shapes per video (one every {every / 2:g} s) do not fit in a frame (at most "
                f"{MAX_SHAPES}): use a larger --every or fewer --seconds")
    rng = random.Random(args.seed)
    option_rng = random.Random(args.seed + 1)  # its own: the videos stay those of earlier versions
    ovo, sb, n_ovo = [], [], 0
    colours = list(COLOURS)
    for v in range(args.videos):
        rel = f"videos/mini{v}.mp4"
        events = [(float(t), rng.choice(SHAPES), rng.choice(colours)) for t in appear]
        write_video(os.path.join(args.out, rel), args.seconds, args.size, events)
        questions = []
        for t in np.arange(every, args.seconds, every):
            t = float(t)
            last = [e for e in events if e[0] <= t][-1]
            ovo.append({"id": n_ovo, "task": "OCR", "video": rel, "realtime": t,
                        "question": "What colour is the newest shape?", "options": colours,
                        "gt": colours.index(last[2])})
            ovo.append({"id": n_ovo + 1, "task": "STU", "video": rel, "realtime": t,  # same timestamp
                        "question": "What shape appeared last?", "options": list(SHAPES),
                        "gt": SHAPES.index(last[1])})
            n_ovo += 2
            asked = int(t)  # the time_stamp has whole seconds: count what is on screen then
            options, answer = count_options(int(sum(e[0] <= asked for e in events)), option_rng)
            questions.append({"task_type": "Counting", "question": "How many shapes are visible?",
                              "time_stamp": hms(asked), "options": [f"{L}. {n}" for L, n in zip("ABCD", options)],
                              "answer": "ABCD"[answer]})
        probes = [{"realtime": float(t), "count": int(sum(e[0] <= t for e in events))}
                  for t in np.arange(every / 2, args.seconds, every)]
        ovo.append({"id": n_ovo, "task": "REC", "video": rel, "activity": "show a new shape", "test_info": probes})
        n_ovo += 1
        sb.append({"video_path": f"./{rel}", "questions": questions})
    ovo.append({"id": n_ovo, "task": "EPM", "video": "videos/mini0.mp4", "realtime": 1.0,
                "question": "Which shape?", "options": list(SHAPES), "gt": 7})  # malformed: gt out of range
    sb.append("not an entry")  # malformed
    with open(os.path.join(args.out, "ovo.json"), "w") as f:
        json.dump(ovo, f, indent=1)
    with open(os.path.join(args.out, "sb.json"), "w") as f:
        json.dump(sb, f, indent=1)
    n_sb = sum(len(e["questions"]) for e in sb if isinstance(e, dict))
    print(f"wrote {args.videos} videos of {args.seconds:g} s ({args.size}px) and {len(ovo)} OVO entries, "
          f"{n_sb} StreamingBench questions to {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
