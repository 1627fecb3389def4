"""The live-length Triton kernel, run by Triton's interpreter on CPU (no GPU needed).

It must compute attention of n new rows at [start, start+n) over a longer buffer exactly like
SDPA over the live keys (bottom-right causal, grouped-query heads), for any split count, with
tree masks for choice branches, and an engine using it (eager and through the static graph
path) must equal the offline path. fp32 only: the interpreter has no bfloat16 dot (the GPU
benchmark checks bf16 against SDPA, ``benchmarks/bench_attention.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton", reason="Triton is not installed (CI installs it; GPU users have it with torch)")

SCRIPT = r"""
import torch, torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from model import triton_attention as ta
from model.masks import branch_starts, tree_mask
torch.manual_seed(0)

def reference(q, k, v, start, scale, mask=None):
    _, hq, n, d = q.shape
    g = hq // k.shape[1]
    kk, vv = (t[:, :, :start + n].repeat_interleave(g, 1) for t in (k, v))
    m = mask if mask is not None else causal_lower_right(n, start + n)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scale).transpose(1, 2)

def gap(x):  # the largest difference; NaN counts as infinite (max() would skip it)
    return float("inf") if bool(torch.isnan(x).any()) else float(x.abs().max())

worst = 0.0
# splits beyond a merge step's 16 (decode at long caches uses up to 128), empty ranges among them
for n, start, cap, splits in [(1, 0, 64, 1), (1, 100, 300, 3), (5, 37, 200, 2), (20, 130, 160, 4), (40, 0, 64, 1),
                              (3, 70, 80, 7), (1, 2500, 2600, 40), (2, 4000, 4100, 70), (40, 900, 1000, 11)]:
    q = torch.randn(1, n, 4, 16).transpose(1, 2)  # strided, as transformers hands it
    k, v = torch.randn(1, 2, cap, 16), torch.randn(1, 2, cap, 16)
    out = ta.attention(q, k, v, torch.tensor(start), 0.25, splits=splits)
    worst = max(worst, gap(out - reference(q, k, v, start, 0.25)))
lengths = [3, 1, 4]
q = torch.randn(1, 8, 4, 16).transpose(1, 2)
k, v = torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
out = ta.attention(q, k, v, torch.tensor(50), 0.25, splits=3, branches=branch_starts(lengths, "cpu"))
mask = tree_mask(50, lengths, torch.float32, "cpu")
worst = max(worst, gap(out - reference(q, k, v, 50, 0.25, mask)))
assert worst < 1e-5, worst

from model import StreamConfig, VideoStreamInference
from model.offline import build_inputs, question_events, native_generate
from model.testing import build_tiny_model, synthetic_frames
model, proc = build_tiny_model()
frames = synthetic_frames(9, 90, 120)
ref = native_generate(model, build_inputs(model, proc, question_events("What?", frames, 4)), 5, set())
scores = []
for graphs in (False, True):
    # graphs: the CUDA-graph path's static shapes, replayed eagerly
    e = VideoStreamInference(model, proc, config=StreamConfig(attention_kernel="triton", emulate_graphs=graphs))
    assert e.stats()["text_attention"] == "stream_triton"
    e.stop_ids = set()
    e.append_frames(frames[:3], fps=4)
    e.append_frames(frames[3:], fps=4)
    a = e.ask("What?", max_new_tokens=5)
    assert a.token_ids == ref.token_ids and float((a.first_logits - ref.first_logits).abs().max()) <= 1e-4
    scores.append(e.ask_choice("Which?", ["a b c", "dd", "x"]).scores)
plain = VideoStreamInference(model, proc, config=StreamConfig(attention_kernel="torch"))
plain.append_frames(frames, fps=4)
expected = plain.ask_choice("Which?", ["a b c", "dd", "x"]).scores
for s in scores:
    assert all(abs(x - y) <= 1e-4 for x, y in zip(s, expected)), (s, expected)

# bounded streams: scattered slots, a per-slot rank in the kernel, equal to SDPA with the dense slot mask
from model.masks import rank_of, scan_end, slot_mask
# used: slots [0, used) hold everything (slots are allocated lowest first); the kernel scans only those
for n, cap, used, kept, splits, lengths in [(1, 64, 64, 30, 1, None), (5, 200, 200, 120, 3, None),
                                            (8, 150, 150, 60, 2, [3, 1, 4]), (4, 200, 77, 50, 3, None)]:
    q = torch.randn(1, n, 4, 16).transpose(1, 2)
    k, v = torch.randn(1, 2, cap, 16), torch.randn(1, 2, cap, 16)
    perm = torch.randperm(used)
    visible = torch.zeros(cap, dtype=torch.bool)
    visible[perm[:kept]] = True
    slots = perm[kept:kept + n].sort().values
    dense = slot_mask(visible, slots, lengths, torch.float32)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=dense,
                                          scale=0.25).transpose(1, 2)
    rank = rank_of(visible, slots)
    assert int(scan_end(rank)) == 1 + int(max(slots.max(), perm[:kept].max())), (int(scan_end(rank)), used)
    for scan in (torch.tensor(cap), scan_end(rank)):  # the whole capacity, or only the slots in use: equal
        got = ta.attention(q, k, v, scan, 0.25, splits=splits, rank=rank,
                           branches=branch_starts(lengths, "cpu") if lengths else None)
        worst = max(worst, gap(got - want))
# a row whose first splits see nothing (a bounded stream that kept only late slots): the merge's running max
# starts at -inf for it and must not turn it into NaN
n, cap = 1, 5000  # 45 splits of 128 keys: the first 33 (two of the merge's steps of 16 at 2 rows) see nothing
q = torch.randn(1, n, 4, 16).transpose(1, 2)
k, v = torch.randn(1, 2, cap, 16), torch.randn(1, 2, cap, 16)
visible = torch.zeros(cap, dtype=torch.bool)
visible[4300:4990] = True
slots = torch.tensor([4995])
want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                      attn_mask=slot_mask(visible, slots, None, torch.float32), scale=0.25).transpose(1, 2)
got = ta.attention(q, k, v, torch.tensor(cap), 0.25, splits=45, rank=rank_of(visible, slots))
worst = max(worst, gap(got - want))
assert worst < 1e-5, worst
bounded = []
for kernel, graphs in (("torch", False), ("triton", False), ("triton", True)):
    e = VideoStreamInference(model, proc, config=StreamConfig(attention_kernel=kernel, cache_budget_tokens=90,
                                                              recall_grids=1, emulate_graphs=graphs))
    for i in range(0, 9, 3):
        e.append_frames(frames[i:i + 3], fps=4)
    assert e.stats()["evicted_grids"] > 0
    assert e.stats()["text_attention"] == ("stream_triton" if kernel == "triton" else "stream_sdpa")
    assert not graphs or e.stats()["cuda_graphs"] != "off"
    a = e.ask("What?", max_new_tokens=3)
    bounded.append((a.first_logits, a.token_ids, e.ask_choice("Which?", ["a b c", "dd"]).scores))
for logits, tokens, choice in bounded[1:]:
    assert float((logits - bounded[0][0]).abs().max()) <= 1e-4 and tokens == bounded[0][1]
    assert all(abs(x - y) <= 1e-4 for x, y in zip(choice, bounded[0][2])), (choice, bounded[0][2])
print("ok", worst)
"""


@pytest.mark.slow
def test_triton_kernel_in_the_interpreter_equals_sdpa_and_offline():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_asking_for_triton_without_it_is_a_clear_error(tiny):
    from model import StreamConfig, VideoStreamInference

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter makes Triton available on CPU")
    with pytest.raises(ValueError, match="attention_kernel='triton' needs Triton and a CUDA device"):
        VideoStreamInference(*tiny, config=StreamConfig(attention_kernel="triton"))
