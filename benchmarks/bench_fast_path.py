"""Fast-path benchmark (issue 4): every target row, each engine mode, the native path and the floors.

Runs on a GPU with the Qwen2.5-VL-3B architecture and random weights (timings are real,
answers are not), 448x448 frames from a 30 fps source, 4-frame chunks. For each engine mode
(``--modes``, e.g. eager and fast) it measures:

  ingest      4-frame chunks appended onto 2 s of cached video (7,680 tokens), preprocessing included
  ttft_2s     question time-to-first-token with 2 s cached
  ttft_60s    the same with 60 s cached (the cache is filled to that length with random K/V:
              attention cost does not depend on the values)
  decode      tokens/s at batch 1 (64 tokens, end-of-turn ignored)
  choice4     ask_choice with 4 choices, 2 s cached
  memory      peak GPU memory while streaming 2 s and asking, over weights + cache
and the components of a chunk (preprocessing, vision encoder, LM append), chunk time against
cache length up to 60 s, the native one-shot path, and floors from FLOPs and bytes against
the matmul rate and copy bandwidth measured on the card in the same run.

    python benchmarks/bench_fast_path.py --json benchmarks/results/fast_path_h100.json --plot benchmarks/results/chunk_vs_cache_h100.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import VideoStreamInference  # noqa: E402
from model.frames import patchify, resize_frames, to_frame_list  # noqa: E402
from model.offline import build_inputs, chat_segments, native_generate  # noqa: E402
from model.positions import next_start, vision_positions  # noqa: E402
from model.testing import QWEN25_VL_3B_CONFIG, build_3b_processor, build_random_model, synthetic_frames  # noqa: E402
from model.timing import GIB, device_info, median, set_exact_fp32, sync  # noqa: E402

FPS, CHUNK, SIZE = 30, 4, 448
Q = "What is happening in the video right now?"
CHOICES = ["a red circle", "a green square", "a blue triangle", "nothing"]
TARGETS = {"ingest_fps": 250, "ttft_2s_ms": 15, "ttft_60s_ms": 25, "decode_tps": 250, "choice4_ms": 30,
           "mem_over_weights_cache_gib": 1.0}


def bench(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Synchronised wall times (s) of fn(), after warm-up."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def ceilings() -> dict:
    """Measured bf16 matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = median(bench(lambda: a @ b, 10))
    x = torch.randn(2 * 1024**3 // 4, device="cuda")
    y = torch.empty_like(x)
    c = median(bench(lambda: y.copy_(x), 10))
    return {"matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_gbps": 2 * x.numel() * 4 / c / 1e9}


def floors(model, ceil: dict, cache_tokens_2s: int) -> dict:
    """Lower bounds from FLOPs and bytes (DESIGN.md section 7)."""
    tc, vc = model.config.text_config, model.config.vision_config
    layer = (2 * tc.hidden_size**2 + 2 * tc.hidden_size * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
             + 3 * tc.hidden_size * tc.intermediate_size)
    lm_params = tc.num_hidden_layers * layer
    head_bytes = tc.vocab_size * tc.hidden_size * 2
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    vis_params = vc.depth * (4 * vc.hidden_size**2 + 3 * vc.hidden_size * vc.intermediate_size)
    patches = CHUNK * (SIZE // 14) ** 2 // 2  # 2048 patch tokens per 4 frames
    tokens = patches // 4
    flop_s, bw = ceil["matmul_tflops"] * 1e12, ceil["copy_gbps"] * 1e9

    def attn_flops(q, kv):
        return 4 * q * kv * tc.hidden_size * tc.num_hidden_layers

    def chunk_s(cache):
        return (2 * vis_params * patches + 2 * lm_params * tokens + attn_flops(tokens, cache + tokens)) / flop_s

    weights_bytes = 2 * lm_params + head_bytes
    out = {"chunk_ms_at_2s": 1e3 * chunk_s(cache_tokens_2s), "chunk_ms_at_60s": 1e3 * chunk_s(60 * FPS // 2 * tokens // 2),
           "decode_ms": 1e3 * (weights_bytes + kv_per_token * cache_tokens_2s) / bw,
           "ttft_2s_ms": 1e3 * (weights_bytes + kv_per_token * cache_tokens_2s) / bw,
           "ttft_60s_ms": 1e3 * (weights_bytes + kv_per_token * 230_400) / bw}
    out["ingest_fps"] = CHUNK / (out["chunk_ms_at_2s"] / 1e3)
    out["decode_tps"] = 1e3 / out["decode_ms"]
    out["choice4_ms"] = 2 * out["ttft_2s_ms"]
    return {k: round(v, 3) for k, v in out.items()}


def fill_cache(engine, n_tokens: int, frames) -> None:
    """Stream one real chunk, then extend the cache to n_tokens with random K/V shaped like video grids."""
    engine.reset()
    engine.append_frames(frames[:CHUNK], fps=FPS)
    cache, st = engine.kv.cache, engine.state
    per_grid = (SIZE // 28) ** 2
    grids = max(0, (n_tokens - cache.length) // per_grid)
    n = cache.length + grids * per_grid
    cache.reserve(n + 8192)
    gen = torch.Generator(device=cache.keys[0].device).manual_seed(0)  # not the default one: graphs were captured
    for i in range(cache.num_layers):
        k, v = cache.layer(i)
        for buf, std in ((cache.keys[i], float(k.float().std())), (cache.values[i], float(v.float().std()))):
            part = buf[:, :, cache.length:n]
            part.copy_(torch.randn(part.shape, generator=gen, device=part.device, dtype=part.dtype) * std)
    last = vision_positions(st.block_start, 1, SIZE // 28, SIZE // 28, t_offset=st.next_t_index + grids - 1,
                            second_per_grid_t=st.second_per_grid_t, tokens_per_second=2)
    cache.length = n
    engine.state = replace(st, last_cache_position=n, next_t_index=st.next_t_index + grids,
                           next_position=max(st.next_position, next_start(last)))


def chunk_time(engine, frames, repeats) -> float:
    def once():
        engine.kv.snapshot()
        engine.append_frames(frames[CHUNK:2 * CHUNK], fps=FPS)
        engine.kv.restore()
    return median(bench(once, repeats))


def measure_mode(engine, frames, repeats, lengths) -> dict:
    r = {"stats": {k: v for k, v in engine.stats().items() if isinstance(v, (str, int, float, bool))}}
    model, pix = engine.model, engine.video_pixels
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    engine.reset()
    for i in range(0, 60, CHUNK):  # 2 s
        engine.append_frames(frames[i:i + CHUNK], fps=FPS)
    r["cache_tokens_2s"] = engine.kv.get_seq_length()
    # components of one chunk at 2 s
    raw = frames[60:64]
    pre = lambda: patchify(resize_frames(to_frame_list(raw), (SIZE, SIZE), device=model.device), pix)  # noqa: E731
    patches, grid = pre()
    r["preprocess_ms"] = 1e3 * median(bench(pre, repeats))

    def vision():  # the engine's path: the captured vision graph in fast mode
        out = engine._vision_graphs(patches, grid) if engine._vision_graphs is not None else None
        return out if out is not None else model.encode_vision(patches, grid)
    r["vision_ms"] = 1e3 * median(bench(vision, repeats))
    emb = vision()

    def lm_append():
        engine.kv.snapshot()
        model.feed_vision(engine.kv.cache, emb, grid, runner=engine._runner)
        engine.kv.restore()
    r["lm_append_ms"] = 1e3 * median(bench(lm_append, repeats))
    r["chunk_ms"] = 1e3 * chunk_time(engine, frames[60:], repeats)
    r["ingest_fps"] = CHUNK / (r["chunk_ms"] / 1e3)
    r["ttft_2s_ms"] = 1e3 * median([engine.ask(Q, max_new_tokens=1).ttft_s for _ in range(repeats + 2)][2:])
    stops = engine.stop_ids
    engine.stop_ids = set()  # random weights: decode the full 64 tokens
    ans = [engine.ask(Q, max_new_tokens=64) for _ in range(3)][1:]
    engine.stop_ids = stops
    r["decode_tps"] = median(a.tokens_per_s for a in ans)
    r["choice4_ms"] = 1e3 * median(bench(lambda: engine.ask_choice(Q, CHOICES), repeats))
    peak = torch.cuda.max_memory_allocated()
    # bf16 agreement with the offline path on the same 2 s (after the peak: native memory is not the stream's)
    a = engine.ask(Q, max_new_tokens=1)
    ref = native_generate(model, build_inputs(model, engine.processor, chat_segments(engine.processor, Q, frames[:60], FPS)),
                          1, set()).first_logits
    r["bf16_vs_offline"] = {"first_token_argmax_equal": int(a.first_logits.argmax()) == int(ref.argmax()),
                            "rel_logit_diff": float((a.first_logits - ref).norm() / ref.norm())}
    print(f"      2 s: chunk {r['chunk_ms']:.1f} ms (preprocess {r['preprocess_ms']:.1f}, vision {r['vision_ms']:.1f}, "
          f"LM append {r['lm_append_ms']:.1f}), TTFT {r['ttft_2s_ms']:.1f} ms, decode {r['decode_tps']:.0f} tok/s, "
          f"choice4 {r['choice4_ms']:.1f} ms, {r['bf16_vs_offline']}")
    r["weights_gib"] = weights / GIB
    r["cache_gib_2s"] = engine.kv.nbytes() / GIB
    r["peak_gib"] = peak / GIB
    r["mem_over_weights_cache_gib"] = (peak - weights - engine.kv.nbytes()) / GIB
    # chunk time and TTFT against cache length
    r["by_length"] = []
    for sec in lengths:
        fill_cache(engine, int(sec * FPS / 2) * (SIZE // 28) ** 2, frames)
        row = {"seconds": sec, "cache_tokens": engine.kv.get_seq_length(),
               "chunk_ms": 1e3 * chunk_time(engine, frames, max(3, repeats // 3)),
               "ttft_ms": 1e3 * median([engine.ask(Q, max_new_tokens=1).ttft_s for _ in range(5)][2:])}
        r["by_length"].append(row)
        print(f"      {sec:>5.1f} s  {row['cache_tokens']:>7} tokens  chunk {row['chunk_ms']:8.1f} ms  TTFT {row['ttft_ms']:7.1f} ms")
    r["ttft_60s_ms"] = r["by_length"][-1]["ttft_ms"] if lengths and lengths[-1] >= 60 else None
    r["stats_after"] = {k: v for k, v in engine.stats().items() if isinstance(v, (str, int, float, bool))}
    print(f"      backends: {r['stats_after']}")
    engine.reset()
    return r


def measure_native(engine, frames, repeats) -> dict:
    model, proc = engine.model, engine.processor
    engine.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    out = []
    for _ in range(max(2, repeats // 3) + 1):
        t0 = time.perf_counter()
        inputs = build_inputs(model, proc, chat_segments(proc, Q, frames[:60], FPS))
        sync()
        pre = time.perf_counter() - t0
        ans = native_generate(model, inputs, 32, set())
        out.append((pre + ans.ttft_s, (len(ans.token_ids) - 1) / (ans.total_s - ans.ttft_s)))
    out = out[1:]
    return {"ttft_2s_ms": 1e3 * median(o[0] for o in out), "decode_tps": median(o[1] for o in out),
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "weights_gib": weights / GIB,
            "prompt_tokens": inputs.num_tokens}


def exactness(model, proc, modes, frames, n_points: int) -> dict:
    """fp32 (TF32 off): greedy tokens and choices of every mode equal the offline path's at n_points pauses.

    Each mode streams the same random chunking (1..7 frames a call) and answers at every pause;
    the offline references (prefill + greedy decode, one prefill per choice) are computed once.
    """
    import random

    rng = random.Random(0)
    pauses = sorted(rng.sample(range(1, 21), n_points)) if n_points <= 20 else list(range(1, n_points + 1))
    chunks = []
    for p in pauses:  # pause after 2p frames
        while sum(chunks) < 2 * p:
            chunks.append(min(rng.randint(1, 7), 2 * p - sum(chunks)))
    answers = {}
    for mode in modes:
        engine = VideoStreamInference(model, proc, fast=(mode == "fast"))
        engine.reset()
        seen, out = 0, []
        for c in chunks:
            engine.append_frames(frames[seen:seen + c], fps=FPS)
            seen += c
            if seen in {2 * p for p in pauses}:
                a = engine.ask(Q, max_new_tokens=8)
                out.append((a.token_ids, a.first_logits, engine.ask_choice(Q, CHOICES).index))
        answers[mode] = out
        stops = engine.stop_ids
    res = {mode: {"pauses": len(pauses), "greedy_equal": 0, "choice_equal": 0, "max_abs_logit_diff": 0.0} for mode in modes}
    for k, p in enumerate(pauses):
        native = native_generate(model, build_inputs(model, proc, chat_segments(proc, Q, frames[:2 * p], FPS)), 8, stops)
        ref_choice = offline_choice(model, proc, frames[:2 * p])
        for mode in modes:
            tokens, first, choice = answers[mode][k]
            r = res[mode]
            r["greedy_equal"] += tokens == native.token_ids
            r["choice_equal"] += choice == ref_choice
            r["max_abs_logit_diff"] = max(r["max_abs_logit_diff"], float((first - native.first_logits).abs().max()))
    for mode, r in res.items():
        print(f"    fp32 {mode}: greedy tokens equal at {r['greedy_equal']}/{r['pauses']}, choices equal at "
              f"{r['choice_equal']}/{r['pauses']}, max |diff| {r['max_abs_logit_diff']:.2e}")
    return res


def offline_choice(model, proc, frames) -> int:
    from model.offline import native_logits

    tok, scores = proc.tokenizer, []
    for c in CHOICES:
        ids = tok.encode(c, add_special_tokens=False)
        logits = native_logits(model, build_inputs(model, proc, chat_segments(proc, Q, frames, FPS) + [("ids", ids)]), True)
        logp = torch.log_softmax(logits[0, -len(ids) - 1:-1], -1)
        scores.append(float(logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).sum()))
    return max(range(len(scores)), key=scores.__getitem__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,fast")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--lengths", default="2,8,16,32,60", help="cached seconds for chunk time / TTFT against length")
    p.add_argument("--exact-points", type=int, default=20, help="fp32 pause points for the exactness check (0: skip)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a chunk and a decode step")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    modes = args.modes.split(",")
    frames = synthetic_frames(120, SIZE, SIZE)
    results = {"meta": {**device_info(), "dtype": "bfloat16", "resolution": [SIZE, SIZE], "fps": FPS, "chunk": CHUNK,
                        "command": "python benchmarks/bench_fast_path.py " + " ".join(argv or sys.argv[1:])}}
    results["ceilings"] = ceil = ceilings()
    print(f"  card {results['meta']['card']}: matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    model = build_random_model(QWEN25_VL_3B_CONFIG, dtype=torch.bfloat16, device="cuda")
    proc = build_3b_processor()
    for mode in modes:
        print(f"  mode {mode}")
        engine = VideoStreamInference(model, proc, fast=(mode == "fast"))
        results[mode] = measure_mode(engine, frames, args.repeats, [float(x) for x in args.lengths.split(",")])
        if args.profile:
            results[mode]["profile"] = profile(engine, frames)
        del engine
        torch.cuda.empty_cache()
    results["native"] = measure_native(VideoStreamInference(model, proc), frames, args.repeats)
    results["floors"] = floors(model, ceil, results[modes[0]]["cache_tokens_2s"])
    print_table(results, modes)
    if args.exact_points:
        del model
        torch.cuda.empty_cache()
        set_exact_fp32()
        model32 = build_random_model(QWEN25_VL_3B_CONFIG, dtype=torch.float32, device="cuda")
        results["exactness_fp32"] = exactness(model32, proc, modes, frames, args.exact_points)
    if args.plot:
        plot(results, modes, args.plot)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def profile(engine, frames) -> dict:
    """Top CUDA kernels (by total time) of one 4-frame chunk at 2 s and of one 16-token answer."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine.reset()
    for i in range(0, 60, CHUNK):
        engine.append_frames(frames[i:i + CHUNK], fps=FPS)
    out = {}
    for name, fn in [("chunk", lambda: chunk_time(engine, frames[60:], 1)),
                     ("answer16", lambda: engine.ask(Q, max_new_tokens=16))]:
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
        print(f"  profile: {name}\n{table}")
        out[name] = table
    engine.reset()
    return out


def print_table(results, modes):
    rows = [("ingest 4-frame chunks @2 s (frames/s)", "ingest_fps", ">="), ("TTFT, 2 s cached (ms)", "ttft_2s_ms", "<="),
            ("TTFT, 60 s cached (ms)", "ttft_60s_ms", "<="), ("decode batch 1 (tokens/s)", "decode_tps", ">="),
            ("ask_choice 4 choices @2 s (ms)", "choice4_ms", "<="),
            ("peak - weights - cache (GiB)", "mem_over_weights_cache_gib", "<=")]
    head = f"  {'metric':38s} | {'target':>7} | " + " | ".join(f"{m:>8}" for m in modes) + f" | {'native':>8} | {'floor':>8}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for name, key, op in rows:
        vals = " | ".join(_fmt(results[m].get(key)) for m in modes)
        print(f"  {name:38s} | {op}{TARGETS[key]:>5} | {vals} | {_fmt(results['native'].get(key))} | "
              f"{_fmt(results['floors'].get(key))}")
    for m in modes:
        r = results[m]
        print(f"  {m}: chunk = preprocess {r['preprocess_ms']:.1f} + vision {r['vision_ms']:.1f} + LM append "
              f"{r['lm_append_ms']:.1f} ms (measured whole: {r['chunk_ms']:.1f} ms); peak {r['peak_gib']:.2f} GiB")


def _fmt(v) -> str:
    return f"{v:8.1f}" if isinstance(v, (int, float)) else f"{'-':>8}"


def plot(results, modes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in modes:
        rows = results[m]["by_length"]
        ax.plot([r["seconds"] for r in rows], [r["chunk_ms"] for r in rows], "o-", label=f"{m}: 4-frame chunk")
        ax.plot([r["seconds"] for r in rows], [r["ttft_ms"] for r in rows], "s--", label=f"{m}: question TTFT")
    ax.axhline(CHUNK / FPS * 1e3, color="gray", lw=0.8, label="real time at 30 fps (133 ms per 4 frames)")
    ax.set(xlabel="video already cached (s at 30 fps)", ylabel="ms", yscale="log",
           title=f"{results['meta']['card']}, bf16, 448x448, Qwen2.5-VL-3B arch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
