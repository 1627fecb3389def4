"""ask_choice memory grows with the number of choice tokens, not with tokens x vocabulary.

Measured in a fresh process (peak resident memory reset right before the call, via
/proc/self/clear_refs): 1,000 short choices and one 5,000-character choice, on the tiny model
(vocabulary 151,936 like Qwen's). Before bounded scoring they peaked at 5.1 GB and 9.6 GB;
the bound here is a tenth of that.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(2)
from model import VideoStreamInference
from model.testing import build_tiny_model, synthetic_frames

def rss_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

model, proc = build_tiny_model()
engine = VideoStreamInference(model, proc)
engine.append_frames(synthetic_frames(4, 90, 120), fps=2)
engine.ask_choice("Warm?", ["a", "b c"])
choices = [f"choice number {i}" for i in range(1000)] if sys.argv[1] == "many" else ["x" * 5000, "short"]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
before = rss_kib("VmRSS")
result = engine.ask_choice("Which one?", choices)
print(json.dumps({"peak_increase_mib": (rss_kib("VmHWM") - before) / 1024, "n": len(result.scores)}))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to measure a call's peak")
@pytest.mark.parametrize("case,limit_mib", [("many", 5100 / 10), ("long", 9600 / 10)], ids=["1000-choices", "5000-chars"])
def test_ask_choice_peak_memory_is_bounded(case, limit_mib):
    out = subprocess.run([sys.executable, "-c", SCRIPT, case], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == (1000 if case == "many" else 2)
    assert got["peak_increase_mib"] < limit_mib, got
