"""distill: the compressed transformer learns the original's predictions on its own trajectories.

Data: prompts, timesteps and noisy latents sampled from the ORIGINAL pipeline before any pass
changes it (``data``: more prompts than PTQ needs, several seeds per prompt; cached like
calibration sets); a user's module trains on what its calibrate_fn feeds it. No image data set.

Modes:
- ``kd``: output loss (relative MSE to the original's prediction), the routers' load-balancing
  loss after ``to_moe``, plus feature losses between mapped blocks (after ``route_blocks``:
  only at the end of each group of routed blocks, the group feature loss): each remaining block reproduces the original's hidden state at the end of the
  span it stands for (after depth pruning, the blocks up to the next kept one), with the
  original's massive activations masked out as TinyFusion's masked distillation does.
- ``on_policy`` (kd): from a point of the training on, part of every batch comes from the
  student's own trajectories (the same prompts and seeds sampled with the student), so it also
  learns the original's prediction where its own sampling goes (:mod:`compress.train.onpolicy`).
- ``intervals``: PPCL's mode: only blocks that stand for several original blocks train, each on
  the original's hidden states at its interval's ends, independently of the others.

Training runs on accelerate (one process, or several under torchrun / accelerate launch),
checkpoints every ``checkpoint_every`` steps and continues with ``--resume``; optional low-rank
adapters are merged into the weights at the end.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import MAX_COUNT, MAX_TRAIN_STEPS, StrictModel
from compress.errors import UserError
from compress.modules import mob, moe
from compress.registry import PassDef, PassResult, register_pass
from compress.train import batches, kd
from compress.train.loop import TrainSettings, autocast, info_of, train


class Data(StrictModel):
    """The distillation set, sampled from the original pipeline (cached)."""

    prompts: str = Field("auto", min_length=1, description="prompt file or 'auto' (the "
                         "calibration prompts: the demo's captions, general prompts otherwise)")
    num_prompts: int = Field(64, ge=1, le=MAX_COUNT, description="prompts from the file")
    seeds_per_prompt: int = Field(4, ge=1, le=1000, description="trajectories per prompt")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the first trajectory")


class OnPolicy(StrictModel):
    """Training also on the student's own trajectories (the original still gives every target)."""

    start: float = Field(0.5, gt=0, lt=1, description="fraction of the steps after which the "
                         "student's trajectories are first sampled (the distillation set's "
                         "prompts and seeds, run through the pipeline with the student)")
    times: int = Field(1, ge=1, le=100, description="how many times they are sampled, evenly "
                       "spaced from start to the end (each replaces the last)")
    share: float = Field(0.5, gt=0, le=1, description="fraction of every batch drawn from them "
                         "once sampled (the rest: the original's trajectories)")


class Lora(StrictModel):
    """Low-rank adapters on the blocks' Linear layers instead of full fine-tuning."""

    rank: int = Field(16, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0, le=1e6)


class Config(StrictModel):
    """distill pass configuration."""

    mode: Literal["kd", "intervals"] = "kd"
    steps: int = Field(1000, ge=1, le=MAX_TRAIN_STEPS, description="optimiser steps")
    batch: int = Field(8, ge=1, le=65536, description="samples (transformer calls) per step, "
                       "over all processes")
    lr: float = Field(1e-4, gt=0, le=1)
    warmup: int = Field(50, ge=0, le=MAX_TRAIN_STEPS)
    weight_decay: float = Field(0.0, ge=0, le=10)
    grad_clip: float | None = Field(1.0, gt=0, le=1e6)
    ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of "
                       "the trained weights, which the student keeps at the end (0: none)")
    output_weight: float = Field(1.0, ge=0, le=1e6, description="kd: output loss weight")
    feature_weight: float = Field(1.0, ge=0, le=1e6, description="kd: feature loss weight")
    balance_weight: float = Field(0.01, ge=0, le=1e6, description="kd: weight of the MoE "
                                  "routers' load-balancing loss (ignored without to_moe)")
    route_noise: float = Field(1.0, ge=0, le=100, description="kd after route_blocks: scale of "
                               "the Gumbel noise on the block routers' choices while training, "
                               "so that other blocks get tried (0: each sample runs its "
                               "router's choice)")
    mask_sigma: float | None = Field(4.0, gt=0, le=1e6, description="feature loss ignores the "
                                     "original's entries beyond this many std (null: none)")
    train: Literal["all", "blocks"] = Field("all", description="which weights learn (lora: "
                                            "only the adapters)")
    lora: Lora | None = None
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a CUDA device that has it, else fp32")
    micro_batch: int = Field(0, ge=0, le=65536, description="samples per forward call "
                             "(0: a process's whole share of the batch; lower it to save memory)")
    checkpoint_every: int = Field(100, ge=0, le=MAX_TRAIN_STEPS, description="steps between "
                                  "checkpoints (0: none)")
    data: Data = Field(default_factory=Data)
    on_policy: OnPolicy | None = Field(None, description="kd: also train on the student's own "
                                       "trajectories, sampled during training (null: only the "
                                       "original's)")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _modes(self) -> Config:
        if self.on_policy is not None and self.mode != "kd":
            raise ValueError("on_policy needs mode kd (intervals trains each interval on the "
                             "original's hidden states); remove on_policy or set mode: kd")
        return self


def _params(tr: nn.Module, blocks: list[str], cfg: Config) -> list[tuple[str, nn.Parameter]]:
    tr.requires_grad_(False)
    if cfg.lora is not None:  # routers (MoE, routed blocks) are tiny: they train in full
        routers = [(n, p) for n, p in tr.named_parameters()
                   if ".router." in n or ".t_router." in n or n.startswith("block_routers.")]
        lin = [f"{b}.{n}" for b in blocks for n, m in tr.get_submodule(b).named_modules()
               if isinstance(m, nn.Linear) and not n.endswith(("router", "t_router"))]
        params = kd.add_lora(tr, lin, cfg.lora.rank, cfg.lora.alpha, cfg.seed) + routers
    elif cfg.train == "blocks":
        params = [(f"{b}.{n}", p) for b in blocks for n, p in tr.get_submodule(b).named_parameters()]
    else:
        params = list(tr.named_parameters())
    for _, p in params:
        p.requires_grad_(True)
    return params


def apply(handle, calib, cfg: Config) -> PassResult:
    tr, ad, teacher = handle.transformer, handle.adapter, handle.teacher
    if teacher is None:
        raise RuntimeError("distill needs the runner's copy of the original transformer")
    dev = handle.run.get("device", "cpu")
    origin = handle.block_origin()
    s_blocks = [n for n, _ in ad.blocks(tr)]
    t_blocks = [n for n, _ in ad.blocks(teacher)]
    kept = [origin[b] for b in s_blocks]
    targets = kd.feature_targets(t_blocks, kept)
    routed = {n: names[-1] for names, _ in mob.block_groups(tr) for n in names}
    if routed and cfg.gradient_checkpointing:
        raise UserError("distill: gradient_checkpointing is not supported with routed blocks "
                        "(route_blocks): the recomputed forward would not see the same routing; "
                        "set gradient_checkpointing: false")
    if cfg.mode == "intervals":
        pairs = [(s, k, t) for s, k, t in zip(s_blocks, kept, targets) if t != k]
        if not pairs:
            raise UserError("distill mode intervals: no block stands for an interval of removed "
                            "blocks (run prune_depth first, e.g. method: intervals)")
        trained_blocks = [s for s, _, _ in pairs]
    else:  # with routed blocks: the group feature loss, at the end of each group only
        pairs = [(s, k, t) for s, k, t in zip(s_blocks, kept, targets)
                 if s not in routed or routed[s] == s]
        trained_blocks = s_blocks
    params = _params(tr, trained_blocks if cfg.mode == "intervals" else s_blocks, cfg)
    if cfg.mode == "intervals" and cfg.lora is None:
        params = [(n, p) for n, p in params if any(n.startswith(b + ".") for b in trained_blocks)]
    t_taps = kd.Taps(teacher, sorted({t for _, _, t in pairs}),
                     inputs=[k for _, k, _ in pairs] if cfg.mode == "intervals" else (),
                     detach=True)
    s_taps = kd.Taps(tr, s_blocks) if cfg.mode == "kd" and cfg.feature_weight > 0 else None

    stacked = batches.stacking_works(lambda a, k: ad.call(teacher, a, k),
                                     [calib.sample(i).to(dev) for i in range(min(3, len(calib)))])
    own = _on_policy(handle, calib, tr, cfg)
    sample = own.sample if own is not None else calib.sample

    def calls(idx: list[int]) -> list[tuple[tuple, dict, list[int] | None]]:
        smps = [sample(i).to(dev) for i in idx]
        st = batches.stack(smps) if stacked else None
        if st is not None:
            return [(*st, batches.sizes(smps))]
        return [(x.args, x.kwargs, None) for x in smps]

    def one_call(args, kwargs, rows) -> tuple[torch.Tensor, dict[str, float]]:
        t_taps.clear()
        with torch.no_grad():
            t_out = ad.call(teacher, args, kwargs)
        parts = {}
        with autocast(dev, cfg.precision):
            if cfg.mode == "intervals":
                terms = []
                for s, k, t in pairs:
                    a, kw = t_taps.inp[k]
                    out = [x for x in kd.tensors_in(tr.get_submodule(s)(*a, **kw))
                           if x.is_floating_point()]
                    terms.append(kd.feature_loss(out, t_taps.out[t], None, rows))
                loss = torch.stack(terms).sum()
                parts["intervals"] = float(loss.detach())
                return loss, parts
            if s_taps is not None:
                s_taps.clear()
            s_out = ad.call(tr, args, kwargs)
            out_l = kd.per_sample(s_out, t_out, None, rows)
            loss = cfg.output_weight * out_l
            parts["output"] = float(out_l.detach())
            bal = moe.balance_loss(tr) if cfg.balance_weight > 0 else None
            if bal is not None:
                loss = loss + cfg.balance_weight * bal
                parts["balance"] = float(bal.detach())
            if s_taps is not None:
                feat = torch.stack([kd.feature_loss(s_taps.out[s], t_taps.out[t], cfg.mask_sigma,
                                                    rows) for s, _, t in pairs]).mean()
                loss = loss + cfg.feature_weight * feat
                parts["features"] = float(feat.detach())
        return loss, parts

    def loss_fn(idx: list[int], step: int):
        todo = calls(idx)
        losses, parts = [], {}
        for a, kw, rows in todo:
            loss, p = one_call(a, kw, rows)
            w = len(rows) if rows else 1  # a stacked call's loss is the mean of its samples'
            losses.append(loss * w)
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v * w / len(idx)
        return torch.stack(losses).sum() / len(idx), parts

    s = TrainSettings(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup,
                      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
                      checkpoint_every=cfg.checkpoint_every, micro=cfg.micro_batch, ema=cfg.ema)
    ckpt = handle.run.get("checkpoints")
    blocks = [tr.get_submodule(b) for b in trained_blocks]
    tr.train()
    mob.explore(tr, cfg.route_noise)
    try:
        with kd.checkpointed(blocks, cfg.gradient_checkpointing) if cfg.mode == "kd" \
                else contextlib.nullcontext():
            res = train(params, loss_fn, len(calib) if own is None else own.n_indices(), s,
                        ckpt_dir=(ckpt / f"pass{handle.run.get('pass_index', 0)}-distill"
                                  if ckpt is not None else None),
                        resume=bool(handle.run.get("resume")), desc=f"distill {cfg.mode}",
                        tag=f"{cfg.mode}:{','.join(kept)}" + (
                            "" if own is None else f";on_policy:{cfg.on_policy.model_dump_json()}"),
                        **({} if own is None else {
                            "on_step": own.on_step, "extra_state": (own.state, own.load_state)}))
    finally:
        t_taps.remove()
        if s_taps is not None:
            s_taps.remove()
        mob.explore(tr, 0.0)
        tr.eval()
    merged = kd.merge_lora(tr)
    tr.requires_grad_(False)
    report = {"mode": cfg.mode, "samples": len(calib), "stacked_calls": stacked,
              "trained_params": sum(p.numel() for _, p in params),
              "lora_merged": merged, "feature_pairs": {s: t for s, _, t in pairs},
              **info_of(res, s),
              "loss_parts_last": {k: sum(v[-20:]) / len(v[-20:]) for k, v in res.parts.items()
                                  if v},
              **({} if own is None else {"on_policy": own.report()})}
    return PassResult(meta={}, report=report)


def _on_policy(handle, calib, tr: nn.Module, cfg: Config):
    """The mixed data set when ``on_policy`` is set (kd mode), else None."""
    if cfg.on_policy is None:
        return None
    from compress.runner import sized_calibrate_fn
    from compress.train.onpolicy import StudentTrajectories

    # a user's module: sampled as its distillation set was (calibrate_fn with n if it takes one)
    call = sized_calibrate_fn(handle, data(cfg)) or handle.calibrate_fn
    op = cfg.on_policy
    return StudentTrajectories(handle, calib, tr, cfg.steps, op.start, op.times, op.share,
                               calibrate=call, route_noise=cfg.route_noise)


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    """Distillation changes weight values only: nothing to rebuild."""


def data(cfg: Config) -> dict:
    return cfg.data.model_dump()


register_pass(PassDef(name="distill", config=Config, apply=apply, restore=restore,
                      kind="weights", needs_teacher=True, data=data))
