"""Step 6: streaming vs native offline inference, compared on everything.

Streaming encodes the first --seconds of the video in --chunk-frame chunks, then asks the
question from the cache. Native runs the same frames and question in one offline prefill +
decode (transformers' standard forward; positions from this project's function). The report
puts encode time, TTFT, total latency, VRAM and cache size side by side, checks that the two
answers agree (DESIGN.md invariant 1), and says when to use which.

    python test_step6_stream_vs_native.py [--seconds 2] [--chunk 4] [--dtype float32] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from model.config import BUDGET_STATS, add_budget_arguments, budget_config
from model.offline import bounded_visibility, build_inputs, masked_logits, native_generate, question_events
from model.report import WIDTH, check_environment, load_engine, plot_stream_vs_native, section, video_path
from model.timing import device_info, median, reset_peak, set_exact_fp32, sync, timed, vram
from model.video_io import load_frames

DEFAULT_QUESTION = "Describe what is happening in this video."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds of video to stream (default 2)")
    p.add_argument("--chunk", type=int, default=4, help="frames per append_frames call (default 4)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="default: bfloat16 on a GPU, float32 on CPU; float32 turns TF32 off")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, medians reported (default 3 on GPU, 1 on CPU)")
    p.add_argument("--size", type=int, default=448, help="synthetic video frame size (default 448)")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--plot", metavar="PATH", help="PNG of TTFT and VRAM against video length, both modes")
    p.add_argument("--sweep", default="2,8,16,32", help="video lengths in seconds for --plot")
    add_budget_arguments(p)
    return p.parse_args(argv)


def stream_once(engine, frames, fps, chunk, question, max_new_tokens, verbose=False):
    """Reset, stream every chunk, ask; returns the measurements."""
    engine.reset()
    sync()
    reset_peak()
    chunk_s, calls = [], []  # calls: what each call saw, for a bounded stream's exact reference
    n_chunks = (len(frames) + chunk - 1) // chunk
    bar = _progress(n_chunks, verbose)
    for k in range(n_chunks):
        before = engine.stream_state
        info = engine.append_frames(frames[k * chunk:(k + 1) * chunk], fps=fps)
        calls.append((before.last_cache_position, engine.stream_state.last_cache_position, _kept(before)))
        chunk_s.append(info.encode_s)
        if verbose and n_chunks <= 20:
            print(f"    Chunk {k + 1}/{n_chunks}: {info}")
        bar.update(1)
    bar.close()
    mem_after_encode = vram()
    resolution = list(engine.state.frame_size or ())
    before = engine.stream_state
    ans = engine.ask(question, max_new_tokens=max_new_tokens)
    recalled = [(r.seq, r.tokens) for r in ans.recalled]  # evicted grids the question saw again (recall)
    calls.append((before.last_cache_position, None, (_kept(before) or []) + recalled))  # to the transcript's end
    stats = engine.stats()
    return {"encode_total_s": sum(chunk_s), "encode_chunk_s": chunk_s, "ttft_s": ans.ttft_s,
            "total_qa_s": ans.total_s, "answer": ans.text, "token_ids": ans.token_ids, "first_logits": ans.first_logits,
            "vram_after_encode_mib": mem_after_encode, "vram_mib": vram(), "cache_tokens": stats["cache_tokens"],
            "resolution": resolution, "cache_bytes": stats["cache_bytes"], "calls": calls,
            "budget": {k: stats[k] for k in BUDGET_STATS} if stats["bounded"] else None,
            "recalled_s": [(r.start_s, r.end_s) for r in ans.recalled]}


def _kept(state):
    return state.layout.kept_ranges() if state.layout is not None else None


def masked_reference(engine, frames, fps, question, calls) -> torch.Tensor:
    """(V,) first-token logits of the exact reference of a bounded stream: one offline forward over the
    same transcript, each token seeing what the cache kept when its call began (offline.bounded_visibility)."""
    model, proc = engine.model, engine.processor
    inputs = build_inputs(model, proc, question_events(question, frames, fps))
    calls = [(a, inputs.num_tokens if b is None else b, kept) for a, b, kept in calls]
    return masked_logits(model, inputs, bounded_visibility(inputs.num_tokens, calls))[0, -1]


def native_once(engine, frames, fps, question, max_new_tokens):
    """Preprocess + one offline prefill + greedy decode, as a user would without streaming."""
    model, proc = engine.model, engine.processor
    engine.reset()  # free the stream's cache: native must not be measured on top of it
    sync()
    reset_peak()
    prep = []
    with timed(prep):
        inputs = build_inputs(model, proc, question_events(question, frames, fps))
    ans = native_generate(model, inputs, max_new_tokens, engine.stop_ids)
    return {"preprocess_s": prep[0], "prefill_s": ans.ttft_s, "ttft_s": prep[0] + ans.ttft_s,
            "total_s": prep[0] + ans.total_s, "answer": engine.tokenizer.decode(ans.token_ids, skip_special_tokens=True),
            "token_ids": ans.token_ids, "first_logits": ans.first_logits, "tokens": inputs.num_tokens,
            "vram_mib": vram(), "cache_bytes": ans.cache_bytes}


def agreement(s: dict, n: dict) -> dict:
    a, b = s["first_logits"].float(), n["first_logits"].float()
    ts, tn = s["token_ids"], n["token_ids"]
    k = max(len(ts), len(tn))
    same = sum(x == y for x, y in zip(ts, tn))
    return {"identical_tokens": ts == tn, "identical_text": s["answer"] == n["answer"],
            "greedy_token_agreement": same / k if k else 1.0,
            "first_token_argmax_equal": int(a.argmax()) == int(b.argmax()),
            "max_abs_logit_diff": float((a - b).abs().max()),
            "rel_logit_diff": float((a - b).norm() / b.norm())}


def compare(engine, frames, fps, args, repeats, verbose=True):
    """Warm up, then time both modes ``repeats`` times; medians plus the last run's outputs."""
    stream_once(engine, frames[:4], fps, args.chunk, args.question, 2)  # warm-up
    native_once(engine, frames[:4], fps, args.question, 2)
    streams = [stream_once(engine, frames, fps, args.chunk, args.question, args.max_new_tokens, verbose and r == 0)
               for r in range(repeats)]
    natives = [native_once(engine, frames, fps, args.question, args.max_new_tokens) for _ in range(repeats)]
    s, n = dict(streams[-1]), dict(natives[-1])
    for key in ("encode_total_s", "ttft_s", "total_qa_s"):
        s[key] = median(r[key] for r in streams)
    s["encode_chunk_median_s"] = median(t for r in streams for t in r["encode_chunk_s"][1:] or r["encode_chunk_s"])
    for key in ("preprocess_s", "prefill_s", "ttft_s", "total_s"):
        n[key] = median(r[key] for r in natives)
    agree = agreement(s, n)
    if s["budget"] is not None and s["budget"]["evicted_tokens"]:  # the exact reference is the masked forward
        ref = masked_reference(engine, frames, fps, args.question, s["calls"]).float()
        a = s["first_logits"].float()
        agree.update(masked_reference_argmax_equal=int(a.argmax()) == int(ref.argmax()),
                     masked_reference_max_abs_diff=float((a - ref).abs().max()))
    return s, n, agree


def sweep(engine, fps, args, seconds_list):
    """TTFT and peak VRAM against video length for both modes (native OOM recorded as None)."""
    rows = []
    for sec in seconds_list:
        frames, _ = load_frames(None, sec, fps, args.size)
        s = stream_once(engine, frames, fps, args.chunk, args.question, 1)
        row = {"seconds": sec, "frames": len(frames), "stream_ttft_s": s["ttft_s"],
               "stream_peak_mib": s["vram_mib"].get("peak_allocated"), "cache_tokens": s["cache_tokens"]}
        try:
            n = native_once(engine, frames, fps, args.question, 1)
            row.update(native_ttft_s=n["ttft_s"], native_peak_mib=n["vram_mib"].get("peak_allocated"))
        except torch.cuda.OutOfMemoryError:
            row.update(native_ttft_s=None, native_peak_mib=None)
        engine.reset()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        rows.append(row)
        print(f"    {sec:>5.0f} s: stream TTFT {row['stream_ttft_s'] * 1e3:8.1f} ms, native TTFT "
              + (f"{row['native_ttft_s'] * 1e3:8.1f} ms" if row["native_ttft_s"] is not None else "     OOM"))
    return rows


def print_report(s, n, agree, meta, exact):
    section("COMPARISON REPORT")
    ratio = lambda a, b: f"{b / a:8.1f}x" if a > 0 else "     n/a"  # noqa: E731
    print("[Encoding Performance]")
    print(f"  Streaming encoding time: {s['encode_total_s']:.3f}s total, {s['encode_chunk_median_s'] * 1e3:.1f} ms per "
          f"{meta['chunk']}-frame chunk (median), done before the question")
    print(f"  Native prefill time:     {n['prefill_s']:.3f}s (+{n['preprocess_s']:.3f}s preprocessing), after the question")
    print("[QA Performance]")
    print(f"  Streaming TTFT:          {s['ttft_s'] * 1e3:9.1f} ms")
    print(f"  Native TTFT:             {n['ttft_s'] * 1e3:9.1f} ms   streaming is {ratio(s['ttft_s'], n['ttft_s'])} faster")
    print(f"  Streaming total QA:      {s['total_qa_s'] * 1e3:9.1f} ms")
    print(f"  Native total:            {n['total_s'] * 1e3:9.1f} ms   ratio {ratio(s['total_qa_s'], n['total_s'])}")
    print("[Memory]")
    if s["vram_mib"]:
        print(f"  Streaming VRAM:          {s['vram_mib']}")
        print(f"  Native VRAM:             {n['vram_mib']}")
    print(f"  Streaming cache:         {s['cache_tokens']} tokens, {s['cache_bytes'] / 2**20:.1f} MiB")
    print(f"  Native cache:            {n['tokens']} tokens + answer, {n['cache_bytes'] / 2**20:.1f} MiB")
    if s["budget"] is not None:
        b = s["budget"]
        print(f"  Memory budget:           {b['cache_budget_tokens'] or '-'} tokens, window "
              f"{b['video_window_seconds'] or '-'} s, sink {b['sink_frames']} frames")
        print(f"  Kept / evicted video:    {b['kept_video_seconds']:.1f} s kept, {b['evicted_seconds']:.1f} s evicted "
              f"({b['evicted_tokens']} of {b['transcript_tokens']} tokens)")
        if b["recall_grids"]:
            seen = ", ".join(f"{a:.1f}-{z:.1f} s" for a, z in s["recalled_s"]) or "none"
            print(f"  Recall:                  {b['stored_seconds']:.1f} s of evicted video in host memory "
                  f"({b['recall_host_bytes'] / 2**20:.1f} MiB); the question recalled {seen}")
        if b["evicted_tokens"]:
            print("  Video was evicted: the native answer saw all of it, so the two may differ; the exact\n"
                  "  reference is the masked offline forward (Answer Agreement: masked_reference_*).")
    print("[Answer Agreement]")
    for k, v in agree.items():
        print(f"  {k:26s} {v}")
    print(f"  Streaming answer: {_short(s['answer'])}")
    print(f"  Native answer:    {_short(n['answer'])}")
    print("[When to use which]")
    print("  Streaming: frames arrive over time and questions come at any moment; each answer costs only the\n"
          "  question's prefill on the cache (TTFT nearly flat in video length), the video is encoded once.\n"
          "  Native: one question about a finished clip, where encoding everything once at question time is\n"
          "  acceptable; it needs no state, but its TTFT and peak memory grow with the video.")
    if exact and s["budget"] is not None and s["budget"]["evicted_tokens"]:
        print("  fp32 (TF32 off): the bounded stream must equal its masked offline reference to 1e-4.")
    elif exact:
        print("  fp32 (TF32 off): stream and native must give identical greedy tokens and max |diff| <= 1e-4.")
    else:
        print("  Reduced precision: the two paths multiply matrices of different shapes and round differently;\n"
              "  first-token argmax agreement, relative logit difference and token agreement are reported.")
    print("=" * WIDTH)


def run(argv=None) -> tuple[dict, int]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    exact = dtype == "float32"
    if exact:
        set_exact_fp32()
    repeats = args.repeats or (3 if cuda else 1)
    section("STREAMING MODE TEST")
    print(f"[1] Loading video frames (first {args.seconds}s)...")
    frames, fps = load_frames(video_path(), args.seconds, size=args.size)
    print(f"    Loaded {len(frames)} frames (fps={fps:.2f}, {frames[0].shape[1]}x{frames[0].shape[0]})")
    print("[2] Initializing streaming engine...")
    engine, desc = load_engine(dtype, args.attn, config=budget_config(args))
    print(f"    {desc}; VRAM after model load: {vram()}")
    print(f"[3] Streaming encoding ({args.chunk}-frame chunks), then [4] question: {args.question!r}")
    s, n, agree = compare(engine, frames, fps, args, repeats)
    print(f"    Encoding completed in {s['encode_total_s']:.3f}s; answer: {_short(s['answer'])}")
    print(f"    TTFT: {s['ttft_s']:.4f}s   Total QA latency: {s['total_qa_s']:.4f}s")
    section("NATIVE OFFLINE MODE TEST")
    print(f"    {n['tokens']} prompt tokens; prefill (TTFT) {n['ttft_s']:.3f}s; total {n['total_s']:.3f}s")
    print(f"    Answer: {_short(n['answer'])}")
    meta = {**device_info(), "model": desc, "dtype": dtype, "attn_implementation": engine.attn_implementation,
            "resolution": s["resolution"], "fps": fps, "chunk": args.chunk,
            "seconds": args.seconds, "frames": len(frames), "question": args.question,
            "max_new_tokens": args.max_new_tokens, "repeats": repeats}
    print_report(s, n, agree, meta, exact)
    if "masked_reference_max_abs_diff" in agree:  # video was evicted: the masked forward is the reference
        ok = agree["masked_reference_max_abs_diff"] <= 1e-4 if exact else True
        if exact and not ok:
            print("FAIL: in fp32 a bounded stream must equal its masked offline reference (max |diff| <= 1e-4)")
    else:
        ok = agree["identical_tokens"] and agree["max_abs_logit_diff"] <= 1e-4 if exact else True
        if exact and not ok:
            print("FAIL: in fp32 stream and native must agree (identical greedy tokens, max |diff| <= 1e-4)")
    results = {"meta": meta, "streaming": _jsonable(s), "native": _jsonable(n), "agreement": agree, "passed": ok}
    if args.plot:
        print(f"[5] Sweep for the plot: {args.sweep} s")
        results["sweep"] = sweep(engine, fps, args, [float(x) for x in args.sweep.split(",")])
        plot_stream_vs_native(results["sweep"], args.plot, f"{meta['card']}, {dtype}, {meta['attn_implementation']}, "
             f"{meta['resolution']} px, {fps:g} fps, {args.chunk}-frame chunks")
        print(f"    plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"    results written to {args.json}")
    return results, 0 if ok else 1


def _short(text: str, n: int = 160) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}


def _progress(total: int, verbose: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="    encoding", disable=not verbose or total <= 20, leave=False)


def test_stream_and_native_agree_in_fp32():
    """CPU (tiny model) or GPU: fp32 stream and native give identical greedy tokens, max |diff| <= 1e-4."""
    results, code = run(["--seconds", "1", "--dtype", "float32", "--max-new-tokens", "6", "--repeats", "1"])
    assert code == 0, results["agreement"]
    assert results["streaming"]["cache_tokens"] > 0 and results["native"]["tokens"] > 0


def test_a_bounded_stream_equals_its_masked_reference_and_the_report_shows_the_budget(capsys):
    """With a budget that evicts, the report shows the budget and the stream equals its masked reference."""
    results, code = run(["--seconds", "4", "--dtype", "float32", "--max-new-tokens", "2", "--repeats", "1",
                         "--budget-tokens", "400"])
    budget = results["streaming"]["budget"]
    assert budget["evicted_tokens"] > 0 and results["streaming"]["cache_tokens"] <= 400
    assert code == 0 and results["agreement"]["masked_reference_max_abs_diff"] <= 1e-4, results["agreement"]
    out = capsys.readouterr().out
    assert "Memory budget:" in out and "evicted" in out


if __name__ == "__main__":
    parse_args()  # --help and bad flags first
    check_environment("QWEN_MODEL_PATH", "VIDEO_PATH")  # every bad path, one line each, exit 2
    sys.exit(run()[1])
