"""Cost of mixed precision: w4a8-mp's compression time against w8a8's on tiny random pipelines
of every family (and optionally the demo), with both image estimates.

    python eval/mp_cost.py                   # tiny DiT, PixArt, SD3, FLUX, Sana
    python eval/mp_cost.py --demo            # also the demo model

Prints, per model, the ptq pass seconds of w8a8 and of w4a8-mp with image_estimate first_order
(the default) and measure, and PSNR of each against the original.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ["calibration.num_prompts=2", "calibration.steps=3", "eval.num_prompts=2",
        "eval.steps=3", "eval.latency=false", "gates={}"]


def main() -> int:
    import compress
    from compress.metrics.timing import cpu_model

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mp-cost-"))
    os.environ.setdefault("DIT_COMPRESS_CACHE", str(work / "cache"))
    models: list[tuple[str, str, list[str]]] = []
    import tiny_pipelines as tp

    for fam in tp.FAMILIES:
        src = work / fam
        getattr(tp, "_" + fam)().save_pretrained(src)
        models.append((fam, str(src), TINY))
    if a.demo:
        models.append(("demo", "demo", []))
    print(f"# {cpu_model()}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads")
    print("| model | w8a8 s | w4a8-mp first_order s (x w8a8) | w4a8-mp measure s | PSNR w8a8 / "
          "mp first_order / mp measure |")
    print("|---|---:|---:|---:|---|")
    for name, src, sets in models:
        secs, psnr = {}, {}
        for key, recipe, extra in (
                ("w8a8", "recipes/w8a8.yaml", []),
                ("fo", "recipes/w4a8-mp.yaml",
                 ["passes.0.ptq.mixed_precision.image_estimate=first_order"]),
                ("measure", "recipes/w4a8-mp.yaml",
                 ["passes.0.ptq.mixed_precision.image_estimate=measure"])):
            rep = compress.run_recipe(recipe, model=src, out=None, overrides=sets + extra)
            secs[key] = rep["passes"][0]["seconds"]
            psnr[key] = rep["quality"]["psnr_vs_teacher"]
        print(f"| {name} | {secs['w8a8']:.1f} | {secs['fo']:.1f} ({secs['fo'] / secs['w8a8']:.2f}x)"
              f" | {secs['measure']:.1f} | {psnr['w8a8']:.2f} / {psnr['fo']:.2f} / "
              f"{psnr['measure']:.2f} dB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
