"""Latency per denoising step of saved outputs against the original, timed in alternation.

Each round times one transformer call (the first calibration sample of the recipes' default
calibration: 8 "auto" prompts, the family's steps and guidance) on the original and then on each
output, so every ratio compares runs made under the same machine load; the figure is the median
of the per-round ratios. Run it with nothing else on the machine.

    python eval/latency_pairs.py runs/quality-width64/width-30-kd runs/quality-depth256/depth-25-kd
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path)
    ap.add_argument("--model", default="demo", help="the original the outputs came from")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=5, help="calls per timing (their mean)")
    a = ap.parse_args()

    import compress
    from compress.models import load_model
    from compress.recipe import CalibrationConfig
    from compress.runner import capture_calibration, family_defaults

    orig = load_model(a.model)
    calib = capture_calibration(orig, CalibrationConfig(num_prompts=8),
                                family_defaults(orig), None, "cpu")
    s = calib.sample(0)
    models = {"original": orig.transformer.eval()}
    for out in a.outputs:
        models[str(out)] = compress.load_pipeline(out).transformer.eval()

    def once(tr) -> float:
        with torch.no_grad():
            orig.adapter.call(tr, s.args, s.kwargs)  # warm
            t0 = time.perf_counter()
            for _ in range(a.calls):
                orig.adapter.call(tr, s.args, s.kwargs)
        return (time.perf_counter() - t0) / a.calls * 1000

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.rounds):
        for k, tr in models.items():
            times[k].append(once(tr))
    from compress.metrics.timing import cpu_model
    from compress.modules import attention, weight_cache

    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {a.rounds} rounds of {a.calls} calls")
    # part of an output's speed may be the kernel its kept weights chose, not its bits
    print(f"kept-weight GEMM: {weight_cache.packed_choices() or 'none used'}")
    att = [(r["q"], r["k"], r["kernel"], r.get("us")) for r in attention.choices()]
    print(f"attention (outputs only): {att or 'none seen'}")
    base = times["original"]
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"  {k}: {statistics.median(ts):.2f} ms per step, {ratio:.3f}x the original")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
