"""Train the demo VAE: a stock AutoencoderKL whose latent is pinned to the 32x32 image.

The demo transformer works on the 32x32 render itself (scaled to [-1, 1]), so this VAE has a
fixed target on both sides instead of a learned latent space:

- decoder(latent32) ~ the 256x256 render (``render(scene, 256, 1)``), output in [-1, 1];
- encoder(image256) mean ~ latent32 = box-downsample(image256, 8) * 2 / 255 - 1, logvar low.

Four blocks give the 8x downsampling that PixArt's resolution binning expects for a transformer
of sample_size 32 (256x256 images, no special pipeline arguments). Training uses whole images:
the GroupNorm layers of the stock blocks normalise over the full image, so crops would teach
statistics the nets never see at inference (tried: tile-trained weights decode whole images
badly).

Seeded and resumable like eval/train_demo.py: batches and noise are functions of (seed, step),
and ``--work`` holds an atomically written checkpoint.

    python eval/train_vae.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.demo.shapes import Scene, render, sample_scene
from compress.metrics.checker import check

FACTOR = 8
LATENT_RES = 32
IMAGE_RES = LATENT_RES * FACTOR
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    # few channels at the high resolutions: decoding is ~0.9 GFLOP per 256x256 image, and the
    # shape reasoning happens at 32x32 where the 32 channels are
    "block_out_channels": (8, 8, 16, 32),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    # one group: the pass-through start (init_pass_through) needs the signal pairs and the
    # reference channel normalised together
    "norm_num_groups": 1,
    "sample_size": IMAGE_RES,
    "scaling_factor": 1.0,
    "mid_block_add_attention": False,
}
# logvar target: std ~0.007 of a [-1, 1] latent, i.e. under one grey level, so sampling the
# posterior is as good as taking its mean
LOGVAR_TARGET = -10.0
# scene streams for training and evaluation; neither is the demo transformer's stream
TRAIN_STREAM = 4_100_021
EVAL_SEED = 99_991
FIT_SEED = 31_337  # scenes for the least-squares fit of the output convolutions
# level of the constant reference channel: large enough that the GroupNorm statistics barely
# depend on the image, small enough to keep half-precision rounding near a grey level
REF_LEVEL = 10.0


def scene_arrays(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(image 256x256x3 float in [-1, 1], latent 32x32x3 float in [-1, 1]) for one scene."""
    img = render(scene, IMAGE_RES, 1).astype(np.float32)
    lat = img.reshape(LATENT_RES, FACTOR, LATENT_RES, FACTOR, 3).mean(axis=(1, 3))
    return img / 127.5 - 1.0, lat / 127.5 - 1.0


def make_batch(seed: int, step: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images Bx3x256x256, latents Bx3x32x32), both in [-1, 1]."""
    rng = random.Random(TRAIN_STREAM * (seed + 1) + step)
    pairs = [scene_arrays(sample_scene(rng, (1, 3))) for _ in range(bs)]

    def chw(a: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()

    return chw([p[0] for p in pairs]), chw([p[1] for p in pairs])


def _pass(conv: torch.nn.Conv2d, pairs: bool = False) -> None:
    """Channels 0-2 straight through (centre tap); with ``pairs`` also -x into channels 3-5."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    k = conv.kernel_size[0] // 2
    for c in range(3):
        conv.weight[c, c, k, k] = 1.0
        if pairs:
            conv.weight[3 + c, c, k, k] = -1.0


def _fit_out_conv(conv: torch.nn.Conv2d, run, targets: torch.Tensor, ridge: float) -> None:
    """Least-squares fit of a 3x3 output conv (first 3 outputs) to ``targets`` on its inputs."""
    feats = {}
    handle = conv.register_forward_hook(lambda m, i, o: feats.__setitem__("x", i[0]))
    run()
    handle.remove()
    x = torch.nn.functional.unfold(feats["x"].double(), 3, padding=1)  # B, C*9, H*W
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1).transpose(1, 2).reshape(-1, x.shape[1] + 1)
    y = targets.double().flatten(2).transpose(1, 2).reshape(-1, 3)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    sol = torch.linalg.solve(gram, x.T @ y)  # (C*9 + 1, 3)
    conv.weight[:3] = sol[:-1].T.reshape(3, conv.in_channels, 3, 3).to(conv.weight.dtype)
    conv.bias[:3] = sol[-1].to(conv.bias.dtype)


@torch.no_grad()
def init_pass_through(vae, n_fit: int = 8) -> None:
    """Start both nets as plain resamplers, so training only has to sharpen them.

    Every resnet branch starts at zero (identity blocks); the decoder's upsamplers start as
    nearest + [1, 2, 1] blur (= bilinear x2), the encoder's downsamplers as 2x2 box averages.
    The one GroupNorm on the main path (before conv_out) would throw away each image's absolute
    colour, so the signal is carried as pairs (+x, -x), which cancel in the normalisation mean
    and its variance cross-terms, next to a constant -REF_LEVEL channel that dominates the
    variance: the norm then acts as a fixed linear map, and conv_out (fitted by least squares on
    a few scenes) reads the pair differences back.
    """
    from diffusers.models.resnet import ResnetBlock2D

    for m in vae.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = torch.outer(blur, blur) / 16
    for net, blocks, sampler in (
        (vae.encoder, vae.encoder.down_blocks, "downsamplers"),
        (vae.decoder, vae.decoder.up_blocks, "upsamplers"),
    ):
        _pass(net.conv_in)
        shortcuts = [r.conv_shortcut for b in blocks for r in b.resnets if r.conv_shortcut]
        for i, conv in enumerate(shortcuts):
            _pass(conv, pairs=i == len(shortcuts) - 1)
        for b in blocks:
            for smp in getattr(b, sampler) or []:
                smp.conv.weight.zero_()
                smp.conv.bias.zero_()
                for c in range(smp.conv.out_channels):
                    if sampler == "upsamplers":
                        smp.conv.weight[c, c] = blur
                    else:  # stride-2 conv padded on the right/bottom: taps 0-1 are one 2x2 cell
                        smp.conv.weight[c, c, :2, :2] = 0.25
    # the reference channel enters at the last resnet before each net's final GroupNorm
    vae.encoder.mid_block.resnets[-1].conv2.bias[6] = -REF_LEVEL
    vae.decoder.up_blocks[-1].resnets[-1].conv2.bias[6] = -REF_LEVEL
    _pass(vae.post_quant_conv)
    c = VAE_CONFIG["latent_channels"]
    _pass(vae.quant_conv)
    vae.quant_conv.bias[c:] = LOGVAR_TARGET  # logvar starts at its target; the loss holds it
    vae.encoder.conv_out.weight.zero_()
    vae.encoder.conv_out.bias.zero_()

    rng = random.Random(FIT_SEED)
    pairs = [scene_arrays(sample_scene(rng, (1, 3))) for _ in range(n_fit)]
    img = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
    lat = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2)
    _fit_out_conv(vae.encoder.conv_out, lambda: vae.encoder(img), lat, ridge=1e-6)
    _fit_out_conv(vae.decoder.conv_out, lambda: vae.decode(lat), img, ridge=1e-6)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] CHW -> uint8 HWC, rounding as diffusers' image processor does."""
    return ((x.clamp(-1, 1) / 2 + 0.5) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate(vae, n: int = 64, seed: int = EVAL_SEED, batch: int = 16) -> dict[str, float]:
    """Decode PSNR vs the 256 render, encoder error, and checker agreement latent vs decoded."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, (1, 3)) for _ in range(n)]
    se, enc_err, logvar, agree, agree_all = 0.0, 0.0, 0.0, 0, 0
    for b in range(0, n, batch):
        chunk = scenes[b : b + batch]
        pairs = [scene_arrays(s) for s in chunk]
        img = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
        lat = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2)
        dec = vae.decode(lat).sample
        post = vae.encode(img).latent_dist
        enc_err += (post.mean - lat).abs().amax(dim=(1, 2, 3)).sum().item()
        logvar += post.logvar.mean(dim=(1, 2, 3)).sum().item()
        for k, s in enumerate(chunk):
            d8 = to_uint8(dec[k])
            t8 = to_uint8(img[k])
            se += float(np.mean((d8.astype(np.float64) - t8) ** 2))
            v_lat = check(to_uint8(lat[k]), s.caption)
            v_dec = check(d8, s.caption)
            agree += v_lat == v_dec
            agree_all += v_lat["all"] == v_dec["all"]
    mse = se / n
    return {
        "psnr": round(10 * math.log10(255**2 / max(mse, 1e-10)), 2),
        "enc_max_abs_err": round(enc_err / n, 4),
        "enc_logvar": round(logvar / n, 2),
        "checker_agree": round(agree / n, 4),
        "checker_agree_all": round(agree_all / n, 4),
    }


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_vae(vae, out: Path) -> None:
    """save_pretrained into a sibling folder, then swap it in, so ``out`` is never half-written."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        f.chmod(0o644)  # the weights file comes out 0600; package data must be world-readable
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("compress/demo/pipeline/vae"))
    ap.add_argument("--work", type=Path, default=Path("runs/vae"), help="checkpoint and log dir")
    ap.add_argument("--steps", type=int, default=300, help="length of the LR schedule")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument(
        "--latent-noise",
        type=float,
        default=0.03,
        help="max std of noise on decoder inputs, so sampled latents decode cleanly",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        with open(args.work / "log.jsonl", "a") as log:
            log.write(json.dumps(rec) + "\n")

    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    ckpt = args.work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        print(f"resumed at step {step}", flush=True)
    else:
        init_pass_through(vae)
        vae.eval()
        emit({"step": 0, "eval": evaluate(vae, n=32)})
        vae.train()
    print(f"vae params: {sum(p.numel() for p in vae.parameters()) / 1e3:.1f}K", flush=True)

    t_start = t_last = time.time()
    vae.train()
    while step < args.steps:
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            break
        img, lat = make_batch(args.seed, step, args.batch)
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        std = torch.rand(lat.shape[0], 1, 1, 1, generator=g) * args.latent_noise
        noisy = lat + std * torch.randn(lat.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        dec = vae.decode(noisy).sample
        h = vae.quant_conv(vae.encoder(img))
        mean, logvar = h.chunk(2, dim=1)
        loss_dec = F.mse_loss(dec, img)
        loss_enc = F.mse_loss(mean, lat)
        loss_var = F.mse_loss(logvar, torch.full_like(logvar, LOGVAR_TARGET))
        loss = loss_dec + loss_enc + 1e-3 * loss_var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            dt = (time.time() - t_last) / 25
            t_last = time.time()
            emit(
                {
                    "step": step,
                    "loss_dec": round(loss_dec.item(), 6),
                    "loss_enc": round(loss_enc.item(), 7),
                    "loss_var": round(loss_var.item(), 5),
                    "grad_norm": round(float(gn), 3),
                    "lr": opt.param_groups[0]["lr"],
                    "sec_per_step": round(dt, 3),
                }
            )
        if step % args.ckpt_every == 0:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
        if step % args.eval_every == 0:
            vae.eval()
            emit({"step": step, "eval": evaluate(vae, n=64)})
            vae.train()
    save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    vae.eval()
    emit({"step": step, "final_eval": evaluate(vae, n=args.eval_n)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_vae(vae, args.out)
    print(f"stopped at step {step}; saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
