"""Train the demo text-to-image transformer (PixArt, 12 blocks x 256, 4 heads) on synthetic shapes.

Seeded and resumable: every batch and every noise draw is a function of (seed, step), and a
checkpoint is written atomically every ``--ckpt-every`` steps, so a run stopped at any moment
continues from its last checkpoint with the same data it would have seen.

The latent space is the 32x32 image itself (scaled to [-1, 1]); the demo VAE (eval/train_vae.py)
learns to decode it to 256x256. Flow matching: x_t = (1 - s) x0 + s noise, target noise - x0,
timestep = 1000 s, which is what diffusers' DPMSolver scheduler with ``flow_prediction`` expects.

    python eval/train_demo.py --out runs/demo --minutes 120
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.demo.shapes import all_single_captions, render, sample_scene
from compress.demo.text import embed, load_text_encoder
from compress.metrics.checker import accuracy

TRANSFORMER_CONFIG = dict(  # noqa: C408 - keyword style matches the diffusers signature
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    num_layers=12,
    cross_attention_dim=256,
    sample_size=32,
    patch_size=8,
    caption_channels=384,
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    attention_bias=True,
    activation_fn="gelu-approximate",
    use_additional_conditions=False,
)
TEXT_LEN = 16


def image_to_latent(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 at 32x32 -> 3x32x32 in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


def latent_to_image(lat: torch.Tensor) -> np.ndarray:
    return ((lat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def make_batch(seed: int, step: int, bs: int, cap_index: dict[str, int]):
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [sample_scene(rng, 1) for _ in range(bs)]
    x0 = torch.stack([image_to_latent(render(s, 32, 4)) for s in scenes])
    idx = torch.tensor([cap_index[s.caption] for s in scenes])
    return x0, idx


@torch.no_grad()
def sample(model, emb, mask, null_emb, null_mask, seed: int, steps: int = 20, cfg: float = 4.0):
    """Euler sampler on the flow ODE (the same maths the pipeline's scheduler integrates)."""
    n = emb.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    sig = torch.linspace(1.0, 0.0, steps + 1)
    e = torch.cat([null_emb.expand(n, -1, -1), emb])
    m = torch.cat([null_mask.expand(n, -1), mask])
    for i in range(steps):
        t = torch.full((2 * n,), float(sig[i]) * 1000.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(torch.cat([x, x]), encoder_hidden_states=e, encoder_attention_mask=m, timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        vu, vc = v.float().chunk(2)
        v = vu + cfg * (vc - vu)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def flow_matching_loss(model, x0, idx, cap_emb, cap_mask, null_emb, null_mask, g) -> torch.Tensor:
    """The training loss: x_t = (1 - s) x0 + s noise, target noise - x0; times logit-normal with a
    20% uniform share (so the ends are trained too); 10% of captions dropped for guidance."""
    noise = torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    u = torch.rand(x0.shape[0], generator=g)
    s = torch.where(torch.rand(x0.shape[0], generator=g) < 0.2, u, s)
    drop = torch.rand(x0.shape[0], generator=g) < 0.1
    emb = torch.where(drop[:, None, None], null_emb, cap_emb[idx])
    mask = torch.where(drop[:, None], null_mask, cap_mask[idx])
    xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
    target = noise - x0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=s * 1000,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--steps", type=int, default=5000, help="length of the LR schedule")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None,
                    help="start a new run from these transformer weights (a diffusers transformer "
                         "directory) instead of from scratch; ignored when resuming")
    args = ap.parse_args()

    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(args.threads)
    # the math attention kernel is ~2x faster than the CPU flash kernel's backward at 16 tokens
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn_ctx = sdpa_kernel(SDPBackend.MATH)  # keep a reference: dropping it restores the default
    attn_ctx.__enter__()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run

    tok, enc = load_text_encoder()
    captions = all_single_captions()
    cap_index = {c: i for i, c in enumerate(captions)}
    cap_emb, cap_mask = embed(tok, enc, captions, TEXT_LEN)
    null_emb, null_mask = embed(tok, enc, [""], TEXT_LEN)
    del enc

    model = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99),
    )
    if args.init is not None:
        init = PixArtTransformer2DModel.from_pretrained(args.init, torch_dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del init
    step = 0
    ckpt = args.out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        print(f"resumed at step {step}", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"transformer params: {nparams / 1e6:.2f}M", flush=True)

    rng_eval = random.Random(10_000_019)
    eval_scenes = [sample_scene(rng_eval, 1) for _ in range(96)]
    eval_caps = [s.caption for s in eval_scenes]
    eval_idx = torch.tensor([cap_index[c] for c in eval_caps])

    t_start = time.time()
    t_last = time.time()
    model.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            break
        x0, idx = make_batch(args.seed, step, args.batch, cap_index)
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        loss = flow_matching_loss(model, x0, idx, cap_emb, cap_mask, null_emb, null_mask, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
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
            save_atomic({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step}, ckpt)
        if step % args.eval_every == 0 or step == args.steps:
            evm = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
            evm.load_state_dict(ema)
            evm.eval()
            x = sample(evm, cap_emb[eval_idx], cap_mask[eval_idx], null_emb, null_mask, seed=123)
            acc = accuracy([latent_to_image(v) for v in x], eval_caps)
            rec = {"step": step, "eval_ema": {k: round(v, 3) for k, v in acc.items()}}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    save_atomic({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step}, ckpt)
    print(f"stopped at step {step}", flush=True)


if __name__ == "__main__":
    main()
