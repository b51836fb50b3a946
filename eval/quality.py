"""Quality table: run several recipes (and peer tools) on one model with the same calibration
and evaluation prompts and seeds, then print one table.

    python eval/quality.py recipes/w8.yaml recipes/w4-g64.yaml --model demo
    python eval/quality.py recipes/w8a8.yaml --peers quanto-w8a8,quanto-w4,bnb-nf4 --num-prompts 64
    python eval/quality.py recipes/vq-2bit.yaml recipes/vq-3bit.yaml eval/recipes/*.yaml \
        --peers quanto-w2,quanto-w4                     # VQ against its baselines

eval/recipes/ holds baselines that are not shipped schemes: scalar 2- and 3-bit GPTQ and plain
k-means VQ without calibration (the VQ table's peers at the same bits).

Columns: bits per weight, stored bytes, PSNR / SSIM / Fréchet distance against the original's
images, prompt accuracy (demo), latency per denoising step, compression seconds. Every recipe
shares the calibration and evaluation settings given here (they override the recipe's), so the
original's images are sampled once (cached) and every row sees the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", help="recipe YAML files")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--work", type=Path, default=Path("runs/quality"), help="where outputs go")
    ap.add_argument("--num-prompts", type=int, default=64, help="evaluation prompts")
    ap.add_argument("--calib-prompts", type=int, default=8,
                    help="calibration prompts, for every recipe and peer alike")
    ap.add_argument("--peers", default="", help="comma list of peer schemes (see eval/peers.py)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--plot", default=None, help="quality vs bits plot (PNG)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every recipe, as `dit-compress run --set` "
                         "(e.g. passes.1.distill.batch=4); repeatable")
    ap.add_argument("--lora", nargs="?", const="demo", default=None, metavar="FILE",
                    help="also sample each of our outputs (demo) with a LoRA made for the "
                         "original and compare with the original + LoRA (default: the demo's "
                         "red LoRA; eval/lora_quality.py)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep rows whose output folder already holds a report.json, and continue "
                         "an interrupted training pass from its checkpoint (resume an "
                         "interrupted table; rerun without it after changing code)")
    a = ap.parse_args()

    import compress
    from compress.errors import GateFailed
    from compress.report.compare import compare

    a.work.mkdir(parents=True, exist_ok=True)
    outs, failed = [], []
    common = [f"eval.num_prompts={a.num_prompts}", f"calibration.num_prompts={a.calib_prompts}",
              "gates={}", *a.sets]
    for r in a.recipes:
        out = a.work / Path(r).stem
        print(f"== {r}", flush=True)
        if a.reuse and (out / "report.json").is_file():
            print("   reusing", out, flush=True)
            outs.append(out)
            continue
        try:
            compress.run_recipe(r, model=a.model, out=out, overrides=common, force=True,
                                resume=a.reuse)
        except GateFailed:
            pass
        outs.append(out)
    if a.peers:
        from peers import PeerFailed, run_peer

        for name in [p.strip() for p in a.peers.split(",") if p.strip()]:
            print(f"== peer {name}", flush=True)
            done = a.work / f"peer-{name}"
            if a.reuse and (done / "report.json").is_file():
                print("   reusing", done, flush=True)
                outs.append(done)
                continue
            try:
                outs.append(run_peer(name, a.model, a.work / f"peer-{name}", a.num_prompts,
                                     a.calib_prompts))
            except PeerFailed as exc:  # the table goes on without that row, and says why
                print(f"   {exc}", flush=True)
                failed.append(str(exc))
    print(compare(outs, out_md=a.out, plot=a.plot))
    for f in failed:
        print("not in the table:", f)
    if a.lora is not None:  # LoRA on the original against LoRA on each output (issue 17)
        from lora_quality import lora_table

        mine = [o for o in outs if not o.name.startswith("peer-")]
        table = lora_table(mine, None if a.lora == "demo" else a.lora)
        if a.out:
            Path(a.out).with_suffix(".lora.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
