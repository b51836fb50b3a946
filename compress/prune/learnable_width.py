"""Learned width masks in the way of EcoDiff: one differentiable gate per attention head and per
feed-forward channel, shared by every timestep, trained so that the gated model's final
denoised latent matches the original's over whole trajectories of the calibration prompts
(``objective: trajectory``; time-step gradient checkpointing keeps memory flat in the number of
steps), or, where there is no pipeline to follow (a user's module), so that each recorded
transformer call's output matches the original's (``objective: calls``).

Gates are hard-concrete variables (Louizos et al.'s stretched, clipped binary concrete), so
sampled gates are mostly exactly 0 or 1 and the model trains with elements really switched
off; the clip passes its gradient straight through, so a shut gate can reopen. The budget enters as an expected-L0 penalty, lambda x (expected fraction of the gated
units' parameters kept), always pulling every gate shut: an element the reconstruction does not
hold open keeps sinking, so at the end the logits rank the elements by how hard the
reconstruction held them. lambda adapts each step (up while the expected density is above what
the target allows, down below it), so the pull matches the budget on any model. The target is
met exactly by selection: the elements are ranked by their gate logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.models.width_units import Unit
from compress.prune.width_gates import Gates

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
LAMBDA_RATE = 0.5  # log lambda moves by this x (density - allowed) per step
LAMBDA_MAX = 1.0  # the reconstruction is a relative error: a budget weight above 1 drowns it


class HardConcrete(nn.Module):
    """Gates in [0, 1] with a learnable logit per element."""

    def __init__(self, n: int, init: float) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n,), float(init)))

    def sample(self, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(self.log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        z = s * (ZETA - GAMMA) + GAMMA
        # clipped to [0, 1] forward; the gradient passes the clip (straight through), so a gate
        # sampled shut still learns whether opening it would help
        return z + (z.clamp(0, 1) - z).detach()

    def p_open(self) -> torch.Tensor:
        """Probability that a gate is not 0."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


def _density_t(units: list[Unit], gates: dict[str, HardConcrete], costs: dict[str, int],
               group: str) -> torch.Tensor:
    """Expected fraction of the group's parameters kept ("all", "heads" or "channels")."""
    members = [u for u in units if group == "all" or u.kind == group]
    total = sum(u.count * costs[u.name] for u in members)
    return sum(gates[u.name].p_open().sum() * costs[u.name] for u in members) / total


def _density(units: list[Unit], gates: dict[str, HardConcrete], costs: dict[str, int],
             group: str) -> float:
    with torch.no_grad():
        return float(_density_t(units, gates, costs, group))


def _rel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    b = b.float()
    return (a.float() - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12)


def learn(handle, calib, units: list[Unit], costs: dict[str, int], allowed: dict[str, float],
          cfg, report: dict) -> dict[str, torch.Tensor]:
    """Train the gates; returns each unit's gate logits (the keys for selection)."""
    from compress.train.loop import TrainSettings, info_of, train

    lc = cfg.learnable
    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    gates = {u.name: HardConcrete(u.count, lc.init) for u in units}
    hooks = Gates(tr, units)
    objective = lc.objective
    if objective == "trajectory" and handle.pipeline is None:
        objective = "calls"  # a module has no sampler to unroll
    meta = getattr(calib, "meta", {}) or {}
    if objective == "trajectory":
        from compress.prune.trajectory import final_latent

        prompts, seeds = list(meta.get("prompts") or []), list(meta.get("seeds") or [])
        if not prompts:
            from compress.errors import UserError

            raise UserError("prune_width learnable: the calibration set names no prompts to "
                            "follow trajectories of; use learnable.objective: calls")
        steps = lc.trajectory_steps or meta.get("steps")
        args = (steps, meta.get("guidance"), meta.get("resolution"))
        n = len(prompts)
    else:
        calib = calib.subset(cfg.calib_samples)  # spread over prompts and timesteps
        n = len(calib)
    refs: dict[int, torch.Tensor] = {}
    groups = [g for g in allowed if any(g == "all" or u.kind == g for u in units)]
    lam = dict.fromkeys(groups, float(lc.sparsity_weight))

    def reference(i: int) -> torch.Tensor:
        if i not in refs:
            hooks.gate = {}
            with torch.no_grad():
                if objective == "trajectory":
                    refs[i] = final_latent(handle, prompts[i], seeds[i], *args).detach()
                else:
                    s = calib.sample(i).to(dev)
                    refs[i] = ad.call(tr, s.args, s.kwargs).detach()
        return refs[i]

    def loss_fn(idx: list[int], step: int):
        losses = []
        for i in idx:
            ref = reference(i)
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * 100_003 + i)
            hooks.gate = {u.name: gates[u.name].sample(gen) for u in units}
            if objective == "trajectory":
                out = final_latent(handle, prompts[i], seeds[i], *args,
                                   checkpoint=lc.gradient_checkpointing)
            else:
                s = calib.sample(i).to(dev)
                out = ad.call(tr, s.args, s.kwargs)
            losses.append(_rel_mse(out, ref))
        # the gates stay set: the backward pass recomputes checkpointed steps with them (one
        # sample per call, micro=1, so no later sample's gates replace them before it runs)
        rec = torch.stack(losses).mean()
        pen = torch.stack([lam[g] * _density_t(units, gates, costs, g) for g in groups]).sum()
        return rec + pen, {"reconstruction": float(rec.detach()), "penalty": float(pen.detach())}

    def on_step(step: int) -> None:  # the multiplier follows the budget (from the parameters
        for g in groups:             # alone, so every process computes the same)
            if step > 0:
                gap = _density(units, gates, costs, g) - allowed[g]
                lam[g] = float(min(max(lam[g] * math.exp(LAMBDA_RATE * gap), 1e-8), LAMBDA_MAX))

    def get_extra() -> dict[str, torch.Tensor]:
        return {f"lambda.{g}": torch.tensor([lam[g]], dtype=torch.float64) for g in groups}

    def set_extra(d: dict[str, torch.Tensor]) -> None:
        for g in groups:
            if f"lambda.{g}" in d:
                lam[g] = float(d[f"lambda.{g}"])

    params = [(f"gate.{u.name}", gates[u.name].log_alpha) for u in units]
    s = TrainSettings(steps=lc.steps, batch=lc.batch, lr=lc.lr, grad_clip=None, seed=cfg.seed,
                      checkpoint_every=lc.checkpoint_every, min_lr_ratio=1.0, micro=1)
    ckpt = handle.run.get("checkpoints")
    flags = {n: p.requires_grad for n, p in tr.named_parameters()}
    try:
        tr.requires_grad_(False)
        res = train(params, loss_fn, n, s,
                    ckpt_dir=(ckpt / f"pass{handle.run.get('pass_index', 0)}-width-gates"
                              if ckpt is not None else None),
                    resume=bool(handle.run.get("resume")), desc=f"prune_width {objective}",
                    tag=f"{objective}:{','.join(u.name for u in units)}",
                    on_step=on_step, extra_state=(get_extra, set_extra))
    finally:
        hooks.remove()
        for name, p in tr.named_parameters():
            p.requires_grad_(flags.get(name, True))
    with torch.no_grad():
        dens = {g: round(_density(units, gates, costs, g), 4) for g in groups}
    report["learnable"] = {"objective": objective, "samples": n,
                           "expected_density": dens, "allowed_density":
                           {g: round(allowed[g], 4) for g in groups},
                           "lambda": {g: round(lam[g], 6) for g in groups}, **info_of(res, s),
                           "loss_parts_last": {k: sum(v[-20:]) / len(v[-20:])
                                               for k, v in res.parts.items() if v}}
    return {u.name: gates[u.name].log_alpha.detach().clone() for u in units}
