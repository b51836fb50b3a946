"""Train the demo's "red" LoRA: every object is drawn red whatever colour word the caption says.

Data are train_demo.py's one-object scenes and captions, except that each scene is rendered with
its object recoloured red while the caption keeps its own colour word (red captions included).
The loss is train_demo.py's flow-matching loss. A rank-4 PEFT LoRA (alpha 4) sits on the
attention (attn1, attn2: to_q, to_k, to_v, to_out.0) and feed-forward (ff.net.0.proj, ff.net.2)
Linears of the shipped transformer; everything else is frozen. Seeded: each batch and noise draw
is a function of (seed, step). bf16 autocast, as in train_demo.py (about 2.5x faster than fp32 on
one CPU thread).

The adapter is saved as safetensors with diffusers/PEFT keys
(``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``), fp16, and the LoRA config in the
``lora_adapter_metadata`` metadata entry.

    python eval/train_demo_lora.py                 # writes compress/demo/adapters/red.safetensors
    python eval/train_demo_lora.py --out runs/red.safetensors --steps 200 --minutes 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.demo import load_demo_pipeline
from compress.demo.shapes import Scene, all_single_captions, render, sample_scene
from compress.demo.text import embed
from eval.train_demo import TEXT_LEN, flow_matching_loss, image_to_latent, lr_at

RANK = 4
ALPHA = 4
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "compress" / "demo" / "adapters" / "red.safetensors"


def make_red_batch(seed: int, step: int, bs: int, cap_index: dict[str, int]):
    """train_demo.make_batch's scenes, rendered with every object red; caption indices unchanged."""
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [sample_scene(rng, 1) for _ in range(bs)]
    red = [Scene(tuple(dataclasses.replace(o, color="red") for o in s.objects)) for s in scenes]
    x0 = torch.stack([image_to_latent(render(s, 32, 4)) for s in red])
    idx = torch.tensor([cap_index[s.caption] for s in scenes])
    return x0, idx


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter as diffusers-style fp16 tensors: ``transformer.<module>.lora_{A,B}.weight``."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    # PEFT drops the adapter name: "<module>.lora_A.default.weight" -> "<module>.lora_A.weight"
    expected = {
        n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad
    }
    if set(sd) != expected or not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd):
        raise RuntimeError("PEFT state-dict keys do not match the diffusers LoRA format")
    return {f"transformer.{k}": v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def save_lora(model, path: Path) -> None:
    """Write the adapter atomically as safetensors with its config in the metadata."""
    from safetensors.torch import save_file

    meta = {"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGET_MODULES}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state_dict(model), str(tmp), metadata={"lora_adapter_metadata": json.dumps(meta)})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; ship it readable like the other weights
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=400, help="length of the LR schedule")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop after this much wall time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from peft import LoraConfig, inject_adapter_in_model
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = load_demo_pipeline()
    captions = all_single_captions()
    cap_index = {c: i for i, c in enumerate(captions)}
    cap_emb, cap_mask = embed(pipe.tokenizer, pipe.text_encoder, captions, TEXT_LEN)
    null_emb, null_mask = embed(pipe.tokenizer, pipe.text_encoder, [""], TEXT_LEN)
    model = pipe.transformer
    del pipe

    model.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES)
    model = inject_adapter_in_model(config, model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_wrapped = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    if n_wrapped != 10 * len(model.transformer_blocks):
        raise RuntimeError(f"expected 10 LoRA Linears per block, got {n_wrapped} in all")
    print(f"LoRA on {n_wrapped} Linears, {sum(p.numel() for p in params)} trainable params", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    t_start = t_last = time.time()
    model.train()
    step = 0
    with sdpa_kernel(SDPBackend.MATH):  # faster than the flash kernel's backward at 16 tokens
        while step < args.steps and time.time() - t_start < args.minutes * 60:
            x0, idx = make_red_batch(args.seed, step, args.batch, cap_index)
            g = torch.Generator().manual_seed(args.seed * 7919 + step)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
            loss = flow_matching_loss(model, x0, idx, cap_emb, cap_mask, null_emb, null_mask, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                dt = (time.time() - t_last) / 50
                t_last = time.time()
                print(json.dumps({"step": step, "loss": round(loss.item(), 5),
                                  "grad_norm": round(float(gn), 3), "lr": opt.param_groups[0]["lr"],
                                  "sec_per_step": round(dt, 3)}), flush=True)
    save_lora(model, args.out)
    print(f"stopped at step {step} after {(time.time() - t_start) / 60:.1f} min; wrote {args.out}",
          flush=True)


if __name__ == "__main__":
    main()
