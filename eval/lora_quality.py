"""LoRA on compressed outputs (issue 17): the demo's red LoRA on the original and on each output.

    python eval/quality.py recipes/w8a8.yaml recipes/w4a8-mp.yaml --work runs/quality-lora
    python eval/lora_quality.py runs/quality-lora/w8a8 runs/quality-lora/w4a8-mp

Every output is sampled on the prompts and seeds of its own report (those of its evaluation),
with and without the LoRA (``compress.load_lora``, strength ``--scale``); the original likewise.
Columns: PSNR of the output against the original, PSNR of (output + LoRA) against (original +
LoRA) and the difference, and the LoRA's effect as the checker reads it (the fraction of images
drawn red whose caption asked for another colour) on the original and on the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path, help="output directories of the demo")
    ap.add_argument("--lora", default=None, help="LoRA file (default: the demo's red LoRA)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="the first N of each report's evaluation prompts (default: all)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args()
    table = lora_table(a.outputs, a.lora, a.scale, a.num_prompts)
    if a.out:
        Path(a.out).write_text(table)
    return 0


def lora_table(outputs: list[Path], lora=None, scale: float = 1.0,
               num_prompts: int | None = None) -> str:
    """The table (markdown) for ``outputs``; also printed."""
    import compress
    from compress.demo.lora import RED_LORA, lora_effect
    from compress.metrics.image import psnr
    from compress.models import load_model

    lora = lora or RED_LORA
    cache: dict[tuple, tuple] = {}

    def sample(pipe, ev, n):  # the demo family's sampler, taken from the first load below
        return pipe_generate(pipe, ev["prompts"][:n], ev["seeds"][:n], ev["steps"],
                             ev["guidance"], ev["resolution"])

    rows = []
    for out in outputs:
        ev = json.loads((out / "report.json").read_text())["eval"]
        n = num_prompts or len(ev["prompts"])
        key = (tuple(ev["prompts"][:n]), tuple(ev["seeds"][:n]), ev["steps"])
        if key not in cache:  # the original, with and without the LoRA, once per prompt set
            handle = load_model("demo")
            pipe_generate, orig = handle.adapter.generate, handle.pipeline
            base = sample(orig, ev, n)
            compress.load_lora(orig, lora, scale)
            cache[key] = (base, sample(orig, ev, n))
        base, base_l = cache[key]
        pipe = compress.load_pipeline(out)
        img = sample(pipe, ev, n)
        compress.load_lora(pipe, lora, scale)
        img_l = sample(pipe, ev, n)
        caps = ev["prompts"][:n]
        p0, p1 = psnr(img, base), psnr(img_l, base_l)
        rows.append((out.name, p0, p1, p1 - p0, lora_effect(base_l, caps), lora_effect(img_l, caps),
                     lora_effect(img, caps)))
        print(f"{out.name}: {p0:.2f} dB -> with LoRA {p1:.2f} dB", flush=True)
    head = ("| output | PSNR vs original | PSNR +LoRA vs original +LoRA | difference | "
            "LoRA effect on original | LoRA effect on output | output without LoRA |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {r[0]} | {r[1]:.2f} dB | {r[2]:.2f} dB | {r[3]:+.2f} dB | {100 * r[4]:.1f}% | "
        f"{100 * r[5]:.1f}% | {100 * r[6]:.1f}% |\n" for r in rows)
    print(f"\nLoRA {lora} at strength {scale}\n\n{table}")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
