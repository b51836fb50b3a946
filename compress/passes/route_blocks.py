"""route_blocks: Mixture of Blocks. Per sample, only ``keep`` of every ``group`` consecutive
blocks run (Dense2MoE's second stage, after to_moe and a first distillation).

Each group's router reads the hidden state entering the group (mean over tokens) and, with
``router_timestep``, the timestep; it starts from the blocks' ShortGPT influence on the
calibration calls (every sample first keeps the group's most influential blocks, as static
depth pruning would) and learns in a following ``distill`` pass, whose feature loss then
compares hidden states only at the ends of the groups (the group feature loss). A skipped block
passes its inputs through; a run block sees only the samples that chose it. Runtime:
:mod:`compress.modules.mob`. Blocks left over after the last full group always run.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.config import MAX_COUNT, StrictModel
from compress.errors import UserError
from compress.modules import mob, moe
from compress.passes.prune_depth import Learnable
from compress.registry import PassDef, PassResult, register_pass
from compress.train import kd


class Config(StrictModel):
    """route_blocks pass configuration."""

    group: int = Field(3, ge=2, le=256, description="consecutive blocks per group")
    keep: int = Field(2, ge=1, le=255, description="blocks of each group a sample runs")
    router_timestep: bool = Field(True, description="the group routers also read the timestep")
    calib_samples: int = Field(16, ge=1, le=MAX_COUNT, description="calibration calls for the "
                               "blocks' influence (the routers' starting choice)")
    start_strength: float = Field(0.5, ge=0, le=100, description="router bias at the start: "
                                  "this times each block's influence z-score in its group "
                                  "(start learnable: of kept 1, dropped -1; 0: no preference)")
    start: Literal["influence", "per_sample", "learnable"] = Field(
        "influence", description="the routers' starting choice: every sample keeps its group's "
        "most influential blocks (influence), a least-squares fit of each router to which "
        "block's skip changed each calibration sample's output least (per_sample), or the "
        "blocks TinyFusion's learnable depth pruning keeps in each group (learnable)")
    learnable: Learnable = Field(default_factory=Learnable, description="start: learnable: "
                                 "the choice's training (its group_size is this pass's group)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="start: learnable: Gumbel noise seed")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.keep >= self.group:
            raise ValueError(f"keep {self.keep} must be less than group {self.group}")
        gs = self.learnable.group_size
        if gs is not None and gs != self.group:
            raise ValueError(f"learnable.group_size {gs} differs from group {self.group}; "
                             "leave it out (the groups are this pass's)")
        return self


def _groups(handle, cfg: Config) -> tuple[list[list[str]], list[str]]:
    names = [n for n, _ in handle.adapter.blocks(handle.transformer)]
    groups, rest = [], []
    for lst in kd.containers(names).values():
        full = len(lst) // cfg.group * cfg.group
        groups += [lst[i:i + cfg.group] for i in range(0, full, cfg.group)]
        rest += lst[full:]
    if not groups:
        raise UserError(f"route_blocks: no block list has {cfg.group} blocks (lists: "
                        f"{ {k: len(v) for k, v in kd.containers(names).items()} }); lower group")
    if any(isinstance(handle.transformer.get_submodule(n), mob.RoutedMixin) for n in names):
        raise UserError("route_blocks: the blocks are routed already (one route_blocks per run)")
    return groups, rest


def check(handle, cfg: Config) -> None:
    if handle.pipeline is not None:
        _groups(handle, cfg)


def _keys(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    out = [(f"arg:{i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    out += [(f"kw:{k}", v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return [(k, t) for k, t in out if t.is_floating_point()]


def _template(name: str, args: tuple, kwargs: dict, out) -> dict:
    """Which input each returned tensor updates (same shape, most similar), and the form."""
    is_tuple = isinstance(out, tuple)
    outs = list(out) if is_tuple else [out]
    cands = _keys(args, kwargs)
    inputs = []
    for o in outs:
        if o is None:  # SD3's last block returns no text stream
            inputs.append(None)
            continue
        if not isinstance(o, torch.Tensor):
            raise UserError(f"route_blocks: {name} returns a {type(o).__name__}; a routed block "
                            "must return tensors (or a tuple of them) that update its inputs")
        same = [(k, t) for k, t in cands if t.shape == o.shape]
        if not same:
            raise UserError(f"route_blocks: {name} returns a tensor of shape {tuple(o.shape)} "
                            "that matches none of its inputs; it cannot be skipped")
        best = max(same, key=lambda kt: float(F.cosine_similarity(
            kt[1].flatten().float(), o.flatten().float(), dim=0)))
        inputs.append(best[0])
    return {"inputs": inputs, "tuple": is_tuple}


def _probe(handle, samples, names: list[str]):
    """Templates and ShortGPT influence per block over the samples."""
    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    taps = kd.Taps(tr, [], inputs=names)
    raw: dict[str, object] = {}
    hooks = [tr.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: raw.__setitem__(n, out)) for n in names]
    templates: dict[str, dict] = {}
    infl = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    try:
        with torch.no_grad():
            for i in range(len(samples)):
                taps.clear()
                s = samples.sample(i).to(dev)
                ad.call(tr, s.args, s.kwargs)
                for n in names:
                    args, kwargs = taps.inp[n]
                    if n not in templates:
                        templates[n] = _template(n, args, kwargs, raw[n])
                    outs = list(raw[n]) if templates[n]["tuple"] else [raw[n]]
                    for key, o in zip(templates[n]["inputs"], outs):
                        if key is None:
                            continue
                        x = mob._pick(args, kwargs, key)
                        c = F.cosine_similarity(x.float().reshape(-1, x.shape[-1]),
                                                o.float().reshape(-1, o.shape[-1]), dim=-1)
                        infl[n] += float((1 - c).sum())
                        count[n] += c.numel()
    finally:
        taps.remove()
        for h in hooks:
            h.remove()
    return templates, {n: infl[n] / max(count[n], 1) for n in names}


def _dim(handle, samples, first: str) -> int:
    taps = kd.Taps(handle.transformer, [], inputs=[first])
    try:
        with torch.no_grad():
            s = samples.sample(0).to(handle.run.get("device", "cpu"))
            handle.adapter.call(handle.transformer, s.args, s.kwargs)
        x = mob._main_input(*taps.inp[first])
    finally:
        taps.remove()
    if not isinstance(x, torch.Tensor):
        raise UserError(f"route_blocks: {first}'s first argument is not a tensor")
    return x.shape[-1]


def _weight(tr: nn.Module) -> tuple:
    p = next(tr.parameters())
    return p.device, p.dtype


def apply(handle, calib, cfg: Config) -> PassResult:
    tr = handle.transformer
    t0 = time.perf_counter()
    groups, rest = _groups(handle, cfg)
    if calib is None or not len(calib):
        raise UserError("route_blocks needs calibration data")
    samples = calib.subset(cfg.calib_samples)
    names = [n for g in groups for n in g]
    arg = moe.timestep_argument(tr)
    if cfg.router_timestep and arg is None:
        raise UserError("route_blocks: router_timestep needs the transformer's forward to take "
                        "the timestep (timestep, t, ...); set router_timestep: false")
    t_name, t_pos = arg if arg is not None else (None, None)
    ctx = moe.time_context(tr, t_name, t_pos, 1000.0)  # to_moe's, if it ran before
    templates, influence = _probe(handle, samples, names)
    learned = _learn_choice(handle, samples, groups, cfg) if cfg.start == "learnable" else None
    scale = moe.settle_scale(tr)  # the probe's calls showed the timestep range
    dim = _dim(handle, samples, groups[0][0])
    device, dtype = _weight(tr)
    grps = mob.install(tr, groups, cfg.keep, templates, dim, cfg.router_timestep, ctx,
                       device=device, dtype=dtype)
    if cfg.start == "per_sample":  # the fit sets every router's weights and bias
        start = {"per_sample_fit": _fit_per_sample(handle, samples, grps, groups, cfg)}
    else:
        choice = {}
        with torch.no_grad():
            for g, names_g in zip(grps, groups):
                v = torch.tensor([influence[n] for n in names_g]) if learned is None else \
                    torch.tensor([-1.0 if n in learned[0] else 1.0 for n in names_g])
                z = (v - v.mean()) / v.std().clamp_min(1e-12)
                g.router.weight.zero_()
                g.router.bias.copy_(cfg.start_strength * z)
                choice[",".join(names_g)] = [
                    names_g[i] for i in torch.topk(z, cfg.keep).indices.sort().values.tolist()]
        start = {"starting_choice": choice}
        if learned is not None:
            start["learnable"] = learned[1]
    block_params = {n: sum(p.numel() for p in tr.get_submodule(n).parameters()) for n in names}
    report = {"group": cfg.group, "keep": cfg.keep, "groups": len(groups), "always_run": rest,
              "router_timestep": cfg.router_timestep,
              "influence": {n: round(v, 6) for n, v in influence.items()},
              **start,
              "routed_block_params": sum(block_params.values()),
              "seconds": round(time.perf_counter() - t0, 3)}
    meta = {"groups": groups, "keep": cfg.keep, "templates": templates, "dim": dim,
            "router_timestep": cfg.router_timestep,
            "time": {"name": t_name, "position": t_pos, "scale": scale}}
    return PassResult(meta=meta, report=report)


def _learn_choice(handle, samples, groups, cfg: Config) -> tuple[set[str], dict]:
    """TinyFusion's learnable choice of ``group - keep`` blocks to drop in each group (the
    prune_depth method, on these groups): the routers then start on the kept blocks, so block
    routing begins from the best static pruning found instead of the blocks' influence."""
    from types import SimpleNamespace

    from compress.prune import depth_scores as ds
    from compress.prune.learnable_depth import learn

    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    names = [n for g in groups for n in g]
    taps = kd.Taps(tr, names, inputs=names, detach=True)
    s = samples.sample(0).to(dev)
    try:  # only the pairing of each block's input and output streams is needed
        with torch.no_grad():
            _, pairing = ds.influence(lambda _i: ad.call(tr, s.args, s.kwargs), taps, names, 1)
    finally:
        taps.remove()
    targets = {c: len(lst) // cfg.group * (cfg.group - cfg.keep)
               for c, lst in kd.containers(names).items()}
    lcfg = SimpleNamespace(learnable=cfg.learnable.model_copy(update={"group_size": cfg.group}),
                           seed=cfg.seed)
    report: dict = {}
    dropped = learn(handle, samples, names, pairing, targets, set(names), lcfg, report)
    return set(dropped), report["learnable"]


def _outputs(handle, samples, grps, skip: tuple[int, int] | None) -> list[torch.Tensor]:
    """The transformer's outputs on ``samples`` with every block run, or with group
    ``skip[0]`` skipping its block ``skip[1]`` for every sample (the rest all run)."""
    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    outs = []
    for gi, g in enumerate(grps):
        g.keep, g.forced = g.size, []
        if skip is not None and gi == skip[0]:
            g.keep, g.forced = g.size - 1, [skip[1]]
    with torch.no_grad():
        for i in range(len(samples)):
            s = samples.sample(i).to(dev)
            outs.append(ad.call(tr, s.args, s.kwargs).float())
    return outs


def _fit_per_sample(handle, samples, grps, groups, cfg: Config) -> dict:
    """Each router fitted by ridge least squares from its inputs to the z-score, over its
    group's blocks, of how much skipping each block alone changes the sample's output (the
    more it changes, the higher the block's logit): every sample starts on the blocks it
    needs most, as measured, and the distillation refines from there. One forward per
    calibration call, group and block."""
    keeps = [g.keep for g in grps]
    try:
        for g in grps:
            g.seen = []
        ref = _outputs(handle, samples, grps, None)
        feats = [torch.cat(g.seen).float() for g in grps]
        for g in grps:
            g.seen = None
        stats = {}
        for gi, (g, names_g) in enumerate(zip(grps, groups)):
            err = torch.stack([torch.cat([
                (o - r).pow(2).reshape(r.shape[0], -1).mean(1)
                for o, r in zip(_outputs(handle, samples, grps, (gi, j)), ref)])
                for j in range(g.size)], dim=1)  # [rows, size]
            z = (err - err.mean(1, keepdim=True)) / err.std(1, keepdim=True).clamp_min(1e-12)
            x = feats[gi]
            if x.shape[0] != z.shape[0]:
                raise UserError("route_blocks: the router saw a different number of samples "
                                "than the outputs hold; use start: influence")
            mu = x.mean(0)
            xc = x - mu
            gram = xc.T @ xc
            lam = 1e-2 * float(gram.diagonal().mean()) + 1e-8
            eye = torch.eye(gram.shape[0], device=gram.device)
            w = torch.linalg.solve(gram + lam * eye, xc.T @ z.to(gram.device))  # [F, size]
            target = cfg.start_strength * z
            with torch.no_grad():
                g.router.weight.copy_((cfg.start_strength * w.T).to(g.router.weight.dtype))
                g.router.bias.copy_((target.mean(0) - cfg.start_strength * (mu @ w))
                                    .to(g.router.bias.dtype))
                fitted = g.router(x.to(g.router.weight.dtype)).float()
            best = err.argmin(1)  # the block each sample could skip most cheaply
            common = torch.bincount(best, minlength=g.size).argmax()
            stats[",".join(names_g)] = {
                "rows": int(x.shape[0]),
                "best_skip_share": [round(float((best == j).float().mean()), 4)
                                    for j in range(g.size)],
                "fit_agrees": round(float((fitted.argmin(1) == best).float().mean()), 4),
                "static_agrees": round(float((best == common).float().mean()), 4)}
    finally:
        for g, k in zip(grps, keeps):
            g.keep, g.forced, g.seen = k, None, None
    return stats


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    t = meta.get("time") or {}
    ctx = moe.time_context(transformer, t.get("name"), t.get("position"),
                           float(t.get("scale") or 1000.0))
    device, dtype = _weight(transformer)
    mob.install(transformer, [list(g) for g in meta["groups"]], int(meta["keep"]),
                meta["templates"], int(meta["dim"]), bool(meta["router_timestep"]), ctx,
                device=device, dtype=dtype)


register_pass(PassDef(name="route_blocks", config=Config, apply=apply, restore=restore,
                      kind="structural", check=check))
