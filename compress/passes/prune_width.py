"""prune_width: remove attention heads and feed-forward channels from every block, physically.

Methods (scores per head / channel, higher kept):

- ``activation``: mean absolute output of the element over the calibration tokens.
- ``taylor``: expected squared first-order change of the output when the element is switched
  off (|activation x gradient| of a random projection of the output).
- ``learnable``: EcoDiff-style gates per element, shared across timesteps, trained so that the
  gated model's final denoised latent matches the original's over whole trajectories (time-step
  gradient checkpointing), with a penalty on the gap between the parameters kept and the target.
- ``magnitude`` (weight norm) and ``random``: baselines.

The budget is ``sparsity`` (a fraction of the blocks' parameters) or ``head_ratio`` /
``channel_ratio`` (fractions of the heads and of the channels); ``uniform`` keeps the same count
at each block position, otherwise the blocks compete for the budget on their scores. Every
dependent matrix shrinks (q/k/v rows and out-projection columns per head, both streams of joint
attention, both halves of gated feed-forwards, norms across heads); see
:mod:`compress.models.width` for which results the stock diffusers classes can reload.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import MAX_COUNT, MAX_TRAIN_STEPS, StrictModel
from compress.errors import UserError
from compress.models import width
from compress.prune import width_scores as ws
from compress.prune.width_gates import element_cost
from compress.prune.width_select import choose, position, removable
from compress.registry import PassDef, PassResult, register_pass


class Data(StrictModel):
    """Prompts whose trajectories the learnable gates follow (sampled from the original)."""

    prompts: str = Field("auto", min_length=1, description="prompt file or 'auto' (the "
                         "calibration prompts)")
    num_prompts: int = Field(64, ge=1, le=MAX_COUNT, description="trajectories (one seed each)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the first trajectory")


class Learnable(StrictModel):
    """EcoDiff settings (method: learnable)."""

    objective: Literal["trajectory", "calls"] = Field(
        "trajectory", description="trajectory: the final latent of whole denoising runs; calls: "
        "each recorded transformer call's output (a user's module always uses calls)")
    steps: int = Field(150, ge=1, le=MAX_TRAIN_STEPS, description="optimiser steps")
    batch: int = Field(2, ge=1, le=4096, description="trajectories (or calls) per step")
    lr: float = Field(0.1, gt=0, le=10, description="learning rate of the gate logits")
    sparsity_weight: float = Field(0.001, gt=0, le=1e6, description="starting weight of the "
                                   "expected-L0 penalty (it adapts to the target as it trains)")
    init: float = Field(3.0, ge=-10, le=10, description="initial gate logit (3: open)")
    trajectory_steps: int | None = Field(None, ge=1, le=1000, description="denoising steps "
                                         "per training trajectory (null: the calibration's)")
    gradient_checkpointing: bool = Field(True, description="recompute each step's activations "
                                         "in the backward pass (memory flat in the steps)")
    checkpoint_every: int = Field(25, ge=0, le=MAX_TRAIN_STEPS)
    data: Data = Field(default_factory=Data)


class Config(StrictModel):
    """prune_width pass configuration."""

    method: Literal["activation", "taylor", "learnable", "magnitude", "random"] = "activation"
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of the blocks' "
                                   "parameters removed")
    head_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of each "
                                     "attention's heads removed (instead of sparsity)")
    channel_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of each "
                                        "feed-forward's channels removed (instead of sparsity)")
    uniform: bool = Field(True, description="the same count at each block position (false: "
                          "blocks compete on their scores, each unit keeps 10%)")
    channel_multiple: int = Field(8, ge=1, le=4096, description="feed-forward widths kept are "
                                  "multiples of this")
    calib_samples: int = Field(32, ge=1, le=MAX_COUNT, description="calibration samples scored")
    heads: dict[str, int] | None = Field(None, description="a user's module: head counts by "
                                         "module name, unit name or 're:' regex")
    learnable: Learnable = Field(default_factory=Learnable)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        ratios = (self.head_ratio, self.channel_ratio)
        if self.sparsity is None and all(r is None for r in ratios):
            raise ValueError("give sparsity (a fraction of the block parameters) or "
                             "head_ratio / channel_ratio")
        if self.sparsity is not None and any(r is not None for r in ratios):
            raise ValueError("give sparsity or head_ratio/channel_ratio, not both")
        if self.sparsity is None and not any(ratios):
            raise ValueError("head_ratio and channel_ratio are both 0: nothing to remove")
        if self.heads is not None:
            bad = {k: v for k, v in self.heads.items() if not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"heads: counts must be positive integers, got {bad}")
        return self


def _units(handle, cfg: Config) -> list[width.Unit]:
    found = width.units(handle.transformer, handle.adapter, cfg.heads)
    if cfg.sparsity is None:
        found = [u for u in found if (cfg.head_ratio if u.kind == "heads" else cfg.channel_ratio)]
    if not found:
        raise UserError("prune_width: found no attention heads or feed-forward channels to "
                        "prune in the model's blocks")
    return found


def _block_params(handle) -> int:
    return sum(p.numel() for _, b in handle.adapter.blocks(handle.transformer)
               for p in b.parameters())


def _target(handle, cfg: Config, units, costs) -> int | None:
    if cfg.sparsity is None:
        return None
    target = round(cfg.sparsity * _block_params(handle))
    most = removable(units, costs, cfg.channel_multiple, cfg.uniform)
    if target > most:
        raise UserError(f"prune_width: sparsity {cfg.sparsity} asks {target} of the blocks' "
                        f"{_block_params(handle)} parameters; their heads and channels can give "
                        f"{most} ({most / _block_params(handle):.2f}); lower sparsity")
    return target


def check(handle, cfg: Config) -> None:
    """Before any work: heads countable, the target reachable (a module: at its first call)."""
    if handle.pipeline is None:
        return
    units = _units(handle, cfg)
    _target(handle, cfg, units, {u.name: element_cost(handle.transformer, u) for u in units})


def _trial(handle, units, sample, heads: dict[str, int] | None) -> None:
    """A user's module: remove one element of each unit from a copy and run one call, so a
    forward that cannot take fewer heads fails here, before any scoring or training."""
    tr = copy.deepcopy(handle.transformer)
    from compress.models.generic import share_structure

    share_structure(handle.transformer, tr)
    keep = {u.name: list(range(u.count - 1)) for u in units if u.count > 1}
    width.remove(tr, handle.adapter, keep, heads)
    try:
        with torch.no_grad():
            handle.adapter.call(tr, sample.args, sample.kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported
        heads = [u.name for u in units if u.kind == "heads"]
        hint = ("its forward likely derives the head width from a fixed attribute: prune "
                "channels only (head_ratio: 0, channel_ratio: R)" if heads else
                "its forward does not accept narrower layers")
        raise UserError(f"prune_width: the module fails with fewer heads/channels "
                        f"({type(e).__name__}: {str(e)[:160]}); {hint}") from None


def _scores(handle, calib, units, costs, cfg: Config, target, report) -> dict[str, torch.Tensor]:
    if cfg.method == "learnable":
        from compress.prune.learnable_width import learn

        if target is not None:
            allowed = {"all": 1 - target / sum(u.count * costs[u.name] for u in units)}
        else:
            allowed = {k: 1 - r for k, r in (("heads", cfg.head_ratio),
                                              ("channels", cfg.channel_ratio)) if r}
        return learn(handle, calib, units, costs, allowed, cfg, report)
    if cfg.method in ("random", "magnitude"):
        raw = ws.random_scores(units, cfg.seed) if cfg.method == "random" \
            else ws.weight_magnitude(handle, units)
        return ws.comparable(raw, costs, per_parameter=False)
    samples = calib.subset(cfg.calib_samples)
    if cfg.method == "activation":
        return ws.comparable(ws.activation(handle, samples, units), costs, per_parameter=False)
    return ws.comparable(ws.taylor(handle, samples, units, cfg.seed), costs, per_parameter=True)


def apply(handle, calib, cfg: Config) -> PassResult:
    tr, ad = handle.transformer, handle.adapter
    t0 = time.perf_counter()
    units = _units(handle, cfg)
    costs = {u.name: element_cost(tr, u) for u in units}
    target = _target(handle, cfg, units, costs)
    if handle.pipeline is None and calib is not None and len(calib):
        _trial(handle, units, calib.sample(0).to(handle.run.get("device", "cpu")), cfg.heads)
    block_before = _block_params(handle)
    report: dict = {"method": cfg.method, "uniform": cfg.uniform, "target_params": target}
    keys = _scores(handle, calib, units, costs, cfg, target, report)
    keep = choose(units, keys, costs, target=target, head_ratio=cfg.head_ratio,
                  channel_ratio=cfg.channel_ratio, uniform=cfg.uniform,
                  multiple=cfg.channel_multiple)
    meta = width.remove(tr, ad, keep, cfg.heads)
    if calib is not None and len(calib):
        s = calib.sample(0).to(handle.run.get("device", "cpu"))
        with torch.no_grad():
            ad.call(tr, s.args, s.kwargs)  # the pruned model runs
    counts: dict[str, list[int]] = {}
    for u in units:
        counts.setdefault(f"{position(u)} ({u.kind}, of {u.count})", []).append(len(keep[u.name]))
    block_after = _block_params(handle)
    report.update({
        "kept": counts, "block_params_before": block_before, "block_params_after": block_after,
        "block_sparsity": round(1 - block_after / block_before, 4),
        "params_before": meta["params_before"], "params_after": meta["params_after"],
        "stock_loadable": meta["stock_loadable"],
        "stock_note": width.stock_expressible(ad.name), "inexact": meta["inexact"],
        "seconds": round(time.perf_counter() - t0, 3)})
    return PassResult(meta=meta, report=report)


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    from compress.models import adapter_for

    width.restore(transformer, adapter_for(transformer, allow_generic=True), meta)


def data(cfg: Config) -> dict | None:
    if cfg.method != "learnable":
        return None
    d = cfg.learnable.data
    return {"prompts": d.prompts, "num_prompts": d.num_prompts, "seeds_per_prompt": 1,
            "seed": d.seed}


register_pass(PassDef(name="prune_width", config=Config, apply=apply, restore=restore,
                      kind="structural", check=check, needs_teacher=False, data=data))
