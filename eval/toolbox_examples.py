"""Run the README's LoRA / offloading / torch.compile example, as written, on demo outputs.

    python eval/toolbox_examples.py runs/quality/w8a8 runs/quality/w4a8-mp runs/vq runs/depth

The code block after ``<!-- toolbox-example -->`` in README.md is executed once per output
(its ``OUT = ...`` line pointed at that output), then what its comments claim is checked: the
LoRA draws the caption's object red where the output alone does not, and the compiled
pipeline's image matches the eager one (PSNR >= 40 dB: inductor's kernels round
differently, which 20 denoising steps carry on).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def example() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- toolbox-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.DOTALL).group(1)


def main() -> int:
    import torch

    import compress
    from compress.demo.lora import lora_effect

    code = example()
    failed = 0
    for out in sys.argv[1:]:
        src = re.sub(r'^OUT = .*$', f"OUT = {str(out)!r}", code, count=1, flags=re.MULTILINE)
        ns: dict = {}
        exec(compile(src, f"README example on {out}", "exec"), ns)  # noqa: S102 - our README
        plain = compress.load_pipeline(out)(
            ns["prompt"], generator=torch.Generator().manual_seed(0)).images[0]
        from compress.metrics.image import psnr

        diff = psnr(np.asarray(ns["image"])[None] / 255.0, np.asarray(plain)[None] / 255.0)
        red = lora_effect([ns["red"]], [ns["prompt"]])
        alone = lora_effect([plain], [ns["prompt"]])
        ok = red == 1.0 and alone == 0.0 and diff >= 40
        failed += not ok
        print(f"{out}: LoRA image red {red:.0f}, output alone red {alone:.0f}, compiled vs eager "
              f"PSNR {diff:.1f} dB -> {'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
