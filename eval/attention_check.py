"""What attention's matmul form costs in accuracy at PixArt-alpha-XL shapes, in bf16.

The matmul form (compress/modules/attention.py) rounds the attention scores to bf16 before the
softmax, where torch's fused CPU kernel keeps them in fp32. This runs one transformer call of
eval/bench_speed.py's model (random weights, 28 blocks, batch 2, 256 + 120 tokens) in fp32 and
in bf16 with each attention form, and prints the SQNR of each bf16 output against fp32's, and
each form's choice and timings at these shapes.

    python eval/attention_check.py [--blocks 28] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    import bench_speed as bench

    from compress.metrics.timing import cpu_model
    from compress.modules import attention

    master = bench.build_model(a.blocks)
    bf16 = bench._bf16(master)
    attention.enable(bf16)
    out = {}
    with torch.no_grad():
        ref = master(**bench.make_inputs(torch.float32))[0].float()
        inputs = bench.make_inputs(torch.bfloat16)
        for form in ("sdpa", "matmul", "auto"):
            os.environ["DIT_COMPRESS_ATTENTION"] = form
            attention.reset_choices()
            out[form] = bf16(**inputs)[0].float()
    print(f"# {cpu_model()}, {a.threads} threads, {a.blocks} blocks")
    print(f"SQNR against fp32: bf16 with torch's kernel {sqnr_db(ref, out['sdpa']):.2f} dB, "
          f"bf16 with the matmul form {sqnr_db(ref, out['matmul']):.2f} dB "
          f"(the two against each other: {sqnr_db(out['sdpa'], out['matmul']):.2f} dB)")
    print(f"auto's choice here: {attention.choices()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
