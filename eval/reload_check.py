"""Reload outputs the way a user does and re-measure them: each output folder is loaded with
``compress.load_pipeline`` (or, with ``--stock``, with stock ``DiffusionPipeline.from_pretrained``),
its report's evaluation prompts and seeds are sampled again and scored against the original's
images, and the figures are compared with the report's.

    python eval/reload_check.py runs/quality-width64/width-30-kd runs/quality-depth256/depth-25-kd
    python eval/reload_check.py --stock runs/quality-depth/depth-50-kd

Exit status 1 when a figure differs (prompt accuracy exactly; PSNR and SSIM within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and (math.isinf(a) or math.isinf(b)):
        return a == b
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


def check(out: Path, stock: bool) -> bool:
    import compress
    from compress.metrics.evaluate import quality, sample_images, teacher_images
    from compress.models import load_model
    from compress.models.base import ModelHandle

    rep = json.loads((out / "report.json").read_text())
    src = rep["model"]["path"] or "demo"
    original = load_model(src)
    if stock:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(out)
    else:
        pipe = compress.load_pipeline(out)
    ev = rep["eval"]
    args = (ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    handle = ModelHandle(pipeline=pipe, transformer=pipe.transformer, adapter=original.adapter)
    student = sample_images(handle, *args)
    teacher = teacher_images(original, *args)
    got = quality(teacher, student, ev["prompts"], demo=rep["quality"].get("prompt_accuracy")
                  is not None)
    ok = True
    for k in ("prompt_accuracy", "psnr_vs_teacher", "ssim_vs_teacher"):
        same = _same(got.get(k), rep["quality"].get(k))
        ok &= same
        print(f"  {k}: report {rep['quality'].get(k)} reloaded {got.get(k)}"
              f"{'' if same else '  DIFFERENT'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path)
    ap.add_argument("--stock", action="store_true",
                    help="load with stock DiffusionPipeline.from_pretrained instead")
    a = ap.parse_args()
    bad = 0
    for out in a.outputs:
        print(f"== {out}{' (stock diffusers)' if a.stock else ''}", flush=True)
        bad += not check(out, a.stock)
    print("all figures reproduced" if not bad else f"{bad} output(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
