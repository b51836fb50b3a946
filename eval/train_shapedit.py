"""Train ShapeDiT (compress/demo/shapedit.py), the plain-PyTorch class-conditional demo model.

DDPM epsilon prediction on 32x32 pixels of the demo's one-object scenes (432 classes: colour x
shape x size x position), cosine schedule, 10% of labels dropped for classifier-free guidance,
AdamW with a cosine learning rate, EMA weights, bf16 autocast. Seeded and resumable: batch and
noise are functions of (seed, step) and a checkpoint is written atomically every
``--ckpt-every`` steps, so a stopped run continues with the data it would have seen.
``--export`` writes the EMA weights (fp16) into the package as the shipped model.

    python eval/train_shapedit.py --out runs/shapedit --steps 5000
    python eval/train_shapedit.py --out runs/shapedit --export   # after training
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_demo import save_atomic  # the demo trainer's atomic checkpoint write (eval/ is on path)

from compress.demo.shapedit import (
    DEFAULT_CONFIG,
    NULL_CLASS,
    TRAIN_STEPS,
    ShapeDiT,
    alpha_bars,
    class_captions,
    sample,
)
from compress.demo.shapes import render, sample_scene
from compress.metrics.checker import accuracy


def make_batch(seed: int, step: int, bs: int, cap_index: dict[str, int]):
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [sample_scene(rng, 1) for _ in range(bs)]
    x0 = torch.stack([torch.from_numpy(render(s, 32, 4)).permute(2, 0, 1).float() / 127.5 - 1
                      for s in scenes])
    return x0, torch.tensor([cap_index[s.caption] for s in scenes])


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(ema: dict, n: int = 96) -> dict[str, float]:
    model = ShapeDiT(**DEFAULT_CONFIG)
    model.load_state_dict(ema)
    model.eval()
    rng = random.Random(10_000_019)
    labels = [rng.randrange(NULL_CLASS) for _ in range(n)]
    imgs = sample(model, labels, seeds=[500_000 + i for i in range(n)])
    caps = class_captions()
    arr = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return accuracy(list(arr), [caps[k] for k in labels])


def export(ema: dict, step: int, dest: Path) -> None:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in ema.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    info = {"class": "compress.demo.shapedit.ShapeDiT", "config": DEFAULT_CONFIG, "step": step,
            "weights": "ema", "dtype": "float16",
            "training": "eval/train_shapedit.py (DDPM epsilon, cosine schedule, CFG dropout 0.1)"}
    (dest / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported step {step} to {dest}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/shapedit"))
    ap.add_argument("--steps", type=int, default=5000, help="length of the LR schedule")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", action="store_true",
                    help="write the checkpoint's EMA weights to compress/demo/shapedit/ and stop")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "ckpt.pt"
    if args.export:
        state = torch.load(ckpt, weights_only=True)
        export(state["ema"], int(state["step"]),
               Path(__file__).resolve().parents[1] / "compress" / "demo" / "shapedit")
        return

    caps = class_captions()
    cap_index = {c: i for i, c in enumerate(caps)}
    model = ShapeDiT(**DEFAULT_CONFIG)
    torch.nn.init.zeros_(model.tail.out.weight)
    torch.nn.init.zeros_(model.tail.out.bias)
    for cell in model.core.cells:  # adaLN-zero: every block starts as the identity
        torch.nn.init.zeros_(cell.mod[1].weight)
        torch.nn.init.zeros_(cell.mod[1].bias)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99),
    )
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        print(f"resumed at step {step}", flush=True)
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    log = open(args.out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run
    ab = alpha_bars()
    t_start = t_last = time.time()
    model.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            break
        x0, y = make_batch(args.seed, step, args.batch, cap_index)
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TRAIN_STEPS, (x0.shape[0],), generator=g)
        y = torch.where(torch.rand(x0.shape[0], generator=g) < 0.1, NULL_CLASS, y)
        a = ab[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(xt, t, y)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        step += 1
        if step % 50 == 0:
            dt = (time.time() - t_last) / 50
            t_last = time.time()
            rec = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(float(gn), 3),
                   "lr": opt.param_groups[0]["lr"], "sec_per_step": round(dt, 3)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_atomic({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(),
                         "step": step}, ckpt)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(ema)
            rec = {"step": step, "eval_ema": {k: round(v, 3) for k, v in acc.items()}}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    save_atomic({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step},
                ckpt)
    print(f"stopped at step {step}", flush=True)


if __name__ == "__main__":
    main()
