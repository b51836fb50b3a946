"""Prompt accuracy of the demo pipeline on held-out captions, measured through diffusers.

Samples captions from the demo grammar with a seed the training never used, generates one image
per caption with the stock PixArtSigmaPipeline (batched; image i seeded with seed + i, so results
do not depend on the batch size), and checks every image with the rule-based checker. The final
latent (the 32x32 image the transformer produced) is captured too and checked as an image, so the
VAE's part in any error shows up as latent-vs-decoded disagreement.

    python eval/demo_accuracy.py                      # shipped weights, DEMO_DEFAULTS
    python eval/demo_accuracy.py --ckpt runs/demo/ckpt.pt --guidance 4 --n 96
    python eval/demo_accuracy.py --prompts calibration_data/demo_eval.txt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.demo import DEMO_DEFAULTS, demo_call_kwargs, demo_dir, load_demo_pipeline
from compress.demo.shapes import sample_scene
from compress.metrics.checker import ATTRIBUTES, check

# never used by training (seed 0 draws random.Random(step)), nor by calibration_data/
HELD_OUT_SEED = 20261122


def held_out_captions(n: int, seed: int = HELD_OUT_SEED, objects: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [sample_scene(rng, objects).caption for _ in range(n)]


def latent_to_uint8(lat: torch.Tensor) -> np.ndarray:
    """The demo latent is the 32x32 image in [-1, 1]: CHW -> HWC uint8."""
    return ((lat.float().clamp(-1, 1) / 2 + 0.5) * 255).round().byte().permute(1, 2, 0).numpy()


def load_ckpt_transformer(pipe, ckpt: Path) -> int:
    """Swap the pipeline's transformer weights for a train_demo.py checkpoint's EMA weights."""
    from eval.train_demo import TRANSFORMER_CONFIG

    for key, value in TRANSFORMER_CONFIG.items():
        have = pipe.transformer.config[key]
        if (list(have) if isinstance(have, tuple) else have) != value:
            raise SystemExit(f"{ckpt}: config key {key} differs from the shipped transformer")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    dtype = next(pipe.transformer.parameters()).dtype
    pipe.transformer.load_state_dict({k: v.to(dtype) for k, v in state["ema"].items()})
    return int(state["step"])


def run(pipe, captions: list[str], seed: int, batch: int, call_kwargs: dict) -> list[dict]:
    rows = []
    for b in tqdm(range(0, len(captions), batch), desc="demo accuracy", unit="batch"):
        caps = captions[b : b + batch]
        gens = [torch.Generator().manual_seed(seed + b + i) for i in range(len(caps))]
        final: dict[str, torch.Tensor] = {}
        steps = call_kwargs["num_inference_steps"]

        def grab(step_idx: int, t, latents: torch.Tensor, final=final, steps=steps) -> None:
            if step_idx == steps - 1:
                final["latents"] = latents.detach().clone()

        images = pipe(caps, generator=gens, callback=grab, **call_kwargs).images
        for i, (cap, img) in enumerate(zip(caps, images, strict=True)):
            v_img = check(img, cap)
            v_lat = check(latent_to_uint8(final["latents"][i]), cap)
            rows.append({"caption": cap, "seed": seed + b + i, "image": v_img, "latent": v_lat})
    return rows


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    keys = (*ATTRIBUTES, "all")
    out = {
        "image": {k: sum(r["image"][k] for r in rows) / n for k in keys},
        "latent": {k: sum(r["latent"][k] for r in rows) / n for k in keys},
        "latent_vs_image_agreement": sum(r["image"] == r["latent"] for r in rows) / n,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=256, help="number of held-out captions")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="caption and noise seed")
    ap.add_argument("--objects", type=int, default=1, help="objects per caption (1 to 3)")
    ap.add_argument("--prompts", type=Path, default=None, help="caption file, one a line")
    ap.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help="use this train_demo.py checkpoint's EMA weights instead of the shipped",
    )
    ap.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"])
    ap.add_argument("--guidance", type=float, default=DEMO_DEFAULTS["guidance"])
    ap.add_argument("--max-sequence-length", type=int, default=DEMO_DEFAULTS["max_sequence_length"])
    ap.add_argument(
        "--solver-order",
        type=int,
        default=None,
        help="override the scheduler's DPM-Solver order (1 is plain Euler on the flow ODE)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/demo_accuracy.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.prompts is not None:
        captions = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
        captions = captions[: args.n]
    else:
        captions = held_out_captions(args.n, args.seed, args.objects)
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    source = str(demo_dir() / "transformer")
    info_path = demo_dir() / "demo_info.json"
    step = json.loads(info_path.read_text())["transformer_step"] if info_path.exists() else None
    if args.ckpt is not None:
        step = load_ckpt_transformer(pipe, args.ckpt)
        source = str(args.ckpt)
    if args.solver_order is not None:
        pipe.scheduler = pipe.scheduler.from_config(
            pipe.scheduler.config, solver_order=args.solver_order
        )
    call_kwargs = demo_call_kwargs(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
    )
    t0 = time.time()
    rows = run(pipe, captions, args.seed, args.batch, call_kwargs)
    summary = summarize(rows)
    report = {
        "transformer": source,
        "transformer_step": step,
        "n": len(rows),
        "caption_seed": None if args.prompts else args.seed,
        "prompts": str(args.prompts) if args.prompts else None,
        "call": call_kwargs,
        "solver_order": pipe.scheduler.config.solver_order,
        "seconds": round(time.time() - t0, 1),
        **summary,
        "rows": rows,
    }
    print(
        f"transformer {source} (step {step}), {len(rows)} captions, "
        f"solver order {pipe.scheduler.config.solver_order}, {call_kwargs}"
    )
    print(f"{'attribute':<10} {'image':>7} {'latent':>7}")
    for k in (*ATTRIBUTES, "all"):
        print(f"{k:<10} {summary['image'][k]:7.3f} {summary['latent'][k]:7.3f}")
    print(f"latent vs decoded checker agreement: {summary['latent_vs_image_agreement']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
